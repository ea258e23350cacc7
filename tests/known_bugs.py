"""Put known, plausible bugs into the code one at a time and check that the suite catches each.

    .venv/bin/python tests/known_bugs.py [name-fragment ...]

Each entry is a small edit of the kind a refactor introduces (a boundary, a forgotten reset,
a sign); for each, the relevant test files run with the bug in place, and the edit is undone
whatever happens. Every line must read CAUGHT. Not collected by pytest (the file name does not
start with ``test_``); ``make mutate`` runs the systematic version of the same idea (mutmut).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (name, file, original text, buggy text, test files)
BUGS = [
    ("threshold > instead of >=", "supsup/masks.py", "return scores >= 0", "return scores > 0",
     "tests/test_masks.py"),
    ("fused threshold kernel > instead of >=", "supsup/_kernels.py", "out[i] = w if scores[i] >= 0",
     "out[i] = w if scores[i] > 0", "tests/test_masks.py"),
    ("load_bank keeps the old mask count", "supsup/layers.py",
     "        self.num_masks = rows.shape[0]\n        self._count = None", "        self.num_masks = rows.shape[0]",
     "tests/test_model.py"),
    ("binary search: alpha not renormalised over survivors", "supsup/inference.py",
     "alphas = alive.to(x.dtype) / count", "alphas = alive.to(x.dtype) / k", "tests/test_inference.py"),
    ("binary search: dropped candidates keep their alpha", "supsup/inference.py",
     "alphas = alive.to(x.dtype) / count", "alphas = torch.full((G, k), 1.0 / k, dtype=x.dtype, device=x.device)",
     "tests/test_inference.py"),
    ("GN counts a wrongly inferred batch's GG answers", "supsup/evaluation.py",
     "stands_for = mask if task_map is None else task_map(mask)", "stands_for = task_id",
     "tests/test_inference.py"),
    ("GN protocol scores wrong batches by their predictions", "supsup/evaluation.py",
     "acc_inferred=sum(o.correct for o in right)", "acc_inferred=sum(o.correct for o in outcomes)",
     "tests/test_avalanche.py"),
    ("use_task does not restore the mode", "supsup/prediction.py",
     "            yield self\n        finally:\n            self.restore_mode()", "            yield self\n        finally:\n            pass",
     "tests/test_inference.py tests/test_api.py"),
    ("NN resume drops the optimizer state", "supsup/experiment/native.py",
     "        optimizer.load_state_dict(tensors[\"optimizer\"])", "        pass", "tests/test_runner.py"),
    ("inference.log_base 1 accepted", "supsup/config/sections.py", "self.log_base, 1.0, lo_open=True",
     "self.log_base, 1.0", "tests/test_config.py"),
    ("the strategy ignores task_id_source task_label", "supsup/integrations/avalanche/strategy.py",
     "if self.task_id_source == \"experience\":", "if True:", "tests/test_avalanche.py"),
    ("one-shot argmax", "supsup/inference.py", "return grads.argmin(dim=1, keepdim=True), 1",
     "return grads.argmax(dim=1, keepdim=True), 1",
     "tests/test_inference.py"),
    ("checksum mismatch reported under another message", "supsup/checkpoint.py",
     "its SHA-256 checksum does not match", "bad", "tests/test_runner.py tests/test_checkpoint.py"),
]


def main(only: list[str]) -> int:
    missed = 0
    for name, path, old, new, tests in BUGS:
        if only and not any(o in name for o in only):
            continue
        file = ROOT / path
        src = file.read_text()
        if src.count(old) != 1:
            print(f"STALE : {name}: the original text is not in {path} exactly once; update this list")
            missed += 1
            continue
        file.write_text(src.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                                *tests.split()], cwd=ROOT, capture_output=True, text=True)
        finally:
            file.write_text(src)
        failed = [line.split(" ")[1] for line in r.stdout.splitlines() if line.startswith("FAILED")]
        missed += r.returncode == 0
        print(f"{'CAUGHT' if r.returncode else 'MISSED'}: {name}" + (f" ({failed[0]})" if failed else ""), flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
