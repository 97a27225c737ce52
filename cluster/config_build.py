"""Typed configs from plain data: a YAML mapping and ``a.b=value`` overrides -> a tree of frozen dataclasses.

Usage::

    cfg = build(RunConfig, applied({"train": {"lr": 1e-4}}, ["runtime.overlap=true"]))

Generic over the dataclasses it fills (``cluster/config.py`` holds the run's tree and its checks): every value is
checked against its field's annotation, unknown keys are errors that list the valid ones, and a key that was renamed
is refused with its new name. Values in error messages pass through ``redaction.shown``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml

from cluster.redaction import shown


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} is a section; give a mapping, got {shown(key, value)}")
        return build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(a, value, key)
            except (ValueError, TypeError) as e:
                errors.append(str(e))
        raise ValueError(f"config key {key!r}: {shown(key, value)} fits none of {tp}: {errors}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"config key {key!r} must be one of {typing.get_args(tp)}, got {shown(key, value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} wants a list, got {shown(key, value)}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"config key {key!r} wants {len(args)} values, got {len(value)}")
        return tuple(coerce(a, v, key) for a, v in zip(args, value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "3e-5" as a string
        except ValueError:
            pass
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ValueError(f"config key {key!r} wants {getattr(tp, '__name__', tp)}, got {shown(key, value)}")


def build(cls: type, data: dict, prefix: str = "") -> Any:
    """Dataclass ``cls`` filled from mapping ``data`` (nested sections built in turn); ``prefix`` dots the keys named
    in errors (``train.``)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(prefix + n for n in names)}"
        )
    return cls(**{k: coerce(hints[k], v, prefix + k) for k, v in data.items()})


def merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, mappings merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def applied(data: dict, overrides: list[str] = ()) -> dict:
    """``data`` with ``a.b=value`` overrides merged in (each value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        node: dict = {}
        cursor = node
        parts = key.strip().split(".")
        for p in parts[:-1]:
            cursor = cursor.setdefault(p, {})
        cursor[parts[-1]] = yaml.safe_load(raw)
        data = merge(data, node)
    return data


def refuse_renamed(data: dict, renamed: dict[str, str]) -> None:
    """Raise naming the new key when ``data`` sets an old one of ``renamed`` ({old dotted key: new dotted key})."""
    for old, new in renamed.items():
        *path, last = old.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            raise ValueError(f"{old} was renamed: use {new}")


def moved(data: dict, renamed: dict[str, str]) -> dict:
    """``data`` with every old key of ``renamed`` moved to its new place (a new key already set wins); for configs
    written before the rename (a checkpoint keeps the config it was trained with)."""
    out = yaml.safe_load(yaml.safe_dump(data))  # a deep copy of plain data
    for old, new in renamed.items():
        *path, last = old.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        value = node.pop(last)
        *new_path, new_last = new.split(".")
        target = out
        for part in new_path:
            target = target.setdefault(part, {})
        target.setdefault(new_last, value)
    return out
