"""Configs from and to YAML: strict typing, ``--set key=value`` overrides, shipped configs.

YAML keys equal field names, one section per dataclass::

    seed: 0
    scenario: GG
    benchmark: {name: permuted_mnist, num_tasks: 5}
    model: {backbone: fc1024, num_outputs: 500, weight_init: signed_constant}
    mask: {kind: threshold, density: 0.5}
    train: {iterations: 1000, batch_size: 128, lr: 1.0e-4, optimizer: rmsprop}
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..fileio import atomic_write_text
from .sections import ConfigError, RunConfig

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_yaml",
    "resolve_config",
    "save_config",
    "shipped_configs",
]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(key, v, item) for v in value]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"expected one of {typing.get_args(tp)}, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        names = [m.value for m in tp]
        if value not in names:
            hint = difflib.get_close_matches(str(value), [str(n) for n in names], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(key, f"unknown value {value!r}{extra}; choose one of {', '.join(map(str, names))}")
        return tp(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    name = key.rsplit(".", 1)[-1]
    hint = difflib.get_close_matches(name, known, n=1)
    extra = f" (did you mean {key[: len(key) - len(name)]}{hint[0]!r}?)" if hint else ""
    return ConfigError(key, f"unknown key{extra}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(str(dotted), names)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # pragma: no cover - defensive
        raise ConfigError(prefix.rstrip(".") or "config", str(err)) from None


def config_from_dict(data: Any) -> RunConfig:
    """Validate a nested mapping (e.g. parsed YAML) into a :class:`RunConfig`."""
    return _build(RunConfig, data, "")


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The nested mapping of plain values that :func:`config_from_dict` turns back into ``cfg``."""
    return _plain(dataclasses.asdict(cfg))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (dotted keys, YAML values) to a nested mapping, in order."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "an override must look like key=value, e.g. train.iterations=300")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        node = data
        cls: Any = RunConfig
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key(".".join(parts[: i + 1]), names)
            tp = typing.get_type_hints(cls)[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(key, "is a section; set one of its keys, e.g. " + f"{key}.{dataclasses.fields(tp)[0].name}=...")
                node[part] = _parse_scalar(text)
            else:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(".".join(parts[: i + 1]), "is not a section")
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node, cls = child, tp
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML file safely; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(str(path), f"cannot read config file: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"top level must be a mapping, got {type(data).__name__}")
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs installed with the package (the repository's ``configs/``), by name."""
    try:
        root = resources.files("supsup.configs")
    except ModuleNotFoundError:  # pragma: no cover - a broken install
        return {}
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: ``name_or_path`` itself when it exists, else the shipped config of that
    name (``demo``, ``permuted_mnist_gn``, ...)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    shipped = shipped_configs()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    hint = difflib.get_close_matches(str(name_or_path), shipped, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(str(name_or_path), f"no such file and no shipped config of that name{extra}; "
                                         "`supsup configs` lists them")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load YAML (a path, or a shipped config's name; defaults when None), apply ``--set``
    overrides, validate."""
    data = read_yaml(resolve_config(path)) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return config_from_dict(data)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (keys equal field names), atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
