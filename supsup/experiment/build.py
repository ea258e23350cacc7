"""What a run config builds: the device, the task stream, the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import ConfigError, RunConfig
from ..likelihood import LikelihoodSpec
from ..model import SupermaskModel

__all__ = ["build_model", "build_stream", "likelihood_spec", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present, else the CPU; a CUDA device asked for must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def build_stream(cfg: RunConfig, device: torch.device, *, progress: bool = True):
    """The native task stream of ``cfg.benchmark`` (its dataset loaded from the data root; MNIST
    is provisioned if needed)."""
    from ..data import STREAMS, create_stream

    data = STREAMS.get(cfg.benchmark.name).load_data(cfg.benchmark.data_root, progress=progress)
    kwargs: dict[str, Any] = {}
    if cfg.benchmark.name == "permuted_mnist":
        kwargs["permutation_source"] = cfg.benchmark.permutation_source
    elif cfg.benchmark.name == "rotated_mnist":
        kwargs["angles"] = cfg.benchmark.angles
    if cfg.benchmark.labels != "task":
        kwargs["labels"] = cfg.benchmark.labels
    stream = create_stream(cfg.benchmark.name, data, num_tasks=cfg.benchmark.num_tasks, seed=cfg.seed,
                           device=device, **kwargs)
    if cfg.benchmark.validation:
        stream.hold_out(cfg.benchmark.validation)
        try:
            stream.num_samples(0, "train")  # fewer training images than asked to hold out: say so now
        except ValueError as err:
            raise ConfigError("benchmark.validation", str(err)) from None
    return stream


def likelihood_spec(cfg: RunConfig) -> LikelihoodSpec | None:
    """What each task banks for ``inference.method: likelihood`` (None for the gradient methods:
    their banks hold the masks alone)."""
    if cfg.inference.method != "likelihood":
        return None
    return LikelihoodSpec(images=cfg.inference.likelihood_images, max_rank=cfg.inference.likelihood_rank)


def build_model(cfg: RunConfig, device: torch.device, input_shape: Sequence[int] | None = None,
                num_classes: int | None = None) -> SupermaskModel:
    """The model of ``cfg``: its backbone for the stream's inputs, ``cfg.capacity`` masks, the
    stream's classes."""
    from ..data import STREAMS

    if input_shape is None:
        input_shape = STREAMS.get(cfg.benchmark.name).input_shape
    model = SupermaskModel.from_name(
        cfg.model.backbone, num_tasks=cfg.capacity, num_outputs=cfg.model.num_outputs,
        num_classes=cfg.benchmark.num_classes if num_classes is None else num_classes,
        seed=cfg.seed, input_shape=input_shape, weight_init=cfg.model.weight_init,
        mask_kind=cfg.mask.kind, density=cfg.mask.density, score_init=cfg.model.score_init, norm=cfg.model.norm,
        likelihood=likelihood_spec(cfg), device=device)
    if cfg.train.layer_lr is not None and len(cfg.train.layer_lr) != len(model.masked_layers):
        # before any training, not at the first optimizer (a resumed run would fail after loading)
        raise ConfigError("train.layer_lr", f"has {len(cfg.train.layer_lr)} multipliers, but {cfg.model.backbone} has "
                                            f"{len(model.masked_layers)} masked layers")
    return model
