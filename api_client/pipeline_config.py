"""Pipeline presets (`configs/*.yaml`) and `key=value` overrides: load, override, substitute `${vars}`.

A preset's `vars:` block holds values used elsewhere as `${name}` (e.g. `data_dir`); an override whose
key names a var sets it (`data_dir=/data/ag_news`), any other sets a spec key (`train.max_steps=20`).
An override key that names no field of the spec is refused with the closest valid key
(`train.lerning_rate` -> "did you mean train.learning_rate?"), before anything is submitted.
Relative local paths are made absolute here, since the worker runs in another directory.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from core.specs import PipelineSpec
from core.specs.keys import check_key, error_lines

_VAR = re.compile(r"\$\{(\w+)\}")


class ConfigError(ValueError):
    """A preset or an override that cannot be used; the message says what to change."""


def parse_value(raw: str) -> Any:
    """'3' -> 3, 'true' -> True, '[a, b]' -> ['a', 'b'], 'null' -> None; anything else stays a string."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(spec: dict[str, Any], overrides: list[str],
                    model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a nested dict (in place; returns it).

    Args:
        model: the spec model the dict is for; each key must name one of its fields (nested ones too).

    Raises:
        ConfigError: an item is not key=value, a key names no field of `model` (with the closest valid key),
            or a key goes below a value that is not a mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
        key, raw = item.split("=", 1)
        problem = check_key(model, key) if model is not None else None
        if problem:
            raise ConfigError(problem)
        node = spec
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {p} is not a mapping")
        node[parts[-1]] = parse_value(raw)
    return spec


def _substitute(node: Any, vars_: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, vars_) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, vars_) for v in node]
    if isinstance(node, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in vars_:
                raise ConfigError(f"${{{m.group(1)}}} is used but not defined under vars:")
            return str(vars_[m.group(1)])
        return _VAR.sub(repl, node)
    return node


def _absolute_sources(prep: dict[str, Any]) -> None:
    for split in ("train", "test"):
        src = prep.get(split)
        if isinstance(src, dict) and isinstance(src.get("path"), str):
            p = Path(src["path"]).expanduser()
            if src.get("format") != "hub" and (p.exists() or src["path"].startswith((".", "/", "~"))):
                if not p.exists():
                    raise ConfigError(f"prep.{split}.path: {p} does not exist: put {p.name} in {p.parent}, set "
                                      f"data_dir=<the folder that holds it>, or read the data from the hub "
                                      f"(AG News: prep.train.path=fancyzhx/ag_news prep.test.path=fancyzhx/ag_news)")
                src["path"] = str(p.resolve())


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The pipeline spec (a dict for PipelineSpec) from a preset file and overrides.

    Raises:
        ConfigError: missing file, not YAML, an undefined ${var}, a missing data file, an unknown override
            key, or a spec that does not validate (one `field: message` line per error, e.g.
            `train.lora.rank: Input should be greater than or equal to 1`).
    """
    path = Path(path)
    if not path.exists():
        presets = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
        raise ConfigError(f"no config at {path}; presets: {', '.join(presets)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    vars_ = dict(raw.pop("vars", None) or {})
    spec_overrides = []
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key in vars_:
            vars_[key] = parse_value(value)
        else:
            spec_overrides.append(item)
    apply_overrides(raw, spec_overrides, PipelineSpec)
    spec = _substitute(raw, vars_)
    if isinstance(spec.get("prep"), dict):
        _absolute_sources(spec["prep"])
    check_spec(PipelineSpec, spec)
    return spec


def check_spec(model: type[BaseModel], spec: dict[str, Any]) -> None:
    """Validate a spec dict as the API will, so that a bad value is refused before anything starts.

    Raises:
        ConfigError: one `field: message` line per error (an unknown key with the closest valid key).
    """
    try:
        model.model_validate(spec)
    except ValidationError as e:
        raise ConfigError("\n".join(error_lines(e.errors(include_url=False), model))) from None
