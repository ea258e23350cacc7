"""Mutation score per module from a finished ``mutmut run`` (``make mutate``).

    python benchmarks/mutation_report.py [--out benchmarks/results/mutation.md]

Reads mutmut's result files (``mutants/**/*.py.meta``): for every mutant the exit code of the
tests that ran against it (killed: a test failed; survived: all passed; no tests: none of the
selected tests reaches the code; timeout: the tests ran away, which counts as caught). The
score is ``(killed + timeout) / all mutants``. Survivors are listed with their diff (from
``mutmut show``) for review; the reviewed ones that are equivalent (no test could tell them
apart) are kept in ``benchmarks/results/mutation_equivalent.txt``, one mutant name and reason
per line, and reported as such.
"""

from __future__ import annotations

import argparse
import json
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


def _diff(name: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in r.stdout.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
    return " / ".join(line.strip() for line in lines[:2])[:200]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation.md")
    p.add_argument("--no-diffs", action="store_true", help="list surviving mutants without their diffs")
    a = p.parse_args()
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
             "(reviewed: no test can tell them apart) are listed apart and count as caught in the adjusted score.", "",
             "| module | mutants | killed | timeout | survived | of which equivalent | no tests | score | adjusted |",
             "|---|---|---|---|---|---|---|---|---|"]
    survivors = []
    totals = Counter()
    for module, codes in results.items():
        c = Counter(classify(v) for v in codes.values())
        eq = sum(1 for k, v in codes.items() if classify(v) == "survived" and k in equivalent)
        n = sum(c.values()) - c["not run"]
        if n == 0:
            continue
        caught = c["killed"] + c["timeout"]
        totals.update(c)
        totals["equivalent"] += eq
        lines.append(f"| {module} | {n} | {c['killed']} | {c['timeout']} | {c['survived']} | {eq} | {c['no tests']} | "
                     f"{caught / n:.1%} | {(caught + eq) / n:.1%} |")
        survivors += [(module, k) for k, v in codes.items() if classify(v) in ("survived", "no tests")]
    n = sum(v for k, v in totals.items() if k not in ("not run", "equivalent"))
    caught = totals["killed"] + totals["timeout"]
    lines.append(f"| **all** | {n} | {totals['killed']} | {totals['timeout']} | {totals['survived']} | "
                 f"{totals['equivalent']} | {totals['no tests']} | {caught / max(1, n):.1%} | "
                 f"{(caught + totals['equivalent']) / max(1, n):.1%} |")
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
