"""The experiment layer: a run config in, a run directory out.

:func:`run_experiment` checks the config against its backend (:data:`BACKENDS`: ``native``,
``avalanche``, each registered by its own module), builds the model and stream, trains,
checkpoints, evaluates and writes ``results.json`` and ``accuracy.png``
(:class:`~.results.RunResults`); :func:`evaluate_saved` evaluates a saved bank again.
"""

from . import avalanche_backend, native  # noqa: F401  (each registers its backend)
from .backends import BACKENDS, check_config, run_experiment
from .build import build_model, build_stream, resolve_device
from .evaluate import sampled_tasks
from .report import format_table, plot_accuracy, write_report
from .results import CurvePoint, InferredScores, NNReport, RunResults, Summary, TaskRow
from .saved import evaluate_saved

__all__ = [
    "BACKENDS",
    "CurvePoint",
    "InferredScores",
    "NNReport",
    "RunResults",
    "Summary",
    "TaskRow",
    "build_model",
    "build_stream",
    "check_config",
    "evaluate_saved",
    "format_table",
    "plot_accuracy",
    "resolve_device",
    "run_experiment",
    "sampled_tasks",
    "write_report",
]
