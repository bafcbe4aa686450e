"""Pipeline presets (`configs/*.yaml`): load, apply `key=value` overrides, substitute `${vars}`.

A preset's `vars:` block holds values used elsewhere as `${name}` (e.g. `data_dir`); an override whose
key names a var sets it (`data_dir=/data/ag_news`), any other sets a spec key (`train.max_steps=20`).
Relative local paths are made absolute here, since the worker runs in another directory.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from api_client.cli import apply_overrides, parse_value

_VAR = re.compile(r"\$\{(\w+)\}")


class ConfigError(ValueError):
    pass


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
                    raise ConfigError(f"prep.{split}.path: {p} does not exist (set data_dir=<folder with "
                                      f"train.jsonl and test.csv>, or use the hub id)")
                src["path"] = str(p.resolve())


def load_pipeline_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The pipeline spec (a dict for PipelineSpec) from a preset file and overrides.

    Raises:
        ConfigError: missing file, not YAML, an undefined ${var}, a missing data file.
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
    apply_overrides(raw, spec_overrides)
    spec = _substitute(raw, vars_)
    if isinstance(spec.get("prep"), dict):
        _absolute_sources(spec["prep"])
    return spec
