"""Runs INSIDE the isolated torchtune environment (`.venv-torchtune`), never in the main venv.

    .venv-torchtune/bin/python workers/train/torchtune/entry.py --config run/torchtune.yaml --parent-pid 1234

It runs torchtune's own `lora_finetune_single_device` recipe file, unchanged, with a config written by
`workers/train/torchtune/recipe.py`. That config names small components from this file (imported by
torchtune as `entry.<name>`, a top-level module, since this file's folder is on `sys.path`):

- `token_dataset`: the training records, already tokenised by the parent with the HF tokenizer, in
  the exact order of training;
- `TokenizerStub`: the recipe insists on a tokenizer, but only reads its `pad_id`;
- `MetricLoggers`: prints one `NEWSLORA_METRIC {json}` line per logged step, which the parent turns
  into progress events, and logs to W&B through torchtune's own `WandBLogger` when the config asks;
- `cosine_schedule_with_warmup`: torchtune's schedule over the run's real step count;
- `snapshot_checkpointer`: torchtune's HF checkpointer, plus an atomic copy of each intermediate
  checkpoint (adapter + recipe state) that a restarted job resumes from.

Resuming: torchtune's recipe checkpoints at epoch ends only. So each recipe "epoch" here is one chunk
of `save_every` optimizer steps: `ChunkSampler` (put in place of the recipe's sampler) serves epoch e
the e-th chunk of the token file, and the recipe's own `resume_from_checkpoint` continues at the next
chunk. A killed run loses at most the steps since its last chunk, like the PEFT loop's `save_every`.

If the parent process dies (a SIGKILLed worker), this process exits within a fraction of a second, so
a re-delivered job never finds an orphan still writing into its folder.

This file imports only the standard library, PyYAML, torch and torchtune (and wandb through torchtune,
when asked): the project's own modules are not installed in this environment, so the snapshot's
write-aside-and-rename is done here rather than with core.atomic. The main venv imports it too (for the
line prefixes and its path), so torch and torchtune are imported inside the functions that run here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import runpy
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

ENTRY = Path(__file__).resolve()
COMPONENTS = ENTRY.stem  # the module name torchtune imports this file's components by (the recipe's config)
# Lines printed for the parent process (workers/train/torchtune/process.py) to read:
METRIC_PREFIX = "NEWSLORA_METRIC "  # one optimizer step's metrics
CHECKPOINT_PREFIX = "NEWSLORA_CHECKPOINT "  # a chunk's checkpoint is written
WARNING_PREFIX = "NEWSLORA_WARNING "  # becomes a warning event
RECIPE = "lora_finetune_single_device"
RECIPE_STATE = "recipe_state.pt"
ADAPTER_PT = "adapter_model.pt"  # torchtune's own adapter format, what its resume reads
PARENT_POLL_S = 0.2


# ---------------------------------------------------------------------------------------------
# Data


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


class ChunkSampler:
    """Stands in for the recipe's `StatefulDistributedSampler`: epoch e yields samples
    [e * chunk_samples, (e + 1) * chunk_samples) of the token file, in order.

    Its length is the whole file, so the recipe sees more batches than `max_steps_per_epoch` and keeps
    its global step across a resume (epochs_run x steps per chunk). Its saved state is not needed: a
    chunk always starts at its first sample, since torchtune checkpoints only at chunk ends.
    """

    chunk_samples: int = 0  # set by main() from the config's newslora.chunk_samples

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False) -> None:
        if shuffle:
            raise ValueError("the token file is already in training order: the config must set shuffle: false")
        if self.chunk_samples < 1:
            raise ValueError("ChunkSampler.chunk_samples is not set")
        self.dataset = dataset
        self.epoch = 0
        self.yielded = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        start = self.epoch * self.chunk_samples
        self.yielded = 0
        for index in range(start, min(start + self.chunk_samples, len(self.dataset))):
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state  # chunks restart at their first sample


class TokenizerStub:
    """What the recipe reads from a tokenizer: the padding id for its collate function."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id


# ---------------------------------------------------------------------------------------------
# Metrics and W&B


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


