"""Put known, plausible bugs into a copy of the code one at a time and check that the suite catches each.

    .venv/bin/python tests/known_bugs.py [name-fragment ...]      (or: make check)

Each entry is a small edit of the kind a refactor introduces (a boundary, a forgotten reset,
a sign) and the test that must catch it. The edit is made in a temporary copy of the
repository, never in the sources, and the named test runs there (``PYTHONPATH`` points every
process, subprocesses too, at the copy). Each line reads one of:

* ``CAUGHT``: the test failed on an assertion (``assert``, ``pytest.raises`` not raising, ...);
* ``ERROR``: the test failed because the bug raised an exception inside it (caught, but by
  accident rather than by an invariant);
* ``BROKEN``: the bugged copy could not even be imported or collected (the entry is wrong);
* ``MISSED``: the test passed with the bug in place;
* ``STALE``: the original text is no longer in the file (the entry needs updating).

Exit status 0 only when every entry reads ``CAUGHT`` or ``ERROR``. Not collected by pytest (the
file name does not start with ``test_``); ``make mutate`` runs the systematic version of the
same idea (mutmut).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: what the copy leaves out: environments, caches, history, run outputs
_IGNORE = shutil.ignore_patterns(".venv", ".git", "runs", "mutants", "__pycache__", ".pytest_cache",
                                 ".hypothesis", "*.egg-info", ".ruff_cache")

#: (name, file, original text, buggy text, the tests that must catch it: pytest node ids, space-separated)
BUGS = [
    ("threshold > instead of >=", "supsup/masks.py", "return scores >= 0", "return scores > 0",
     "tests/test_masks.py"),
    ("fused threshold kernel > instead of >=", "supsup/_kernels.py", "out[i] = w if scores[i] >= 0",
     "out[i] = w if scores[i] > 0", "tests/test_masks.py::test_threshold_keeps_a_score_of_exactly_zero"),
    ("load_bank keeps the old mask count", "supsup/layers.py",
     "        self.num_masks = rows.shape[0]\n        self._count = None", "        self.num_masks = rows.shape[0]",
     "tests/test_model.py::test_loading_a_bank_drops_the_previous_mask_count"),
    ("binary search: alpha not renormalised over survivors", "supsup/inference.py",
     "alphas = alive.to(x.dtype) / count", "alphas = alive.to(x.dtype) / k",
     "tests/test_inference.py::test_binary_search_superposes_its_survivors_uniformly"),
    ("binary search: dropped candidates keep their alpha", "supsup/inference.py",
     "alphas = alive.to(x.dtype) / count", "alphas = torch.full((G, k), 1.0 / k, dtype=x.dtype, device=x.device)",
     "tests/test_inference.py::test_binary_search_superposes_its_survivors_uniformly"),
    ("GN counts a wrongly inferred batch's GG answers", "supsup/evaluation.py",
     "stands_for = mask if task_map is None else task_map(mask)", "stands_for = task_id",
     "tests/test_inference.py::test_gn_counts_a_batch_with_a_wrong_task_as_all_wrong"),
    ("GN protocol scores wrong batches by their predictions", "supsup/evaluation.py",
     "acc_inferred=sum(o.correct for o in right)", "acc_inferred=sum(o.correct for o in outcomes)",
     "tests/test_avalanche.py::test_avalanche_backend_reproduces_native_runner"),
    ("use_task does not restore the mode", "supsup/model.py",
     "            yield self\n        finally:\n            self.restore_mode()", "            yield self\n        finally:\n            pass",
     "tests/test_inference.py::test_evaluating_a_task_restores_the_mode"),
    ("NN resume drops the optimizer state", "supsup/experiment/native.py",
     "        optimizer.load_state_dict(training.optimizer)", "        pass",
     "tests/test_runner.py::test_nn_resume_keeps_the_optimizer_state"),
    ("inference.log_base 1 accepted", "supsup/config/sections.py", "self.log_base, 1.0, lo_open=True",
     "self.log_base, 1.0", "tests/test_config.py::test_bad_values_name_the_key"),
    ("the strategy ignores task_id_source task_label", "supsup/integrations/avalanche/strategy.py",
     "if source == \"experience\":", "if True:",
     "tests/test_avalanche.py::test_strategy_takes_the_task_from_the_task_label"),
    ("one-shot argmax", "supsup/inference.py", "return grads.argsort(dim=1, stable=True), 1",
     "return grads.argsort(dim=1, descending=True, stable=True), 1",
     "tests/test_inference.py::test_infer_tasks_finds_the_task_of_every_group"),
    ("checksum mismatch reported under another message", "supsup/checkpoint.py",
     "its SHA-256 checksum does not match", "bad", "tests/test_checkpoint.py"),
    ("likelihood: a class's Gaussian uses the whole task's images", "supsup/likelihood.py",
     "        fc = f[labels == c]\n", "        fc = f\n",
     "tests/test_likelihood.py::test_fit_is_the_maximum_likelihood_ppca_of_each_class"),
    ("likelihood: the rest variance is the largest discarded eigenvalue", "supsup/likelihood.py",
     "s2 = (rest[rank:].sum() / (d - rank)).clamp_min(floor)", "s2 = rest[rank:].max().clamp_min(floor)",
     "tests/test_likelihood.py::test_fit_is_the_maximum_likelihood_ppca_of_each_class"),
    ("argparse prints its usage block again", "supsup/cli.py", "    p = _Parser(", "    p = argparse.ArgumentParser(",
     "tests/test_runner.py::test_user_caused_cli_failures_are_one_line_exit_2"),
    ("a path error escapes as a traceback", "supsup/cli.py", "    except OSError as err:\n        if err.filename is None:",
     "    except ZeroDivisionError as err:\n        if err.filename is None:",
     "tests/test_runner.py::test_user_caused_cli_failures_are_one_line_exit_2"),
    ("a run takes no writer lock", "supsup/experiment/native.py",
     'held.enter_context(run_lock(out, "supsup run --resume" if resume else "supsup run"))', "pass",
     "tests/test_runner.py::test_one_writer_per_run_directory"),
    ("torchrun workers outlive their launcher", "supsup/experiment/distributed.py",
     "            exit_with_launcher()\n", "            pass\n",
     "tests/test_distributed.py::test_workers_end_when_the_launcher_is_killed"),
    ("a resume inside a task loses the optimizer state", "supsup/training.py",
     "        optimizer.load_state_dict(resume.optimizer)\n", "",
     "tests/test_runner.py::test_sigkill_inside_a_task_then_resume_is_bitwise_identical"),
    ("a resume inside a task trains on its first batches again", "supsup/training.py",
     "        stream = itertools.islice(stream, start, None)", "        pass",
     "tests/test_runner.py::test_sigkill_inside_a_task_then_resume_is_bitwise_identical"),
    ("a resume inside a task restarts the BatchNorm statistics", "supsup/experiment/runstate.py",
     "            bn.running_mean.copy_(running[0])\n            bn.running_var.copy_(running[1])\n",
     "            pass\n",
     "tests/test_runner.py::test_resume_inside_a_task_with_batchnorm_and_bernoulli_masks_is_bitwise_identical"),
    ("a resume inside a task redraws the Bernoulli samples", "supsup/experiment/runstate.py",
     "    if training.sampler is not None:\n        model.sampler().set_state(training.sampler)\n    return", "    return",
     "tests/test_runner.py::test_resume_inside_a_task_with_batchnorm_and_bernoulli_masks_is_bitwise_identical"),
    ("a resumed round gives every rank the first rank's task state", "supsup/experiment/parallel.py",
     "resume_inside_task(run.out, model, task, ranks[dist.rank])", "resume_inside_task(run.out, model, task, ranks[0])",
     "tests/test_distributed.py::test_two_processes_resume_inside_a_round_bitwise"),
    ("an NN resume restarts the BatchNorm statistics of the mask in training", "supsup/experiment/runstate.py",
     "            bn.running_mean.copy_(mean)\n            bn.running_var.copy_(var)\n", "            pass\n",
     "tests/test_runner.py::test_nn_resume_on_a_batchnorm_backbone_is_bitwise_identical"),
    ("Storkey update without the h x^T term", "supsup/hopfield.py",
     "torch.outer(x, x) - torch.eye(d, dtype=W.dtype, device=W.device) - pre - pre.T",
     "torch.outer(x, x) - torch.eye(d, dtype=W.dtype, device=W.device) - pre",
     "tests/test_hopsupsup.py::test_storkey_and_hebbian_matrices_match_hand_computation"),
    ("HopSupSup recovery weights entropy and energy the wrong way round", "supsup/hopsupsup.py",
     "return (1 - t) * h + gamma * t * e, h, e", "return t * h + gamma * (1 - t) * e, h, e",
     "tests/test_hopsupsup.py::test_recovery_loss_at_t0_is_the_entropy_and_at_t1_the_energy"),
    ("HopSupSup recovery starts from zero, not the stored patterns' mean", "supsup/hopsupsup.py",
     "scores = [store.mean_pattern().clone().requires_grad_() for store in model.stores]",
     "scores = [torch.zeros_like(store.mean_pattern()).requires_grad_() for store in model.stores]",
     "tests/test_hopsupsup.py::test_native_run_on_split_mnist"),
    ("a saved model loads no bank", "supsup/model.py",
     "            model.load_bank_state(state)\n        except ValueError as err:",
     "            pass\n        except ValueError as err:",
     "tests/test_pretrained.py::test_save_pretrained_round_trip_is_bitwise_and_never_unpickles"),
    ("validation hold-out not applied to the stream", "supsup/experiment/build.py",
     "        stream.hold_out(cfg.benchmark.validation)", "        pass",
     "tests/test_tune.py::test_validation_images_come_from_the_training_data_and_leave_it"),
    ("held-out validation images still trained on", "supsup/data/streams.py",
     'part = order[: self.validation] if split == "test" else order[self.validation:]',
     'part = order[: self.validation] if split == "test" else order[: order.numel() - self.validation]',
     "tests/test_tune.py::test_validation_images_come_from_the_training_data_and_leave_it"),
]

#: failure messages that mean "an assertion of the test failed" rather than "an exception escaped"
_ASSERTION = ("AssertionError", "assert ", "Failed: DID NOT RAISE", "Failed: DID NOT WARN", "AssertionError:",
              "Regex pattern did not match", "Failed:")


def classify(report: Path, returncode: int) -> tuple[str, str]:
    """``(verdict, first failing test)`` from a pytest JUnit XML report."""
    if not report.is_file():
        return "BROKEN", f"pytest exited {returncode} without a report"
    suites = ET.parse(report).getroot()
    verdict, where = "MISSED", ""
    for case in suites.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error = case.find("failure"), case.find("error")
        if error is not None and not case.get("name"):
            return "BROKEN", error.get("message", "")[:200]  # a collection error
        if failure is not None:
            message = failure.get("message", "")
            if message.startswith(_ASSERTION) or "AssertionError" in message.split("\n")[0]:
                return "CAUGHT", name
            verdict, where = "ERROR", f"{name}: {message.splitlines()[0][:160] if message else ''}"
        elif error is not None:
            return "BROKEN", f"{name}: {error.get('message', '')[:200]}"
    if verdict == "MISSED" and returncode not in (0, 1):
        return "BROKEN", f"pytest exited {returncode}"
    return verdict, where


def run_bug(copy: Path, name: str, path: str, old: str, new: str, tests: str) -> tuple[str, str]:
    """Apply one bug to ``copy``, run its tests there, undo it; ``(verdict, detail)``."""
    file = copy / path
    src = file.read_text()
    if src.count(old) != 1:
        return "STALE", f"the original text is not in {path} exactly once; update this list"
    file.write_text(src.replace(old, new))
    report = copy / ".known_bug.xml"
    report.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                            f"--junitxml={report}", *tests.split()], cwd=copy, env=env, capture_output=True, text=True)
        return classify(report, r.returncode)
    finally:
        file.write_text(src)


def main(only: list[str]) -> int:
    bad = 0
    with tempfile.TemporaryDirectory(prefix="supsup-known-bugs-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=_IGNORE)
        env = {**os.environ, "PYTHONPATH": str(copy)}
        found = subprocess.run([sys.executable, "-c", "import supsup; print(supsup.__file__)"], cwd=Path(tmp), env=env,
                               capture_output=True, text=True).stdout.strip()
        if not found.startswith(str(copy)):  # the bugs would go into a copy nobody imports
            print(f"BROKEN: the copy's supsup is not the one imported ({found or 'no supsup'})")
            return 1
        for name, path, old, new, tests in BUGS:
            if only and not any(o in name for o in only):
                continue
            verdict, detail = run_bug(copy, name, path, old, new, tests)
            bad += verdict not in ("CAUGHT", "ERROR")
            print(f"{verdict:<6}: {name}" + (f" ({detail})" if detail else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
