"""Command line: the only place that parses argv.

    supsup run CONFIG.yaml|NAME [--set key=value ...] [--out DIR] [--resume DIR]
    supsup tune CONFIG.yaml|NAME --space SPACE.yaml --trials N [--storage URL] [--study NAME]
    supsup export RUN_DIR OUT_DIR
    supsup eval DIR [--scenario GG|GN|NN] [--set key=value ...]
    supsup calibrate DIR [--set key=value ...]
    supsup configs
    supsup report DIR
    supsup data mnist [--root DIR]

Mistakes in a config, a command or a path (a bad argument, a missing or unwritable file, a
directory that is not a run, missing data) are one line on stderr and exit code 2, no
traceback; ``-v`` adds the details where there are more (e.g. how to place MNIST by hand).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``supsup: error: ...``, exit code 2."""

    def error(self, message: str):
        command = self.prog.removeprefix("supsup").strip()
        hint = f"supsup {command} --help" if command else "supsup --help"
        raise SystemExit(_fail(f"{message} (see `{hint}`)"))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="supsup", description="Supermasks in Superposition: continual learning with 1-bit masks.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate an experiment")
    run.add_argument("config", nargs="?", help="YAML config, or the name of a shipped config (`supsup configs`); "
                                               "optional with --resume: the checkpoint's config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (dotted, e.g. train.iterations=300); repeatable")
    run.add_argument("--out", help="output directory (default runs/<config name>)")
    run.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR after its last finished task")
    run.add_argument("--threads", type=int, metavar="N",
                     help="CPU threads for torch and numba (default: OMP_NUM_THREADS, else all cores)")

    ev = sub.add_parser("eval", help="evaluate a saved mask bank without training")
    ev.add_argument("dir", help="a run directory holding checkpoint.pt")
    ev.add_argument("--scenario", choices=["GG", "GN", "NN"],  # the values of supsup.config.Scenario
                    help="evaluation scenario (default: the run's)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override evaluation keys (eval.*, inference.*, device)")
    ev.add_argument("--json", metavar="PATH", help="also write the results to PATH")
    ev.add_argument("--curve", action="store_true",
                    help="GG/GN: recompute the accuracy-vs-tasks points eval.at_tasks from the bank's first n masks")
    ev.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and numba")

    cal = sub.add_parser("calibrate", help="fit the likelihood statistics a saved GG/GN bank lacks (for "
                                           "inference.method=likelihood), from each task's training data")
    cal.add_argument("dir", help="a run directory holding checkpoint.pt")
    cal.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="inference.likelihood_images, inference.likelihood_rank, device")
    cal.add_argument("--refit", action="store_true", help="fit every task again, also those that have statistics")
    cal.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and numba")

    tu = sub.add_parser("tune", help="choose hyperparameters with Optuna on validation data held out of each "
                                     "task's training images (never the test set)")
    tu.add_argument("config", help="YAML config, or the name of a shipped config")
    tu.add_argument("--space", required=True, metavar="SPACE.yaml",
                    help="config keys to search, e.g. 'train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}'")
    tu.add_argument("--trials", type=int, required=True, metavar="N", help="finished trials the study should hold")
    tu.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key of every trial; repeatable")
    tu.add_argument("--out", help="output directory (default runs/tune-<config name>)")
    tu.add_argument("--storage", metavar="URL", help="Optuna RDB storage shared by several processes or machines "
                                                     "(default: sqlite:///OUT/study.db)")
    tu.add_argument("--study", metavar="NAME", help="study name (default: supsup)")
    tu.add_argument("--validation", type=int, default=2000, metavar="N",
                    help="training images per task held out to score trials (default 2000)")
    tu.add_argument("--pruner", choices=["median", "halving", "none"], default="median",
                    help="stop trials that fall behind after the first tasks (default median)")
    tu.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch and numba")

    exp = sub.add_parser("export", help="write a run's model as OUT_DIR/supermasks.safetensors + "
                                        "OUT_DIR/supsup_config.json (SupermaskModel.from_pretrained reads it)")
    exp.add_argument("dir", help="a run directory holding checkpoint.pt")
    exp.add_argument("out_dir", help="where to write the model files")

    sub.add_parser("configs", help="list the configs shipped with supsup (run one with `supsup run NAME`)")

    rep = sub.add_parser("report", help="write DIR/report.md and its figures for a finished run")
    rep.add_argument("dir", help="a run directory holding results.json (and checkpoint.pt for the mask figures)")
    rep.add_argument("--max-tasks", type=int, default=40, help="tasks sampled for the mask overlap figure")

    data = sub.add_parser("data", help="provision datasets")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    mn = data_sub.add_parser("mnist", help="place real MNIST in torchvision's layout (offline-friendly)")
    mn.add_argument("--root", help="data root (default $SUPSUP_DATA or ~/.cache/supsup)")
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"supsup: error: {message}", file=sys.stderr)
    return code


