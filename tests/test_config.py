"""Config loading: clean one-line errors naming the key, overrides, round trip."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supsup import config as C
from supsup.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

#: the shipped configs, found from this file (pytest may run from any directory)
SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_and_round_trip(tmp_path):
    cfg = RunConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg
    path = tmp_path / "c.yaml"
    C.save_config(cfg, path)
    assert load_config(path) == cfg
    # not the defaults: a file that lost its contents would load as the defaults
    other = load_config("configs/permuted_mnist_gn.yaml", ["seed=3", "train.lr=0.25"])
    C.save_config(other, path)
    assert load_config(path) == other != cfg


def test_unreadable_yaml_is_an_error_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ntrain: {iterations: 5\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: invalid YAML at line 3: expected ',' or '}}'"):
        load_config(bad)
    odd = tmp_path / "odd.yaml"
    odd.write_text("seed: \x07\n")  # a reader error: no line mark
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(odd))}: invalid YAML: unacceptable character #x0007"):
        load_config(odd)
    listed = tmp_path / "list.yaml"
    listed.write_text("- seed: 0\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(listed))}: top level must be a mapping, got list$"):
        load_config(listed)


def test_a_config_is_a_file_or_a_shipped_name():
    from pathlib import Path

    assert C.resolve_config("missing.yaml") == Path("missing.yaml")  # a file name: its own error later
    assert C.resolve_config("configs/demo.yaml") == Path("configs/demo.yaml")
    with pytest.raises(ConfigError, match=r"^dmeo: no such file and no shipped config of that name "
                                          r"\(did you mean 'demo'\?\); `supsup configs` lists them$"):
        C.resolve_config("dmeo")
    with pytest.raises(ConfigError, match=r"^zzzz: no such file and no shipped config of that name; "):
        C.resolve_config("zzzz")


def test_shipped_configs_are_the_repositorys_by_name():
    names = C.shipped_configs()
    assert set(names) == {p.stem for p in SHIPPED}
    assert names["demo"].name == "demo.yaml" and C.resolve_config("demo") == names["demo"]


def test_shipped_configs_are_found_from_any_directory():
    assert len(SHIPPED) >= 10 and Path(__file__).resolve().parents[1] / "configs" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    """Every shipped config loads, and its YAML says exactly what the loaded config holds (no key
    is dropped or defaulted silently on the way)."""
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    written = yaml.safe_load(path.read_text())
    data = config_to_dict(cfg)

    def same(node, ref, where):
        for k, v in node.items():
            assert k in ref, f"{path.name}: {where}{k} is not a config field"
            if isinstance(v, dict):
                same(v, ref[k], f"{where}{k}.")
    same(written, data, "")


def test_required_key_names_exist():
    """The keys a YAML file uses are the dataclass fields, at the documented paths."""
    cfg = RunConfig()
    data = config_to_dict(cfg)
    for key in ["seed", "scenario", "benchmark.name", "benchmark.num_tasks", "model.backbone", "model.num_outputs",
                "model.weight_init", "mask.kind", "mask.density", "train.iterations", "train.batch_size",
                "train.lr", "train.optimizer"]:
        node, obj = data, cfg
        for part in key.split("."):
            node, obj = node[part], getattr(obj, part)
        assert node == (obj.value if hasattr(obj, "value") else obj), key


@pytest.mark.parametrize("key, registry", [
    ("model.backbone", "supsup.backbones:BACKBONES"),
    ("model.weight_init", "supsup.backbones:WEIGHT_INITS"),
    ("model.score_init", "supsup.layers:SCORE_INITS"),
    ("benchmark.name", "supsup.data.streams:STREAMS"),
    ("mask.kind", "supsup.masks:MASK_KINDS"),
    ("train.optimizer", "supsup.optim:OPTIMIZERS"),
    ("inference.method", "supsup.inference:INFERENCE_METHODS"),
    ("inference.objective", "supsup.objectives:OBJECTIVES"),
])
def test_config_choices_are_the_registries(key, registry):
    """A config accepts exactly the registered names (one source of truth): every registered
    name validates, and an unknown one is refused with the registry's names listed."""
    import importlib

    module, attr = registry.split(":")
    names = getattr(importlib.import_module(module), attr).names()
    assert names
    extra = ["model.num_outputs=20"] if key == "benchmark.name" else []
    for name in names:
        load_config(None, [*extra, f"{key}={name}"])
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=no_such_name"])
    assert err.value.key == key and ", ".join(names) in str(err.value)


