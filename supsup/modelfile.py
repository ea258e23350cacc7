"""A :class:`~supsup.model.SupermaskModel` in one small, self-contained, safe file.

The file (:mod:`supsup.checkpoint`'s checksummed format, its own magic) holds the packed bank
and the model's identity: the backbone's recipe (registered name, input shape, outputs, weight
init, seed), mask kind, class count and the SHA-256 of the frozen weights. Loading rebuilds the
backbone from the recipe and refuses it if the weights' digest differs. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import torch
from torch import nn

from .bank import (
    bank_entries,
    bank_sha256,
    bank_state,
    likelihood_state,
    task_classes_state,
    task_sha256,
)
from .checkpoint import MODEL_MAGIC, CheckpointError, read_checksummed, write_checksummed
from .errors import ModeError
from .layers import SupermaskLayer
from .likelihood import DEFAULT_LIKELIHOOD, LikelihoodSpec
from .version import __version__

__all__ = ["ModelFile"]


class ModelFile:
    """The bank as plain data, ``save`` / ``load`` and the backbone's digest, for
    :class:`~supsup.model.SupermaskModel` (a mixin: it only uses the model's public methods and
    layers, so this module does not import the model)."""

    def frozen_weights_digest(self) -> str:
        """SHA-256 over every frozen weight and bias (and a pretrained BatchNorm's frozen scale and
        shift), in layer order (the backbone's identity)."""
        h = hashlib.sha256()
        for name, buf in self.backbone.named_buffers():
            if name.endswith(("base_layer.weight", "base_layer.bias", "frozen_weight", "frozen_bias")):
                h.update(name.encode())
                h.update(buf.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def bank_state(self) -> dict[str, torch.Tensor]:
        """Packed bank rows per layer (exactly ``num_banked_tasks`` rows each) and BatchNorm
        statistics, on the CPU (:func:`supsup.bank.bank_state`)."""
        state = bank_state(self.masked_layers, self.norm_layers)
        state.update(task_classes_state(self.task_classes, self.num_banked_tasks))  # class-incremental
        state.update(likelihood_state([self.task_likelihood(t) for t in range(self.num_banked_tasks)]))
        return state

    def bank_sha256(self) -> str:
        """SHA-256 of the bank, task by task (:func:`supsup.bank.bank_sha256`)."""
        return bank_sha256(self.masked_layers, norms=self.norm_layers,
                           likelihoods=[self.task_likelihood(t) for t in range(self.num_banked_tasks)])

    def task_sha256(self, task_id: int) -> str:
        """SHA-256 of a banked task's mask and BatchNorm statistics (:func:`supsup.bank.task_sha256`)."""
        return task_sha256(self.masked_layers, task_id, self.norm_layers)

    def identity(self) -> dict[str, Any]:
        """What defines this model besides its masks: the backbone spec (if built by name), the
        output and class counts, capacity, seed, mask kind and the frozen weights' digest."""
        return {"spec": self.spec, "num_outputs": self.num_outputs, "num_classes": self.num_classes,
                "num_tasks": self.num_tasks, "seed": self.seed, "weight_init": self.weight_init,
                "mask_kind": self.mask_kind,
                "density": self.density, "score_init": self.score_init, "norm": self.norm,
                "likelihood": None if self.likelihood is None else dataclasses.asdict(self.likelihood),
                "num_masked_weights": self.num_masked_weights,
                "layer_shapes": [list(layer.weight.shape) for layer in self.masked_layers],
                "frozen_weights_sha256": self.frozen_weights_digest()}

    def save(self, path: str | os.PathLike) -> None:
        """Save the banked tasks and the model's identity to one checksummed file (written
        atomically; nothing in it is pickled). A task still in training is not saved: call
        :meth:`finish_task` first."""
        if self.active_task is not None:
            raise ModeError(f"task {self.active_task} is still being trained: call finish_task() before save()")
        meta = {"format": "supsup-model", "supsup_version": __version__, "identity": self.identity()}
        write_checksummed(path, self.bank_state(), meta, magic=MODEL_MAGIC)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: nn.Module | None = None,
             device: torch.device | str = "cpu") -> ModelFile:
        """A model saved by :meth:`save`, with its banked tasks; outputs equal the saved model's.

        Args:
            backbone: the backbone module, for a model that was not built by :meth:`from_name`
                (the file then holds no recipe for it); its weights must be the saved ones.

        Raises:
            CheckpointError: a missing, corrupt or foreign file, or frozen weights that differ
                from the saved model's.
        """
        if backbone is not None and any(isinstance(m, SupermaskLayer) for m in backbone.modules()):
            raise CheckpointError("backbone= takes a fresh instance of the module the model was built from, e.g. "
                                  "SupermaskModel.load(path, backbone=MyNet()); this one is already wrapped (a "
                                  "model's .backbone)")
        tensors, meta = read_checksummed(path, magic=MODEL_MAGIC)
        ident = meta.get("identity")
        if meta.get("format") != "supsup-model" or not isinstance(ident, dict):
            raise CheckpointError(f"{path} is not a supsup model file (no model identity)")
        try:
            kwargs = {"num_tasks": ident["num_tasks"], "num_classes": ident["num_classes"], "seed": ident["seed"],
                      "mask_kind": ident["mask_kind"], "density": ident["density"],
                      "score_init": ident["score_init"], "norm": ident.get("norm", "per_task"),
                      # files written before likelihood statistics existed get today's default
                      "likelihood": (DEFAULT_LIKELIHOOD if "likelihood" not in ident else
                                     None if ident["likelihood"] is None else LikelihoodSpec(**ident["likelihood"]))}
            spec = ident["spec"]
            if backbone is not None:
                # files written before weight_init was recorded kept the module's own weights
                model = cls(backbone, weight_init=ident.get("weight_init") or "keep", **kwargs)
            elif spec is not None:
                model = cls.from_name(spec["backbone"], num_outputs=spec["num_outputs"], input_shape=spec["input_shape"],
                                      weight_init=spec["weight_init"], **kwargs)
            else:
                raise CheckpointError(f"{path} holds a model built from a custom backbone: pass it as "
                                      "SupermaskModel.load(path, backbone=module)")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: unusable model identity ({type(err).__name__}: {err})") from None
        if model.frozen_weights_digest() != ident["frozen_weights_sha256"]:
            raise CheckpointError(f"{path}: the rebuilt backbone's frozen weights differ from the saved model's "
                                  "(another torch version's initialisation, or another backbone module)")
        try:
            model.load_bank_state(bank_entries(tensors))
        except ValueError as err:
            raise CheckpointError(f"{path} has an unusable mask bank: {err}") from None
        return model.to(device)
