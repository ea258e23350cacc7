"""supsup: Supermasks in Superposition (Wortsman et al., NeurIPS 2020).

A frozen random backbone shared by every task; per task a binary supermask, frozen into a
bank at 1 bit per weight; task inference by superposing the masks.

The Python API for your own loop::

    model = SupermaskModel.from_name("fc1024", num_tasks=2, num_outputs=500, num_classes=10)
    train_task(model, loader_of_task_0)            # learns task 0, banks its mask
    with model.use_task(0):
        predictions = model.predict(x)             # among the 10 real classes
    task = infer_task(model, x)                    # the task of a batch, from its images
    model.save("model.supsup"); model = SupermaskModel.load("model.supsup")

Experiments from configs: :func:`supsup.experiment.run_experiment` (``supsup run``).
"""

from .config import ConfigError, RunConfig, Scenario, TrainConfig, load_config
from .errors import CapacityError, ModeError
from .inference import alpha_gradients, infer_task, infer_tasks
from .model import Mode, SupermaskModel
from .training import train_task
from .version import __version__

__all__ = [
    "__version__",
    "CapacityError",
    "ConfigError",
    "Mode",
    "ModeError",
    "RunConfig",
    "Scenario",
    "SupermaskModel",
    "TrainConfig",
    "alpha_gradients",
    "infer_task",
    "infer_tasks",
    "load_config",
    "train_task",
]
