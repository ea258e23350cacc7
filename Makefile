# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

# Re-runs only when the project metadata changes; a second `make install` does no work.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# setuptools prints an information-only notice for every editable install of a flat
	# layout; nothing is wrong, so it is filtered (only that message).
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip install --quiet -e '.[avalanche,dev]'
	touch $(STAMP)

demo: install
	$(BIN)/supsup data mnist
	rm -rf runs/demo
	$(BIN)/supsup run configs/demo.yaml --out runs/demo

test: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check supsup tests benchmarks

clean:
	rm -rf runs .pytest_cache
