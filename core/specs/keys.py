"""Dotted spec keys (`train.lora.rank`): check one against a spec model, suggest the closest valid key, and
print validation errors as `field: message` lines.

Used by the CLI for `key=value` overrides before anything is submitted, and for the API's 422 answers.
"""
from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Iterable, Sequence

from pydantic import BaseModel


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (`Model`, `Model | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None


def _is_mapping(annotation: Any) -> bool:
    if annotation is dict or typing.get_origin(annotation) is dict:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_mapping(a) for a in typing.get_args(annotation))
    return False


def spec_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a spec model, nested models included (`prep.train.text_columns`)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        sub = _model_of(field.annotation)
        if sub is not None:
            keys += spec_keys(sub, key + ".")
    return keys


def _suggest(model: type[BaseModel], parts: list[str], i: int, siblings: Iterable[str]) -> list[str]:
    """Likely meant keys for `parts`, whose part `i` names no field among `siblings`."""
    head, bad, rest = parts[:i], parts[i], parts[i + 1:]
    close = difflib.get_close_matches(bad, list(siblings), n=1, cutoff=0.75)
    if close:  # a typo: train.lerning_rate -> train.learning_rate
        return [".".join([*head, close[0], *rest])]
    every = spec_keys(model)
    tail, under = ".".join(parts[i:]), ".".join(head)
    below = [k for k in every if k.startswith(under + ".")] if head else every
    nested = [k for k in below if k.endswith("." + tail)]
    if nested:  # the right name, one level too high: text_columns -> train.text_columns
        return nested[:3]
    elsewhere = [k for k in every if k == tail or k.endswith("." + tail)]
    if elsewhere:  # the right name at another level: train.model -> model
        return elsewhere[:3]
    by_last = {k.rsplit(".", 1)[-1]: k for k in reversed(below)}
    close = difflib.get_close_matches(parts[-1], list(by_last), n=1, cutoff=0.8)
    return [by_last[close[0]]] if close else []  # a typo one level too high: lerning_rate -> train.learning_rate


def check_key(model: type[BaseModel], key: str) -> str | None:
    """None where `key` (dotted) names a field of `model`, else what is wrong and the closest valid key.

    >>> check_key(PipelineSpec, "train.lerning_rate")
    'unknown key train.lerning_rate; did you mean train.learning_rate?'
    """
    parts = key.split(".")
    node: type[BaseModel] | None = model
    for i, part in enumerate(parts):
        fields = node.model_fields
        if part not in fields:
            meant = _suggest(model, parts, i, fields)
            if meant:
                return f"unknown key {key}; did you mean {' or '.join(meant)}?"
            where = ".".join(parts[:i]) or "the top level"
            return f"unknown key {key} (keys at {where}: {', '.join(fields)})"
        annotation = fields[part].annotation
        node = _model_of(annotation)
        if node is None and i < len(parts) - 1:
            if _is_mapping(annotation):
                return None  # a free mapping: any key below it
            return f"cannot set {key}: {'.'.join(parts[:i + 1])} is a single value, not a mapping"
    return None


def error_lines(errors: Sequence[dict[str, Any]], model: type[BaseModel] | None = None) -> list[str]:
    """Validation errors (pydantic's, or the API's 422 `detail` items) as `field: message` lines; an unknown
    key gets the closest valid key where the spec model is known."""
    lines = []
    for err in errors:
        loc = [str(p) for p in err.get("loc") or ()]
        if loc[:2] == ["body", "spec"]:
            loc = loc[2:]
        key = ".".join(loc)
        if err.get("type") == "extra_forbidden" and model is not None and loc:
            hint = check_key(model, key)
            if hint:
                lines.append(hint)
                continue
        msg = str(err.get("msg", err))
        lines.append(f"{key}: {msg}" if key else msg)
    return lines
