"""The files a :class:`~supsup.model.SupermaskModel` is kept in: plain data in, plain data out.

Two formats hold the same things, the packed bank (a ``bank state`` dict of tensors,
:mod:`supsup.bank`) and the model's identity (a JSON-able dict: the backbone's recipe, init,
seed, mask kind, class count and the SHA-256 of the frozen weights):

* one checksummed file (:mod:`supsup.checkpoint`'s format, its own magic): ``model.save``;
* a directory as peft's adapters, ``supermasks.safetensors`` + ``supsup_config.json``:
  ``model.save_pretrained``.

Nothing is unpickled. The model rebuilds itself from what these functions return; this module
knows nothing of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bank import bank_entries
from .checkpoint import MODEL_MAGIC, CheckpointError, read_checksummed, write_checksummed
from .fileio import atomic_write_bytes, atomic_write_text
from .layers import SupermaskLayer
from .likelihood import DEFAULT_LIKELIHOOD, LikelihoodSpec
from .version import __version__

__all__ = ["PRETRAINED_CONFIG_NAME", "SAFETENSORS_NAME", "check_fresh_backbone", "constructor_kwargs",
           "frozen_weights_digest", "read_model_file", "read_pretrained", "write_model_file", "write_pretrained"]

#: the files of ``save_pretrained`` (peft's layout: tensors + a JSON config)
SAFETENSORS_NAME = "supermasks.safetensors"
PRETRAINED_CONFIG_NAME = "supsup_config.json"
_FORMAT = "supsup-model"


def frozen_weights_digest(backbone: nn.Module) -> str:
    """SHA-256 over every frozen weight and bias (and a pretrained BatchNorm's frozen scale and
    shift) of a wrapped backbone, in layer order: the backbone's identity."""
    h = hashlib.sha256()
    for name, buf in backbone.named_buffers():
        if name.endswith(("base_layer.weight", "base_layer.bias", "frozen_weight", "frozen_bias")):
            h.update(name.encode())
            h.update(buf.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_fresh_backbone(backbone: nn.Module | None) -> None:
    """A backbone given to rebuild a saved model must be a fresh instance of the user's module."""
    if backbone is not None and any(isinstance(m, SupermaskLayer) for m in backbone.modules()):
        raise CheckpointError("backbone= takes a fresh instance of the module the model was built from, e.g. "
                              "SupermaskModel.load(path, backbone=MyNet()); this one is already wrapped (a "
                              "model's .backbone)")


def constructor_kwargs(identity: dict[str, Any]) -> dict[str, Any]:
    """The model's keyword arguments recorded in a saved ``identity`` (files written before
    likelihood statistics existed get today's default). Raises KeyError / TypeError on a
    damaged identity."""
    recorded = identity.get("likelihood", "default")
    likelihood = (DEFAULT_LIKELIHOOD if recorded == "default" else
                  None if recorded is None else LikelihoodSpec(**recorded))
    return {"num_tasks": identity["num_tasks"], "num_classes": identity["num_classes"], "seed": identity["seed"],
            "mask_kind": identity["mask_kind"], "density": identity["density"], "score_init": identity["score_init"],
            "norm": identity.get("norm", "per_task"), "likelihood": likelihood}


def write_model_file(path: str | os.PathLike, state: dict[str, torch.Tensor], identity: dict[str, Any]) -> None:
    """One checksummed file with the bank ``state`` and the model's ``identity`` (atomic)."""
    meta = {"format": _FORMAT, "supsup_version": __version__, "identity": identity}
    write_checksummed(path, state, meta, magic=MODEL_MAGIC)


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(bank state, identity)`` of a file written by :func:`write_model_file`.

    Raises:
        CheckpointError: a missing, corrupt or foreign file.
    """
    tensors, meta = read_checksummed(path, magic=MODEL_MAGIC)
    identity = meta.get("identity")
    if meta.get("format") != _FORMAT or not isinstance(identity, dict):
        raise CheckpointError(f"{path} is not a supsup model file (no model identity)")
    return bank_entries(tensors), identity


def write_pretrained(directory: str | os.PathLike, state: dict[str, torch.Tensor], identity: dict[str, Any], *,
                     num_banked_tasks: int, bank_sha256: str) -> Path:
    """``DIR/supermasks.safetensors`` (the bank ``state``: plain tensors, no pickle, memory-mapped
    on load, readable from any language) and ``DIR/supsup_config.json`` (``identity``, version,
    the bank's and the tensor file's SHA-256), as peft's ``adapter_model.safetensors`` +
    ``adapter_config.json``. Both written atomically, the JSON last: a directory with a JSON
    always has its tensors."""
    from safetensors.torch import save as save_safetensors

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    payload = save_safetensors({k: v.contiguous() for k, v in state.items()},
                               metadata={"format": _FORMAT, "supsup_version": __version__})
    atomic_write_bytes(out / SAFETENSORS_NAME, payload)
    config = {"format": _FORMAT, "supsup_version": __version__, "identity": identity,
              "num_banked_tasks": num_banked_tasks, "bank_sha256": bank_sha256,
              "tensors_sha256": hashlib.sha256(payload).hexdigest()}
    atomic_write_text(out / PRETRAINED_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def read_pretrained(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """``(bank state, identity, bank SHA-256)`` of a directory written by :func:`write_pretrained`.

    Raises:
        CheckpointError: a missing or unreadable file, or tensors that do not match the config's digest.
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
    if not isinstance(config, dict) or config.get("format") != _FORMAT or "identity" not in config:
        raise CheckpointError(f"{out / PRETRAINED_CONFIG_NAME} is not a supsup model config")
    if hashlib.sha256(payload).hexdigest() != config.get("tensors_sha256"):
        raise CheckpointError(f"{out / SAFETENSORS_NAME} does not match its config's SHA-256 (modified, truncated "
                              "or from another model); not using it")
    try:
        tensors = load_safetensors(payload)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{out / SAFETENSORS_NAME} is not a readable safetensors file: {err}") from None
    return bank_entries(tensors), config["identity"], config.get("bank_sha256")
