"""Runs INSIDE the isolated torchtune environment (`.venv-torchtune`), never in the main venv.

    .venv-torchtune/bin/python workers/train/torchtune_entry.py --config run/torchtune.yaml

It runs torchtune's own `lora_finetune_single_device` recipe file, unchanged, with a config written by
`workers/train/torchtune_backend.py`. That config names three small components from this file
(imported by torchtune as `torchtune_entry.<name>`, since this file's folder is on `sys.path`):

- `token_dataset`: the training records, already tokenised by the parent with the HF tokenizer;
- `TokenizerStub`: the recipe insists on a tokenizer, but only reads its `pad_id`;
- `StdoutMetricLogger`: prints one `NEWSLORA_METRIC {json}` line per logged step, which the parent
  turns into progress events.

This file imports only the standard library, torch and torchtune: the project's own modules are not
installed in this environment.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import runpy
import sys
import time
from pathlib import Path
from typing import Any, Mapping

METRIC_PREFIX = "NEWSLORA_METRIC "
RECIPE = "lora_finetune_single_device"


class TokenDataset:
    """A map-style dataset of pre-tokenised examples read from a JSONL file of {"tokens", "labels"}.

    `labels` is aligned with `tokens` (the recipe shifts them), with -100 where no loss is taken.
    """

    def __init__(self, path: str) -> None:
        self._rows: list[dict[str, list[int]]] = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                row = json.loads(line)
                if len(row["tokens"]) != len(row["labels"]):
                    raise ValueError(f"{path}:{n}: tokens and labels differ in length")
                self._rows.append({"tokens": row["tokens"], "labels": row["labels"]})
        if not self._rows:
            raise ValueError(f"{path} holds no examples")

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self._rows[index]


def token_dataset(tokenizer: Any, path: str) -> TokenDataset:
    """The recipe calls a dataset builder with its tokenizer first; the tokens are already made."""
    del tokenizer
    return TokenDataset(path)


class TokenizerStub:
    """What the recipe reads from a tokenizer: the padding id for its collate function."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id


class StdoutMetricLogger:
    """A torchtune metric logger that prints JSON lines for the parent process to read."""

    def log(self, name: str, data: Any, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        row = {"step": int(step), "time": time.time()}
        for k, v in payload.items():
            row[k] = float(v.item() if hasattr(v, "item") else v)
        print(METRIC_PREFIX + json.dumps(row), flush=True)

    def log_config(self, config: Any) -> None:
        pass

    def close(self) -> None:
        pass


def recipe_path(name: str = RECIPE) -> Path:
    """The recipe file shipped in the torchtune wheel (its folder refuses to be imported as a package)."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.origin is None:
        raise SystemExit("torchtune is not installed in this environment: run `bash scripts/setup_torchtune_env.sh`")
    path = Path(spec.origin).parents[1] / "recipes" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"torchtune recipe {name} not found at {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the YAML written by torchtune_backend.py")
    args = parser.parse_args(argv)
    # The recipe's @config.parse reads its own argv.
    sys.argv = [RECIPE, "--config", args.config]
    runpy.run_path(str(recipe_path()), run_name="__main__")


if __name__ == "__main__":
    main()