def _one_line(err: Exception, verbose: bool) -> str:
    """An error's message as one line: its first line, the rest with ``-v`` (printed before)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    if len(lines) > 1:
        if verbose:
            print("\n".join(lines[1:]), file=sys.stderr)
        else:
            return f"{lines[0]} (supsup -v ... for the details)"
    return lines[0]


def _path_error(err: OSError) -> str:
    """``PATH: reason`` for an OS error on a file the user named (or that a command needs there)."""
    where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    return f"{where}: {err.strerror or type(err).__name__}"


def _cmd_run(args) -> int:
    from .checkpoint import CheckpointError
    from .config import apply_overrides, config_from_dict, load_config
    from .experiment import format_table, run_experiment
    from .experiment.backends import saved_config

    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            return _fail("--out and --resume name different directories")
        if args.config:
            cfg = load_config(args.config, args.overrides)
        else:
            cfg = config_from_dict(apply_overrides(saved_config(out), args.overrides))
    else:
        if not args.config:
            return _fail("run needs a CONFIG file (or --resume DIR)")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.threads is not None:
        _set_threads(args.threads)
    from .experiment.distributed import DistributedError

    try:
        results = run_experiment(cfg, out, resume=bool(args.resume))
    except CheckpointError as err:
        return _fail(str(err))
    except DistributedError as err:
        return _fail(f"{err}. The last checkpoint in {out} is intact: continue with --resume {out}", 1)
    if int(os.environ.get("RANK", "0")) == 0:  # several processes (torchrun): rank 0 reports
        print(format_table(results))
        names = ("results.json", "accuracy.png", "confusion.png", "metrics.csv", "config.yaml", "checkpoint.pt",
                 "hopsupsup_checkpoint.pt", "avalanche_log.txt")
        print("wrote " + ", ".join(f"{out}/{name}" for name in names if (out / name).exists()))
    return 0


def _set_threads(n: int) -> None:
    import torch

    if n < 1:
        raise SystemExit(_fail(f"--threads must be >= 1, got {n}"))
    torch.set_num_threads(n)
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        return
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _cmd_eval(args) -> int:
    from .experiment import evaluate_saved, format_table
    from .fileio import atomic_write_text

    if args.json and Path(args.json).is_dir():  # found before the evaluation, not after it
        return _fail(f"--json {args.json} is a directory; give a file path")
    if args.threads is not None:
        _set_threads(args.threads)
    results = evaluate_saved(args.dir, overrides=args.overrides, scenario=args.scenario, curve=args.curve)
    print(format_table(results))
    if args.json:
        # the settings the numbers were measured with: the saved run's config.yaml plus these
        record = {**results.to_dict(), "eval_overrides": list(args.overrides), "eval_scenario": args.scenario}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


def _cmd_calibrate(args) -> int:
    from .experiment.calibrate import calibrate_saved

    if args.threads is not None:
        _set_threads(args.threads)
    info = calibrate_saved(args.dir, overrides=args.overrides, refit=args.refit)
    print(f"{args.dir}: likelihood statistics fitted for {info['tasks_fitted']} of {info['tasks']} tasks "
          f"({info['seconds']:.1f} s; at most {info['likelihood_bytes_per_task_max']:,} bytes per task, "
          f"the mask {info['mask_bytes_per_task']:,})")
    return 0


def _cmd_tune(args) -> int:
    from .config import load_config
    from .experiment.tune import load_space, tune

    if args.trials < 1:
        return _fail("--trials must be at least 1")
    if args.validation < 1:
        return _fail("--validation must be at least 1")
    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space, cfg)
    out = Path(args.out) if args.out else Path("runs") / f"tune-{Path(args.config).stem}"
    if args.threads is not None:
        _set_threads(args.threads)
    summary = tune(cfg, space, out, trials=args.trials, storage=args.storage, study_name=args.study,
                   validation=args.validation, pruner=args.pruner)
    states = [t["state"] for t in summary["trials"]]
    print(f"{len(states)} trials: " + ", ".join(f"{states.count(s)} {s.lower()}" for s in sorted(set(states))))
    best = summary["best"]
    if best is None:
        return _fail("no trial completed")
    print(f"best: trial {best['number']}, validation accuracy {best['value']:.4f}, "
          + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print(f"wrote {out / 'best.yaml'} (supsup run {out / 'best.yaml'}) and {out / 'study.json'}")
    return 0


def _cmd_configs(args) -> int:
    from .config import read_yaml, shipped_configs

    for name, path in sorted(shipped_configs().items()):
        data = read_yaml(path)
        bench = data.get("benchmark", {}) if isinstance(data.get("benchmark"), dict) else {}
        model = data.get("model", {}) if isinstance(data.get("model"), dict) else {}
        net = model.get("backbone", "fc1024")
        if data.get("method") == "hopsupsup":
            hop = data.get("hopfield", {}) if isinstance(data.get("hopfield"), dict) else {}
            net = "hopsupsup " + "-".join(map(str, hop.get("hidden", [2048, 2048])))
        print(f"{name:<40} {data.get('scenario', 'GG'):<3} {bench.get('name', '?')}, "
              f"{bench.get('num_tasks', '?')} tasks, {net}")
    return 0


def _cmd_data(args) -> int:
    from .data.mnist import MNISTUnavailableError, ensure_mnist

    t0 = time.perf_counter()
    try:
        root = ensure_mnist(args.root, progress=True)
    except MNISTUnavailableError as err:
        return _fail(_one_line(err, args.verbose))
    print(f"MNIST ready in {root / 'MNIST' / 'raw'} ({time.perf_counter() - t0:.2f} s)")
    return 0


#: how long a rank other than 0 waits before exiting on a user error (see _quiet_rank_exit)
RANK_EXIT_GRACE_SECONDS = 3.0


def _quiet_rank_exit() -> int:
    """Exit code 2 for a rank other than 0, which has the same error as rank 0 and leaves the
    message to it. It waits first: torchrun stops every worker as soon as one exits, and a rank
    leaving at once could have rank 0 stopped before it printed why."""
    time.sleep(RANK_EXIT_GRACE_SECONDS)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # a warning is one line, like an error (no source line under it)
    warnings.formatwarning = lambda message, category, *rest, **kw: f"supsup: warning: {message}\n"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.errors import DataUnavailableError

    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "calibrate":
            return _cmd_calibrate(args)
        if args.command == "configs":
            return _cmd_configs(args)
        if args.command == "tune":
            return _cmd_tune(args)
        if args.command == "export":
            from .experiment.saved import export_run

            out, model = export_run(args.dir, args.out_dir)
            print(f"wrote {out}/supermasks.safetensors and {out}/supsup_config.json ({model.num_banked_tasks} tasks, "
                  f"bank {model.bank_bytes:,} bytes)")
            return 0
        if args.command == "report":
            from .experiment.runreport import write_run_report

            print(f"wrote {write_run_report(args.dir, max_tasks=args.max_tasks)}")
            return 0
        return _cmd_data(args)
    except (ConfigError, CheckpointError, DataUnavailableError) as err:
        if int(os.environ.get("RANK", "0")) != 0:  # several processes: every rank has the same error
            return _quiet_rank_exit()
        return _fail(_one_line(err, args.verbose))
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a fault of ours, with its traceback
            raise
        if int(os.environ.get("RANK", "0")) != 0:
            return _quiet_rank_exit()
        return _fail(_path_error(err))
    except KeyboardInterrupt:
        return _fail("interrupted (the last checkpoint is intact; continue with --resume)", 130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
