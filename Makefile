# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test check lint mutate clean

install: $(STAMP)

# Re-runs only when the project metadata changes; a second `make install` does no work.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# setuptools prints an information-only notice for every editable install of a flat
	# layout; nothing is wrong, so it is filtered (only that message).
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip install --quiet -e '.[avalanche,track,tune,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/supsup data mnist
	rm -rf runs/demo
	$(BIN)/supsup run configs/demo.yaml --out runs/demo

# The suite, then the kernel and inference tests again with the torch implementations that a
# GPU runs (SUPSUP_KERNELS=torch: no compiled CPU kernel).
test: install
	$(BIN)/python -m pytest -q -m "not slow" tests
	SUPSUP_KERNELS=torch $(BIN)/python -m pytest -q -m "not slow" tests/test_masks.py tests/test_model.py tests/test_inference.py

# Known bugs, one at a time in a temporary copy of the repository: the test named for each must
# catch it (tests/known_bugs.py; minutes, not part of `make test`; CI runs it after the tests).
check: install
	$(BIN)/python tests/known_bugs.py

# Mutation testing of the core modules (hours on 2 cores; not part of `make test`). The score
# per module and the surviving mutants: `.venv/bin/mutmut results`; see README, Development.
mutate: install
	$(BIN)/python -m pip install --quiet 'mutmut==3.8.1'
	rm -rf mutants
	SUPSUP_HYPOTHESIS_EXAMPLES=40 $(BIN)/mutmut run --max-children 2
	$(BIN)/python benchmarks/mutation_report.py

lint: install
	$(BIN)/ruff check supsup tests benchmarks

clean:
	rm -rf runs .pytest_cache mutants
