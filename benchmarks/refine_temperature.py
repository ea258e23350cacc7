"""The temperature of the exact refinement (``inference.refine_temperature``), chosen on
validation data, never on the test set.

    python benchmarks/refine_temperature.py [--config configs/rotated_mnist_gn.yaml]
        [--validation 10000] [--temperatures 1 1.5 2 3 4] [--runs DIR] [--threads N]

The masks of the config's stream are learned again from the training images minus the last
``--validation`` of them (MNIST's last 10,000 training images are its customary validation
split), with the config's training recipe. Each validation batch (the held-out images under a
task's transform, in batches of ``eval.batch_size``; full batches only) then has its task
inferred as the config says (``inference.method``, ``inference.objective``,
``inference.num_images``), shortlisting ``inference.refine_candidates`` masks, and the exact
objective under each shortlisted mask picks one, at every temperature: the task-inference
accuracy per temperature is what this script reports, and the best temperature (ties: the
lowest) is the one to use on the test set.

Why a temperature: a batch's mean entropy at temperature 1 is dominated by its few uncertain
images (a confident image's entropy is about 0 under every good mask), so two masks that
differ on most images by a little can rank by a handful of images; softening the outputs lets
every image count.

Resumable: the masks are saved to ``DIR/model.supsup`` after every task (default
``runs/refine_temperature``). Writes ``benchmarks/results/refine_temperature.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import set_threads  # noqa: E402


def learn_masks(cfg, fit_stream, path: Path, device):
    """The config's masks learned on ``fit_stream``, resuming from ``path``."""
    from supsup import SupermaskModel
    from supsup.experiment.build import build_model
    from supsup.training import learn_task

    model = SupermaskModel.load(path, device=device) if path.exists() else build_model(cfg, device)
    for t in range(model.num_banked_tasks, cfg.benchmark.num_tasks):
        t0 = time.perf_counter()
        report = learn_task(model, fit_stream.train_batches(t, cfg.train.iterations, cfg.train.batch_size), cfg.train)
        model.save(path)
        print(f"task {t}: loss {report.loss:.4f}, {time.perf_counter() - t0:.1f} s", flush=True)
    return model


def selection(cfg, model, val_stream, temperatures: list[float]) -> dict:
    """Task inference on the validation batches: without refinement, and refined exactly at
    each temperature. Returns accuracies and the confusions of the best temperature."""
    import torch

    from supsup.inference import INFERENCE_METHODS
    from supsup.objectives import exact_score

    inf, k = cfg.inference, model.num_banked_tasks
    score = exact_score(inf.objective)
    hits = {"none": 0, **{str(t): 0 for t in temperatures}}
    total = 0
    model.eval()
    with torch.no_grad():
        for task in range(k):
            batches = [x for x, _ in val_stream.test_batches(task, cfg.eval.batch_size)]
            x = torch.stack([b for b in batches if b.shape[0] == cfg.eval.batch_size])[:, :inf.num_images]
            method = INFERENCE_METHODS.get(inf.method)
            kw = dict(objective=inf.objective, num_classes=model.num_classes, log_base=inf.log_base)
            with torch.enable_grad():
                best, _ = method(model, x, model.candidates(), keep=1, **kw)
                shortlist = method(model, x, model.candidates(), keep=min(k, inf.refine_candidates),
                                   **kw)[0][:, :inf.refine_candidates]
            hits["none"] += int((best[:, 0] == task).sum())
            total += x.shape[0]
            exact = {t: torch.full(shortlist.shape, float("inf")) for t in temperatures}
            for cand in shortlist.unique().tolist():
                where = (shortlist == cand).nonzero()
                with model.use_task(int(cand)):
                    xs = x[where[:, 0]]
                    logits = model(xs.reshape(-1, *xs.shape[2:])).float().view(xs.shape[0], xs.shape[1], -1)
                for t in temperatures:
                    exact[t][where[:, 0], where[:, 1]] = score(logits / t, model.num_classes)
            for t in temperatures:
                pick = shortlist.gather(1, exact[t].argmin(1, keepdim=True)).squeeze(1)
                hits[str(t)] += int((pick == task).sum())
            print(f"validation task {task}: " + ", ".join(f"{n} {h / total:.4f}" for n, h in hits.items()), flush=True)
    acc = {n: h / total for n, h in hits.items()}
    best_t = max(temperatures, key=lambda t: (acc[str(t)], -t))
    return {"batches": total, "task_inference_acc": acc, "best_temperature": best_t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/rotated_mnist_gn.yaml")
    p.add_argument("--validation", type=int, default=10000, help="last training images held out per task")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    p.add_argument("--runs", default="runs/refine_temperature")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    import torch

    from supsup import load_config
    from supsup.data import STREAMS, create_stream
    from supsup.experiment.build import resolve_device

    cfg = load_config(ROOT / args.config)
    device = resolve_device(cfg.device)
    data = STREAMS.get(cfg.benchmark.name).load_data(cfg.benchmark.data_root)
    n = data["train_images"].shape[0]
    if not 0 < args.validation < n:
        raise SystemExit(f"--validation must be between 1 and {n - 1}")
    keep = n - args.validation
    fit = dict(data, train_images=data["train_images"][:keep], train_labels=data["train_labels"][:keep])
    val_x, val_y = data["train_images"][keep:], data["train_labels"][keep:]
    val = dict(data, train_images=val_x, train_labels=val_y, test_images=val_x, test_labels=val_y)
    kw = {"angles": cfg.benchmark.angles} if cfg.benchmark.name == "rotated_mnist" else {}
    fit_stream = create_stream(cfg.benchmark.name, fit, num_tasks=cfg.benchmark.num_tasks, seed=cfg.seed, device=device, **kw)
    val_stream = create_stream(cfg.benchmark.name, val, num_tasks=cfg.benchmark.num_tasks, seed=cfg.seed, device=device, **kw)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = learn_masks(cfg, fit_stream, runs / "model.supsup", device)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = selection(cfg, model, val_stream, sorted(args.temperatures))
    out.update(config=args.config, validation_images=args.validation, fit_images=keep,
               inference={"method": cfg.inference.method, "objective": cfg.inference.objective,
                          "num_images": cfg.inference.num_images, "refine_candidates": cfg.inference.refine_candidates},
               train_seconds_this_call=train_s, selection_seconds=time.perf_counter() - t0,
               threads=torch.get_num_threads())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "refine_temperature.json").write_text(json.dumps(out, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {a:.4f} |" for n, a in out["task_inference_acc"].items())
    (RESULTS / "refine_temperature.md").write_text(
        f"# Temperature of the exact refinement, chosen on validation data\n\n"
        f"`python benchmarks/refine_temperature.py --config {args.config}`: the masks learned from the first "
        f"{keep} training images, task inference on {out['batches']} validation batches (the last "
        f"{args.validation} training images under each task's transform). {cfg.inference.method} "
        f"{cfg.inference.objective} from {cfg.inference.num_images} images shortlists "
        f"{cfg.inference.refine_candidates} masks; the exact objective at temperature T picks one.\n\n"
        f"| temperature | task inference (validation) |\n|---|---|\n{rows}\n\n"
        f"(`none`: no refinement, the paper.) Best: **T = {out['best_temperature']}**.\n")
    print(json.dumps(out["task_inference_acc"]), "best", out["best_temperature"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
