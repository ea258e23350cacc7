"""NN detection's decisions (paper Sec. 3.6), unit by unit: the statistic is replaced by a
chosen one, so each branch of :class:`supsup.detection.NNDetector` is pinned exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from supsup import detection
from supsup.candidates import Candidates
from supsup.config import NNConfig
from supsup.detection import Decision, NNDetector, NNState, mask_to_task, shared_masks
from supsup.model import Mode, SupermaskModel


def _model(num_tasks=4):
    return SupermaskModel.from_name("lenet_300_100", num_tasks=num_tasks, num_outputs=20, num_classes=10, seed=0)


@pytest.fixture
def statistic(monkeypatch):
    """Replace the check's statistic: ``set(grads, confidence)``; records each call's ``n``."""
    calls: list[int] = []
    extras: list = []
    value: dict = {}

    def fake(model, x, candidates=None):
        n = model.num_banked_tasks if candidates is None else len(candidates)
        calls.append(n)
        extras.append(candidates)
        return value["grads"](n), value["conf"]

    monkeypatch.setattr(detection, "nn_detection_gradients", fake)

    def set_(grads, conf):
        value["grads"] = grads if callable(grads) else (lambda n, g=grads: torch.tensor(g + [0.0] * (n - len(g))))
        value["conf"] = conf

    set_.calls = calls
    set_.extras = extras
    return set_


def _step(detector, n=1, true_task=None):
    x = torch.zeros(2, 1, 28, 28)
    verdicts = []
    for _ in range(n):
        verdicts.append(detector.observe(x))
        detector.after_step(true_task)
    return verdicts


def test_first_batch_starts_mask_zero_and_checks_every_check_every(statistic):
    model = _model()
    det = NNDetector(model, NNConfig(check_every=3, min_candidates=5, threshold=1.125, min_batches_per_task=0))
    statistic([-1.0], conf=0.9)  # mask 0 sure of the batch
    v = _step(det, 7, true_task=0)
    assert v[0].decision is Decision.NEW_TASK and v[0].mask == 0 and v[0].mask_changed
    assert [x.decision for x in v[1:]] == [Decision.KEEP] * 6
    assert statistic.calls == [5, 5]  # at batches 3 and 6 only; padded to min_candidates
    assert det.state.batches_seen == 7 and det.state.allocations == [0]
    assert det.state.counts == {0: {0: 7}}
    assert model.mode is Mode.TRAIN and model.active_task == 0


def test_a_new_task_below_threshold_over_n(statistic):
    """New task when max softmax(-grad) < threshold / n: at n = 5 and threshold 1.125 the
    boundary is 0.225 (0.2249 is new, 0.225 is not)."""
    model = _model()
    det = NNDetector(model, NNConfig(check_every=2, min_candidates=5, threshold=1.125, min_batches_per_task=0))
    statistic([-1.0], conf=0.225)
    v = _step(det, 3, true_task=0)
    assert v[2].decision is Decision.KEEP and model.num_learned_tasks == 1
    statistic([-1.0], conf=0.2249)
    v = _step(det, 2, true_task=1)
    assert v[1].decision is Decision.NEW_TASK and v[1].mask == 1 and v[1].confidence == 0.2249
    assert model.num_banked_tasks == 1 and model.active_task == 1 and model.num_learned_tasks == 2
    assert det.state.allocations == [0, 4] and det.state.batches_on_mask == 1


def test_the_guard_keeps_a_young_mask(statistic):
    model = _model()
    det = NNDetector(model, NNConfig(check_every=2, min_candidates=2, threshold=2.0, min_batches_per_task=4))
    statistic([-1.0], conf=0.1)  # every check says new
    v = _step(det, 5)
    assert [x.decision for x in v] == [Decision.NEW_TASK, Decision.KEEP, Decision.KEEP, Decision.KEEP,
                                       Decision.NEW_TASK]
    # batch 2: mask 0 trained 2 < 4 batches (guarded); batch 4: 4 batches, allowed
    assert det.state.allocations == [0, 4]


def test_an_earlier_task_coming_back_switches_to_its_mask(statistic):
    model = _model()
    det = NNDetector(model, NNConfig(check_every=2, min_candidates=2, threshold=1.5, min_batches_per_task=0))
    statistic([-1.0], conf=0.1)
    _step(det, 3, true_task=0)  # mask 0, then mask 1 at batch 2
    assert model.active_task == 1
    statistic([-5.0, -1.0], conf=0.99)  # sure, and mask 0 is the best
    v = _step(det, 2, true_task=0)
    assert v[1].decision is Decision.SWITCH and v[1].mask == 0 and v[1].mask_changed
    assert model.active_task == 0 and model.num_banked_tasks == 2 and det.state.batches_on_mask == 1
    statistic([-5.0, -1.0], conf=0.99)
    assert _step(det, 2, true_task=0)[1].decision is Decision.KEEP


def test_the_best_mask_is_chosen_among_learned_masks_only(statistic):
    """Untrained padding candidates (ids k..n-1) never win, even with the smallest gradient."""
    model = _model()
    det = NNDetector(model, NNConfig(check_every=1, min_candidates=5, threshold=1.0, min_batches_per_task=0))
    statistic(lambda n: torch.tensor([-1.0] + [-9.0] * (n - 1)), conf=0.9)
    v = _step(det, 3)
    assert [x.decision for x in v[1:]] == [Decision.KEEP, Decision.KEEP] and model.active_task == 0


def test_a_full_bank_warns_once_and_trains_the_best_mask(statistic):
    model = _model(num_tasks=2)
    det = NNDetector(model, NNConfig(check_every=1, min_candidates=2, threshold=2.0, min_batches_per_task=0))
    statistic([-1.0, -3.0], conf=0.1)
    _step(det, 2)  # mask 0, then mask 1
    assert model.num_learned_tasks == 2
    with pytest.warns(RuntimeWarning, match="full") as record:
        v = _step(det, 3)
    assert len(record) == 1 and det.state.capacity_warned
    assert model.num_learned_tasks == 2 and v[0].decision is Decision.KEEP  # mask 1 is the best: kept
    statistic([-3.0, -1.0], conf=0.1)
    assert _step(det, 1)[0].decision is Decision.SWITCH and model.active_task == 0


def test_state_round_trips_through_plain_data():
    state = NNState(batches_seen=7, batches_on_mask=3, allocations=[0, 4], capacity_warned=True,
                    counts={0: {0: 4}, 1: {0: 1, 1: 2}}, calibration={0: [0.25, 0.01], 1: [0.5, 0.0]})
    d = json.loads(json.dumps(state.to_dict()))  # as a checkpoint stores it
    assert all(isinstance(k, str) for k in d["counts"]) and NNState.from_dict(d) == state
    assert NNState.from_dict({k: v for k, v in d.items() if k != "calibration"}).calibration == {}  # 0.1 states


def test_mask_to_task_takes_the_most_seen_task_and_the_lowest_on_ties():
    assert mask_to_task({0: {3: 5, 1: 9}, 1: {2: 4, 4: 4}, 2: {}}) == {0: 1, 1: 2}
    assert mask_to_task({0: {4: 4, 2: 4}}) == {0: 2}  # the lowest, whatever the order seen


def test_a_detector_continues_from_the_state_it_is_given():
    state = NNState(batches_seen=7, allocations=[0, 3])
    det = NNDetector(_model(), NNConfig(), state)
    assert det.state is state


def test_unlabeled_training_shows_progress_only_when_asked(capsys):
    from supsup.config import TrainConfig

    model = _model()
    det = NNDetector(model, NNConfig(check_every=100, min_batches_per_task=0))
    batches = [(torch.rand(4, 1, 28, 28), torch.randint(0, 4, (4,))) for _ in range(3)]
    opt, loss = detection.train_unlabeled(det, batches, None, TrainConfig(lr=0.1), progress=False)
    assert opt is not None and loss > 0 and capsys.readouterr().err == ""
    detection.train_unlabeled(det, batches, opt, TrainConfig(lr=0.1), total=3, progress=True)
    assert "NN (true task None)" in capsys.readouterr().err


def test_shared_masks_names_masks_trained_on_several_tasks():
    counts = {0: {0: 1000, 1: 1000, 2: 99}, 1: {3: 1000}, 2: {4: 900, 5: 100}}
    # check every 100 batches: 99 batches of task 2 before the next check are no missed switch,
    # 100 (a check that missed task 5) are
    assert shared_masks(counts, 100) == {0: [0, 1], 2: [4, 5]}
    assert shared_masks(counts, 101) == {0: [0, 1]}
    assert shared_masks({0: {0: 10}}, 1) == {}


def test_the_real_statistic_is_uniform_for_identical_candidates():
    """With n copies of one mask every gradient is equal: max softmax(-grad) = 1/n exactly
    (the statistic the threshold is compared with, times n, is 1)."""
    model = _model()
    model.add_task()
    model.finish_task()
    rows = [layer.bank_rows.repeat(4, 1) for layer in model.masked_layers]
    grads, conf = detection.nn_detection_gradients(model, torch.randn(3, 1, 28, 28), Candidates.of_rows(rows))
    assert grads.shape == (4,) and torch.allclose(grads, grads[0].expand(4))
    assert conf == pytest.approx(0.25)


# ------------------------------------------------------------------------- calibrated rule

@pytest.fixture
def entropies(monkeypatch):
    """Replace the entropy a mask shows on a batch: ``set({mask: value})``; training logits
    report the value of the active mask (the calibration follows it)."""
    table: dict = {}

    def fake(logits, num_classes):
        return torch.tensor([table["value"](table["model"])])

    monkeypatch.setattr(detection, "entropy", fake)

    def set_(model, values):
        table["model"] = model
        table["value"] = lambda m: values[m.current_task]

    return set_


def _calibrated(model, **kw):
    cfg = NNConfig(rule="calibrated", check_every=2, min_batches_per_task=0, calibration_momentum=0.5,
                   calibration_min_std=0.1, z_threshold=3.0, **kw)
    return NNDetector(model, cfg)


def _steps(det, n):
    x = torch.zeros(2, 1, 28, 28)
    out = []
    for _ in range(n):
        out.append(det.observe(x))
        det.after_step(0, logits=torch.zeros(2, 20))
    return out


def test_calibration_is_a_moving_mean_and_variance(entropies):
    model = _model()
    det = _calibrated(model)
    for h, (mean, var) in zip([1.0, 2.0, 2.0], [(1.0, 0.0), (1.5, 0.25), (1.75, 0.1875)]):
        entropies(model, {0: h})
        _steps(det, 1)
        assert det.state.calibration[0] == pytest.approx([mean, var])


def test_calibrated_rule_keeps_switches_and_allocates(entropies):
    """Active mask within z <= 3 of its own entropy: keep; a banked mask that is: switch to
    it; none: a new task. The statistic reported is the z-score that decided."""
    model = _model()
    det = _calibrated(model)
    entropies(model, {0: 0.5})
    v = _steps(det, 4)  # mask 0 calibrated at 0.5 (std floor 0.1)
    assert [x.decision for x in v] == [Decision.NEW_TASK, Decision.KEEP, Decision.KEEP, Decision.KEEP]
    entropies(model, {0: 0.9, 1: 0.3})  # z of mask 0 = 4: a new task
    v = _steps(det, 2)
    assert v[0].decision is Decision.NEW_TASK and v[0].confidence == pytest.approx(4.0) and model.active_task == 1
    entropies(model, {0: 0.5, 1: 0.3})
    _steps(det, 4)  # mask 1 calibrated at 0.3
    entropies(model, {0: 0.6, 1: 0.8})  # mask 1: z = 5; mask 0: z = 1: its task came back
    v = _steps(det, 1)
    assert v[0].decision is Decision.SWITCH and v[0].mask == 0 and v[0].confidence == pytest.approx(1.0)
    assert det.state.calibration[1] == pytest.approx([0.3, 0.0], abs=1e-6)  # mask 1 keeps its statistics


def test_calibrated_rule_shortlists_banked_masks_by_the_gradient(entropies, statistic):
    model = _model(num_tasks=6)
    det = _calibrated(model, shortlist=2)
    statistic([-1.0, -5.0, -3.0, -2.0], conf=0.5)  # gradient ranking: 1, 2, 3, 0
    for m in range(4):  # four banked masks with their own statistics
        entropies(model, {m: 0.5, **{i: 9.0 for i in range(6) if i != m}})
        _steps(det, 2)
        det.cfg = dataclasses.replace(det.cfg)  # unchanged; masks 0..3 allocated one per check
    assert model.num_learned_tasks >= 4
    entropies(model, {m: 0.5 for m in range(6)} | {model.active_task: 9.0, 0: 0.5, 1: 9.0, 2: 9.0, 3: 0.5})
    seen = []
    real = detection.NNDetector._z

    def spy(self, mask, h):
        seen.append(mask)
        return real(self, mask, h)

    import unittest.mock

    with unittest.mock.patch.object(detection.NNDetector, "_z", spy):
        v = _steps(det, 2)[1]
    banked = [m for m in seen if m != model.active_task and m != v.mask] + [v.mask]
    assert set(seen) <= {model.active_task, 1, 2, 3}  # mask 0 (the worst gradient) not evaluated
    assert len(seen) == 3 and banked


def test_calibrated_rule_finds_rotated_tasks_on_real_mnist(mnist_data, tmp_path):
    """Rotations 120 degrees apart: the paper's check stays confident and finds one task; the
    calibrated rule finds each at the first check after it starts, no mask shared."""
    from supsup.config import load_config
    from supsup.experiment import run_experiment

    sets = ["benchmark.num_tasks=3", "train.iterations=300", "nn.check_every=50", "eval.max_batches=3",
            "progress=false"]
    res = run_experiment(load_config("configs/rotated_mnist_nn.yaml", sets), tmp_path / "cal").to_dict()
    assert res["num_detected_tasks"] == 3 and res["nn_allocations"] == [0, 300, 600]
    assert res["nn_shared_masks"] == {} and res["task_inference_acc"] == 1.0
    paper = run_experiment(load_config("configs/rotated_mnist_nn.yaml", [*sets, "nn.rule=paper"]),
                           tmp_path / "paper").to_dict()
    assert paper["num_detected_tasks"] < 3


def test_decisions_are_logged_with_batch_and_mask(statistic, caplog):
    """The log is how a user follows NN: every allocation, guard and switch names the batch
    index, the masks and the statistic."""
    import logging

    caplog.set_level(logging.INFO, logger="supsup.detection")
    model = _model()
    det = NNDetector(model, NNConfig(check_every=2, min_candidates=2, threshold=1.5, min_batches_per_task=3))
    statistic([-1.0], conf=0.1)
    _step(det, 5)  # guard at batch 2 (mask 0 trained 2 batches), new task at batch 4
    statistic([-5.0, -1.0], conf=0.99)
    _step(det, 2)  # batch 6: back to mask 0
    text = caplog.text
    assert "NN guard: mask 0 trained only 2 batches; not allocating" in text
    assert "NN: new task detected at batch 4 (confidence 0.1000); mask 1" in text
    assert "NN: batch 6 looks like mask 0's task (confidence 0.9900); training mask 0 again" in text


def test_the_real_statistic_counts_every_candidate(monkeypatch):
    """``n`` is the bank's masks plus the extra candidates: alpha = 1/n for each, and the
    statistic is max softmax(-grad) of the gradient the float-stack oracle gives."""
    from supsup.inference import alpha_gradients_reference

    model = _model(num_tasks=5)
    for t in range(2):
        model.add_task()
        F_train = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
        x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(t))
        torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 4).backward()
        F_train.step()
        model.finish_task()
    model.add_task()
    candidates = model.candidates(include_active=True, pad_to=4)
    assert candidates.tasks == (0, 1, 2, None)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    grads, conf = detection.nn_detection_gradients(model, x, candidates)
    ref = alpha_gradients_reference(model, x.unsqueeze(0), torch.full((1, 4), 0.25), objective="entropy",
                                    num_classes=1, candidates=Candidates.of_rows(candidates.rows()))[0]
    assert grads.shape == (4,) and torch.allclose(grads, ref, rtol=1e-4, atol=1e-7)
    assert conf == pytest.approx(float(torch.softmax(-ref, 0).max()), rel=1e-5)


@pytest.mark.parametrize("backbone,kind", [("conv4_bn", "threshold"), ("lenet_300_100", "bernoulli"),
                                           ("lenet_300_100", "threshold")])
def test_calibration_measures_the_mask_as_the_check_does(backbone, kind):
    """The check runs a mask in TASK mode (running statistics, the deterministic mask); when a
    training forward differs (BatchNorm batch statistics, a sampled mask) the calibration must
    come from a TASK-mode forward too, else z compares two different quantities."""
    from supsup.objectives import entropy

    shape = (1, 28, 28)
    model = SupermaskModel.from_name(backbone, num_tasks=2, num_outputs=20, num_classes=10, seed=0,
                                     input_shape=shape, mask_kind=kind)
    det = NNDetector(model, NNConfig(rule="calibrated", check_every=100, calibration_momentum=0.5))
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    det.observe(x)
    model.train_mode()
    train_logits = model(x).detach()
    det.after_step(0, logits=train_logits, x=x)
    with torch.no_grad(), model.use_task(0):
        task_h = float(entropy(model(x).unsqueeze(0), 1))
    train_h = float(entropy(train_logits.unsqueeze(0), 1))
    assert det.state.calibration[0][0] == pytest.approx(task_h, rel=1e-5)
    if kind == "threshold" and backbone == "lenet_300_100":
        assert train_h == pytest.approx(task_h, rel=1e-5)  # nothing differs: no second forward needed
    else:
        assert abs(train_h - task_h) > 1e-3  # the case the test is about
    assert model.mode is Mode.TRAIN


def test_the_papers_check_counts_the_mask_in_training_among_the_candidates(statistic):
    """The check's candidates after the bank: the mask in training first (not yet banked), then
    untrained masks of later task ids up to min_candidates."""
    from supsup.masks import binarize, pack_bits

    model = _model()
    det = NNDetector(model, NNConfig(check_every=1, min_candidates=3, threshold=1.0, min_batches_per_task=0))
    statistic([-1.0], conf=0.9)
    _step(det, 2, true_task=0)  # batch 0 starts mask 0, batch 1 is checked
    (candidates,) = statistic.extras
    assert candidates.tasks == (0, None, None) and candidates.banked == 0
    for i, (layer, later) in enumerate(zip(model.masked_layers, model.initial_scores(1))):
        rows = torch.stack([candidates.row(i, j) for j in range(3)])
        assert torch.equal(rows[0], pack_bits(layer.current_mask()))
        assert torch.equal(rows[1], pack_bits(binarize(later, layer.mask_kind, layer.density)))
