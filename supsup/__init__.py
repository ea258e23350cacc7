"""supsup: Supermasks in Superposition (Wortsman et al., NeurIPS 2020).

A frozen random backbone shared by every task; per task a binary supermask, frozen into a
bank at 1 bit per weight; task inference by superposing the masks.
"""

__version__ = "0.1.0"

from .config import ConfigError, RunConfig, load_config  # noqa: E402
from .inference import alpha_gradients, infer_tasks  # noqa: E402
from .model import CapacityError, Mode, ModeError, SupermaskModel  # noqa: E402

__all__ = [
    "__version__",
    "CapacityError",
    "ConfigError",
    "Mode",
    "ModeError",
    "RunConfig",
    "SupermaskModel",
    "alpha_gradients",
    "infer_tasks",
    "load_config",
]
