"""A :class:`~supsup.model.SupermaskModel` in one small, self-contained, safe file.

The file (:mod:`supsup.checkpoint`'s checksummed format, its own magic) holds the packed bank
and the model's identity: the backbone's recipe (registered name, input shape, outputs, weight
init, seed), mask kind, class count and the SHA-256 of the frozen weights. Loading rebuilds the
backbone from the recipe and refuses it if the weights' digest differs. Nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
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
from .fileio import atomic_write_bytes, atomic_write_text
from .layers import SupermaskLayer
from .likelihood import DEFAULT_LIKELIHOOD, LikelihoodSpec
from .version import __version__

__all__ = ["ModelFile", "PRETRAINED_CONFIG_NAME", "SAFETENSORS_NAME"]

#: the files of :meth:`ModelFile.save_pretrained` (peft's layout: tensors + a JSON config)
SAFETENSORS_NAME = "supermasks.safetensors"
PRETRAINED_CONFIG_NAME = "supsup_config.json"


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
        model = cls._rebuild(ident, backbone, where=str(path))
        try:
            model.load_bank_state(bank_entries(tensors))
        except ValueError as err:
            raise CheckpointError(f"{path} has an unusable mask bank: {err}") from None
        return model.to(device)

    @classmethod
    def _rebuild(cls, ident: dict[str, Any], backbone: nn.Module | None, *, where: str) -> ModelFile:
        """A model with no task, rebuilt from a saved identity (its frozen weights checked)."""
        if backbone is not None and any(isinstance(m, SupermaskLayer) for m in backbone.modules()):
            raise CheckpointError("backbone= takes a fresh instance of the module the model was built from, e.g. "
                                  "SupermaskModel.load(path, backbone=MyNet()); this one is already wrapped (a "
                                  "model's .backbone)")
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
                raise CheckpointError(f"{where} holds a model built from a custom backbone: pass it as "
                                      "SupermaskModel.load(path, backbone=module) (or from_pretrained(dir, backbone=module))")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where}: unusable model identity ({type(err).__name__}: {err})") from None
        if model.frozen_weights_digest() != ident["frozen_weights_sha256"]:
            raise CheckpointError(f"{where}: the rebuilt backbone's frozen weights differ from the saved model's "
                                  "(another torch version's initialisation, or another backbone module)")
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the banked tasks as ``DIR/supermasks.safetensors`` (the packed bank, BatchNorm
        statistics, task classes, likelihood statistics: plain tensors, no pickle, memory-mapped
        on load, readable from any language) and ``DIR/supsup_config.json`` (the backbone recipe,
        init, frozen weights' digest, classes, version and the tensor file's SHA-256), as peft's
        ``adapter_model.safetensors`` + ``adapter_config.json``. Both are written atomically; the
        JSON last, so a directory with a JSON always has its tensors."""
        from safetensors.torch import save as save_safetensors

        if self.active_task is not None:
            raise ModeError(f"task {self.active_task} is still being trained: call finish_task() before save_pretrained()")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.bank_state().items()}
        payload = save_safetensors(state, metadata={"format": "supsup-model", "supsup_version": __version__})
        atomic_write_bytes(out / SAFETENSORS_NAME, payload)
        config = {"format": "supsup-model", "supsup_version": __version__, "identity": self.identity(),
                  "num_banked_tasks": self.num_banked_tasks, "bank_sha256": self.bank_sha256(),
                  "tensors_sha256": hashlib.sha256(payload).hexdigest()}
        atomic_write_text(out / PRETRAINED_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, backbone: nn.Module | None = None,
                        device: torch.device | str = "cpu") -> ModelFile:
        """A model written by :meth:`save_pretrained` (or ``supsup export``); outputs equal the
        saved model's. ``backbone``: as for :meth:`load`.

        Raises:
            CheckpointError: a missing or unreadable file, tensors that do not match the config's
                digest, or frozen weights that differ from the saved model's.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load as load_safetensors

        out = Path(directory)
        try:
            config = json.loads((out / PRETRAINED_CONFIG_NAME).read_text())
            payload = (out / SAFETENSORS_NAME).read_bytes()
        except FileNotFoundError as err:
            raise CheckpointError(f"{out} is not a saved supsup model: {Path(err.filename).name} is missing") from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read the model in {out}: {err}") from None
        if not isinstance(config, dict) or config.get("format") != "supsup-model" or "identity" not in config:
            raise CheckpointError(f"{out / PRETRAINED_CONFIG_NAME} is not a supsup model config")
        if hashlib.sha256(payload).hexdigest() != config.get("tensors_sha256"):
            raise CheckpointError(f"{out / SAFETENSORS_NAME} does not match its config's SHA-256 (modified, truncated "
                                  "or from another model); not using it")
        try:
            tensors = load_safetensors(payload)
        except (SafetensorError, ValueError) as err:
            raise CheckpointError(f"{out / SAFETENSORS_NAME} is not a readable safetensors file: {err}") from None
        model = cls._rebuild(config["identity"], backbone, where=str(out))
        try:
            model.load_bank_state(bank_entries(tensors))
        except ValueError as err:
            raise CheckpointError(f"{out} has an unusable mask bank: {err}") from None
        if model.bank_sha256() != config.get("bank_sha256"):
            raise CheckpointError(f"{out}: the loaded bank's digest differs from the saved one")
        return model.to(device)