def test_backend_and_method_are_checked_by_the_experiment_layer():
    from supsup.experiment import check_config

    with pytest.raises(ConfigError, match="backend: unknown value 'natve' \\(did you mean 'native'\\?\\)"):
        check_config(load_config(None, ["backend=natve"]))
    with pytest.raises(ConfigError, match="method: baseline 'ewc' runs on Avalanche"):
        check_config(load_config(None, ["method=ewc"]))
    with pytest.raises(ConfigError, match="method: unknown value 'ewk' \\(did you mean 'ewc'\\?\\)"):
        check_config(load_config(None, ["backend=avalanche", "benchmark.permutation_source=avalanche", "method=ewk"]))


@pytest.mark.parametrize("overrides, key, fragment", [
    (["train.iteratons=3"], "train.iteratons", "did you mean train.'iterations'"),
    (["trian.lr=1"], "trian", "did you mean 'train'"),
    (["train.iterations=abc"], "train.iterations", "expected an integer"),
    (["train.iterations=0"], "train.iterations", ">= 1"),
    (["train.lr=-1"], "train.lr", "> 0.0"),
    (["train.lr=nan"], "train.lr", "finite"),
    (["mask.kind=top"], "mask.kind", "did you mean 'topk'"),
    (["mask.kind=topk", "mask.density=0"], "mask.density", "> 0.0"),
    (["mask.density=1.5"], "mask.density", "<= 1.0"),
    (["scenario=GN", "model.num_outputs=10", "inference.objective=g"], "inference.objective", "superfluous"),
    (["scenario=GN", "inference.num_images=200"], "inference.num_images", "eval.batch_size"),
    (["benchmark.name=split_mnist", "benchmark.num_tasks=6"], "benchmark.num_tasks", "at most 5"),
    (["progress=yes please"], "progress", "true or false"),
    (["benchmark.num_tasks=5", "model.capacity=3"], "model.capacity", "smaller than the 5 tasks"),
    (["benchmark=3"], "benchmark", "is a section"),
    (["seed"], "seed", "key=value"),
    (["inference.log_base=1"], "inference.log_base", "> 1.0"),
    (["inference.log_base=0.5"], "inference.log_base", "> 1.0"),
    (["inference.num_images=0"], "inference.num_images", ">= 1"),
    (["inference.refine_temperature=0"], "inference.refine_temperature", "> 0.0"),
    (["inference.method=binery"], "inference.method", "did you mean 'binary'"),
    (["nn.threshold=0"], "nn.threshold", "> 0.0"),
    (["nn.check_every=0"], "nn.check_every", ">= 1"),
    (["train.momentum=1"], "train.momentum", "< 1.0"),
    (["eval.at_tasks=[0]"], "eval.at_tasks", ">= 1"),
    (["benchmark.num_tasks=3", "eval.at_tasks=[4]"], "eval.at_tasks", "more than the 3 tasks"),
    (["benchmark.num_tasks=0"], "benchmark.num_tasks", ">= 1"),
    (["benchmark.labels=both"], "benchmark.labels", "unknown value 'both'"),
    (["nn.shortlist=0"], "nn.shortlist", ">= 1"),
    (["nn.min_candidates=0"], "nn.min_candidates", ">= 1"),
    (["inference.memory_mb=0"], "inference.memory_mb", ">= 1"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
    (["model.num_outputs=10", "eval.extra_objectives=[g]"], "eval.extra_objectives",
     "'g' needs superfluous neurons: model.num_outputs (10) must exceed the 10 classes"),
    (["scenario=NN", "benchmark.name=split_mnist", "benchmark.labels=global", "model.num_outputs=20"],
     "benchmark.labels", "global labels need each task's classes, which NN never sees as a task: use GN"),
    (["scenario=NN", "train.schedule=cosine"], "train.schedule", "cannot follow a per-task schedule: use constant"),
])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_are_typed_and_ordered():
    cfg = load_config(None, ["benchmark.num_tasks=3", "train.iterations=300", "train.lr=1e-3",
                             "benchmark.angles=[0, 90, 180]", "train.iterations=301"])
    assert cfg.benchmark.num_tasks == 3 and cfg.train.iterations == 301 and cfg.train.lr == 1e-3
    assert cfg.benchmark.angles == [0.0, 90.0, 180.0]


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                     st.lists(st.integers(-5, 5), max_size=3))
_keys = st.sampled_from(sorted(
    [f.name for f in dataclasses.fields(RunConfig) if not dataclasses.is_dataclass(f.type)]
    + [f"{s}.{f.name}" for s in ("benchmark", "model", "mask", "train", "inference", "eval", "nn")
       for f in dataclasses.fields(type(getattr(RunConfig(), s)))]
    + ["bogus", "train.bogus"]))


