"""Mutation score per module from a finished ``mutmut run`` (``make mutate``).

    python benchmarks/mutation_report.py [--out benchmarks/results/mutation.md]
    .venv/bin/mutmut run $(python benchmarks/mutation_report.py --sample 60)

Reads mutmut's result files (``mutants/**/*.py.meta``): for every mutant the exit code of the
tests that ran against it (killed: a test failed; survived: all passed; no tests: none of the
selected tests reaches the code; timeout: the tests ran away, which counts as caught). The
score is ``(killed + timeout) / mutants run``. A full run takes hours on 2 cores, so ``--sample N``
prints, per module, N of the mutants not run yet (drawn with a fixed seed from the names mutmut
generated) to pass to ``mutmut run``; a module whose mutants were not all run is reported as
sampled, with a 95% Wilson interval on its score. Survivors are listed with their diff (from
``mutmut show``) for review; the reviewed ones that are equivalent (no test could tell them
apart) are kept in ``benchmarks/results/mutation_equivalent.txt``, one mutant name and reason
per line, and reported as such.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KILLED, SURVIVED, NO_TESTS = (1, 3), (0,), (33,)


def load(mutants: Path) -> dict[str, dict[str, int | None]]:
    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        out[module] = json.loads(meta.read_text()).get("exit_code_by_key", {})
    return out


def classify(code: int | None) -> str:
    if code is None:
        return "not run"
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in NO_TESTS:
        return "no tests"
    return "timeout"


def wilson(caught: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion caught / n (a sample of mutants)."""
    p = caught / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample(results: dict[str, dict[str, int | None]], per_module: int, seed: int) -> list[str]:
    """Up to per_module names per module among the mutants not run yet, the same for a seed."""
    rng = random.Random(seed)
    names = []
    for codes in results.values():
        todo = sorted(k for k, v in codes.items() if v is None)
        names += rng.sample(todo, min(per_module, len(todo)))
    return names


def _diff(name: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in r.stdout.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
    return " / ".join(line.strip() for line in lines[:2])[:200]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation.md")
    p.add_argument("--no-diffs", action="store_true", help="list surviving mutants without their diffs")
    p.add_argument("--sample", type=int, metavar="N", help="print N not-yet-run mutant names per module and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    a = p.parse_args()
    if a.sample is not None:
        if a.sample < 1:
            p.error(f"--sample must be at least 1, got {a.sample}")
        if not a.mutants.is_dir():
            p.error(f"{a.mutants} does not exist: run mutmut once to generate the mutants")
        print("\n".join(sample(load(a.mutants), a.sample, a.seed)))
        return 0
    equivalent = {}
    eq_path = ROOT / "benchmarks" / "results" / "mutation_equivalent.txt"
    if eq_path.exists():
        for line in eq_path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, reason = line.partition(" ")
                equivalent[name] = reason.strip()
    results = load(a.mutants)
    lines = ["# Mutation testing", "", "`make mutate` (mutmut 3.8.1 over the core modules, the unit-level test files; "
             "see `[tool.mutmut]` in pyproject.toml). Score = (killed + timeout) / mutants; equivalent survivors "
             "(reviewed: no test can tell them apart) are listed apart and count as caught in the adjusted score. "
             "A module run on a random sample of its mutants shows the sample size and a 95% interval "
             "on its adjusted score.", "",
             "| module | mutants run | of | killed | timeout | survived | of which equivalent | no tests | score | adjusted |"
             " 95% interval |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    survivors = []
    totals = Counter()
    generated = 0
    for module, codes in results.items():
        c = Counter(classify(v) for v in codes.values())
        eq = sum(1 for k, v in codes.items() if classify(v) in ("survived", "no tests") and k in equivalent)
        n = sum(c.values()) - c["not run"]
        if n == 0:
            continue
        caught = c["killed"] + c["timeout"]
        generated += len(codes)
        totals.update(c)
        totals["equivalent"] += eq
        low, high = wilson(caught + eq, n)
        interval = "all run" if n == len(codes) else f"{low:.0%}-{high:.0%}"
        lines.append(f"| {module} | {n} | {len(codes)} | {c['killed']} | {c['timeout']} | {c['survived']} | {eq} | "
                     f"{c['no tests']} | {caught / n:.1%} | {(caught + eq) / n:.1%} | {interval} |")
        survivors += [(module, k) for k, v in codes.items() if classify(v) in ("survived", "no tests")]
    n = sum(v for k, v in totals.items() if k not in ("not run", "equivalent"))
    caught = totals["killed"] + totals["timeout"]
    lines.append(f"| **all** | {n} | {generated} | {totals['killed']} | {totals['timeout']} | {totals['survived']} | "
                 f"{totals['equivalent']} | {totals['no tests']} | {caught / max(1, n):.1%} | "
                 f"{(caught + totals['equivalent']) / max(1, n):.1%} | |")
    lines += ["", "## Surviving mutants", ""]
    for _module, name in survivors:
        why = equivalent.get(name)
        diff = "" if a.no_diffs else f": `{_diff(name)}`"
        lines.append(f"- `{name}`" + diff + (f" — equivalent: {why}" if why else ""))
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(results) + 8]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