class MetricLoggers:
    """The stdout logger, plus torchtune's own `WandBLogger` when `wandb` holds its arguments.

    Without the wandb package in this environment, a warning line tells the parent (which records
    it as a job event) and the run goes on with stdout metrics only, as the PEFT loop does.
    """

    def __init__(self, wandb: Mapping[str, Any] | None = None) -> None:
        self._loggers: list[Any] = [StdoutMetricLogger()]
        if wandb is None:
            return
        if importlib.util.find_spec("wandb") is None:
            print(WARNING_PREFIX + "wandb is not installed in the torchtune environment: metrics go to "
                  "metrics.jsonl only (`bash scripts/setup_torchtune_env.sh` installs it)", flush=True)
            return
        from torchtune.training.metric_logging import WandBLogger  # lazy: torchtune is in the torchtune venv only
        self._loggers.append(WandBLogger(**_plain(wandb)))

    def log(self, name: str, data: Any, step: int) -> None:
        for logger in self._loggers:
            logger.log(name, data, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        for logger in self._loggers:
            logger.log_dict(payload, step)

    def log_config(self, config: Any) -> None:
        for logger in self._loggers:
            logger.log_config(config)

    def close(self) -> None:
        for logger in self._loggers:
            logger.close()


def _plain(value: Any) -> Any:
    """An OmegaConf node (what torchtune's instantiate passes) as plain dicts and lists."""
    try:
        from omegaconf import OmegaConf  # lazy: torchtune's dependency, in the torchtune venv only
    except ImportError:
        return dict(value)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else dict(value)


# ---------------------------------------------------------------------------------------------
# Schedule and checkpoints


def cosine_schedule_with_warmup(optimizer: Any, num_warmup_steps: int, total_steps: int,
                                num_training_steps: int | None = None, last_epoch: int = -1) -> Any:
    """torchtune's cosine schedule with warm-up over `total_steps`.

    The recipe passes num_training_steps = epochs x steps per epoch, which overshoots when the last
    chunk is shorter than the others; the run's real step count is used instead.
    """
    from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup  # lazy: torchtune venv only
    del num_training_steps
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=num_warmup_steps,
                                           num_training_steps=total_steps, last_epoch=last_epoch)


def snapshot_checkpointer(*, snapshot_dir: str, steps_per_chunk: int, **kwargs: Any) -> Any:
    """torchtune's `FullModelHFCheckpointer` that also snapshots each intermediate checkpoint.

    torchtune overwrites `recipe_state/recipe_state.pt` in place at each chunk's end, so a kill in the
    middle of a save would leave nothing to resume from. After each intermediate save, the chunk's
    torchtune-format adapter and the recipe state are copied to `snapshot_dir/epoch_N` (written aside
    and renamed into place; older snapshots removed), and a `NEWSLORA_CHECKPOINT` line tells the parent.
    """
    from torchtune.training import FullModelHFCheckpointer  # lazy: torchtune venv only

    class SnapshotCheckpointer(FullModelHFCheckpointer):
        def save_checkpoint(self, state_dict: dict[str, Any], epoch: int, intermediate_checkpoint: bool = False,
                            adapter_only: bool = False) -> None:
            super().save_checkpoint(state_dict, epoch, intermediate_checkpoint=intermediate_checkpoint,
                                    adapter_only=adapter_only)
            if intermediate_checkpoint:
                write_snapshot(Path(self._output_dir), Path(snapshot_dir), epoch)
            print(CHECKPOINT_PREFIX + json.dumps({"epoch": epoch, "step": (epoch + 1) * steps_per_chunk,
                                                  "final": not intermediate_checkpoint}), flush=True)

    return SnapshotCheckpointer(**kwargs)


def write_snapshot(output_dir: Path, snapshot_dir: Path, epoch: int) -> Path:
    """Copy epoch_N's torchtune adapter and the recipe state to snapshot_dir/epoch_N, atomically."""
    final = snapshot_dir / f"epoch_{epoch}"
    tmp = snapshot_dir / f".tmp-epoch_{epoch}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(output_dir / f"epoch_{epoch}" / ADAPTER_PT, tmp / ADAPTER_PT)
    shutil.copy2(output_dir / "recipe_state" / RECIPE_STATE, tmp / RECIPE_STATE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in snapshot_dir.glob("epoch_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Running the recipe


def recipe_path(name: str = RECIPE) -> Path:
    """The recipe file shipped in the torchtune wheel (its folder refuses to be imported as a package)."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or spec.origin is None:
        raise SystemExit("torchtune is not installed in this environment: run `bash scripts/setup_torchtune_env.sh`")
    path = Path(spec.origin).parents[1] / "recipes" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"torchtune recipe {name} not found at {path}")
    return path


def exit_with_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> threading.Thread:
    """A daemon thread that ends this process when its parent is gone (we were re-parented)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(137)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def use_chunk_sampler(chunk_samples: int) -> None:
    """Put ChunkSampler where the recipe imports its sampler from (before the recipe is run)."""
    import torchdata.stateful_dataloader.sampler as samplers  # lazy: torchtune venv only
    ChunkSampler.chunk_samples = chunk_samples
    samplers.StatefulDistributedSampler = ChunkSampler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the YAML written by recipe.recipe_config")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)
    own = (yaml.safe_load(Path(args.config).read_text()) or {}).get("newslora") or {}
    if own.get("chunk_samples"):
        use_chunk_sampler(int(own["chunk_samples"]))
    # The recipe's @config.parse reads its own argv.
    sys.argv = [RECIPE, "--config", args.config]
    runpy.run_path(str(recipe_path()), run_name="__main__")


if __name__ == "__main__":
    main()