# 300 examples; fewer under mutation testing (make mutate runs this test once per mutant)
@settings(max_examples=int(os.environ.get("SUPSUP_HYPOTHESIS_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _scalars, max_size=4))
def test_random_values_give_clean_errors_or_valid_configs(values):
    data: dict = {}
    for key, value in values.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}  # a section given as a scalar earlier: replace it
            node = node[part]
        node[parts[-1]] = value
    text = yaml.safe_dump(data)
    try:
        cfg = config_from_dict(yaml.safe_load(text))
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_apply_overrides_does_not_mutate_input():
    base = {"train": {"iterations": 5}}
    apply_overrides(base, ["train.iterations=7"])
    assert base == {"train": {"iterations": 5}}


def test_compare_resume_reuses_only_runs_with_the_same_config(tmp_path, benchmark_driver):
    """benchmarks/compare.py --resume: a finished run is reused only if its saved config is
    exactly this run's; anything else (other settings, no results, a broken config) reruns."""
    import json

    compare = benchmark_driver("compare")

    cfg = C.load_config("configs/permuted_mnist_gn.yaml", ["benchmark.num_tasks=2"])
    run = tmp_path / "run"
    run.mkdir()
    assert compare.finished_run(run, cfg) is None  # nothing there
    (run / "config.yaml").write_text(yaml.safe_dump(C.config_to_dict(cfg), sort_keys=False))
    assert compare.finished_run(run, cfg) is None  # no results.json: the run did not finish
    (run / "results.json").write_text(json.dumps({"mean_acc_inferred": 0.5}))
    assert compare.finished_run(run, cfg) == {"mean_acc_inferred": 0.5}
    other = C.load_config("configs/permuted_mnist_gn.yaml", ["benchmark.num_tasks=3"])
    assert compare.finished_run(run, other) is None
    (run / "config.yaml").write_text("model: {no_such_key: 1}\n")
    assert compare.finished_run(run, cfg) is None


def test_closed_bounds_accept_their_end_values():
    """check_range's closed ends are accepted: a density of exactly 1 keeps every weight, a
    momentum of 0 is plain RMSprop."""
    assert load_config(None, ["mask.kind=topk", "mask.density=1.0"]).mask.density == 1.0
    assert load_config(None, ["train.momentum=0"]).train.momentum == 0.0


def test_readme_names_every_backbone_and_no_other():
    """The README's list of backbones is the registry (a name that does not exist, such as a
    `conv2_bn`, or a registered one left out, fails here)."""
    from supsup.backbones import BACKBONES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("Backbones, by name")
    paragraph = readme[start: readme.index("\n\n", start)]
    named = set(re.findall(r"`([a-z0-9_]+)`", paragraph)) - {"model", "mask", "topk"}
    named |= {f"{n}_bn" for n in ("conv4", "conv6")}  # "conv4 and conv6 ... (with `_bn`: ...)"
    named.discard("_bn")
    assert named == set(BACKBONES.names())
