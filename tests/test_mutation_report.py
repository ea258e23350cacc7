"""The mutation-score report: sampling not-yet-run mutants and the interval on a sampled score."""

import json

import pytest


@pytest.fixture(scope="module")
def report(benchmark_driver):
    return benchmark_driver("mutation_report")


def _metas(root, codes_by_module):
    for module, codes in codes_by_module.items():
        path = root / f"{module}.py.meta"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"exit_code_by_key": codes}))


def test_sample_draws_only_unrun_mutants_per_module_and_repeats_for_a_seed(report, tmp_path):
    a = {f"supsup.a.x_f__mutmut_{i}": (None if i % 2 else 1) for i in range(1, 21)}  # 10 not run
    b = {f"supsup.b.x_g__mutmut_{i}": None for i in range(1, 4)}  # 3, all not run
    _metas(tmp_path / "supsup", {"a": a, "b": b})
    results = report.load(tmp_path)
    names = report.sample(results, 4, seed=7)
    from_a = [n for n in names if n.startswith("supsup.a.")]
    from_b = [n for n in names if n.startswith("supsup.b.")]
    assert len(from_a) == 4 and all(a[n] is None for n in from_a)
    assert sorted(from_b) == sorted(b)  # fewer than asked: all of them
    assert len(set(names)) == len(names)
    assert report.sample(results, 4, seed=7) == names
    assert report.sample(results, 4, seed=8) != names


def test_wilson_interval(report):
    low, high = report.wilson(54, 60)  # 0.9 on 60 mutants: about 0.80-0.95
    assert low == pytest.approx(0.7985, abs=1e-3) and high == pytest.approx(0.9533, abs=1e-3)
    assert report.wilson(60, 60)[1] == pytest.approx(1.0) and report.wilson(0, 60)[0] == pytest.approx(0.0)
    low, high = report.wilson(540, 600)  # ten times the sample: narrower, same centre region
    assert 0.87 < low < 0.9 < high < 0.93
