"""Training throughput of the torchtune backend: a few optimizer steps of `train_torchtune`.

    python bench/torchtune_throughput.py                    # SmolLM2-135M, 64 AG News articles, 6 steps
    python bench/torchtune_throughput.py --steps 3 --model /path/to/checkpoint

`bench/train_throughput.py --with-torchtune` times it beside the PEFT loops. Needs the isolated torchtune
environment (`bash scripts/setup_torchtune_env.sh`). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.context import LocalContext  # noqa: E402
from core.contracts.dataset import DatasetMeta, SplitFile  # noqa: E402
from core.contracts.metrics import METRICS_FILE  # noqa: E402
from core.settings import get_settings  # noqa: E402
from core.specs.train import TrainSpec  # noqa: E402
from core.version import code_version  # noqa: E402
from workers.modeling.prompts import default_instruction  # noqa: E402
from workers.modeling.registry import pick_device  # noqa: E402
from workers.train.torchtune import TORCHTUNE_VERSION, train_torchtune  # noqa: E402
from workers.train.torchtune.recipe import recipe_dtype  # noqa: E402


def torchtune_tokens_per_s(model: str = "smollm2-135m", *, steps: int = 6, batch_size: int = 16,
                           max_seq_len: int = 160, dtype: str = "auto", device: str = "auto",
                           dataset_dir: Path | None = None, n_records: int = 64,
                           work_dir: Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Training throughput of the torchtune backend, for `bench/train_throughput.py`.

    Runs `train_torchtune` for a few optimizer steps with the spec's default LoRA and reports real
    tokens (prompt + response, padding excluded, as the PEFT loop counts them) per second over the
    steps after the first. Startup (subprocess, torchtune import, checkpoint load, adapter export) is
    reported apart as startup_s.

    Args:
        model: a model preset or checkpoint folder.
        steps, batch_size, max_seq_len, dtype, device: as in TrainSpec.
        dataset_dir: a prepared dataset; by default `n_records` AG News articles from the shared data
            ($NEWSLORA_SHARED_DATA/ag_news/train.jsonl) are written in the prepared format.
        work_dir: where the run goes (a temporary folder by default, removed afterwards).

    Returns:
        {"backend", "model", "tokens_per_s", "steps", "batch_size", "max_seq_len", "dtype", "device",
         "wall_s", "train_s", "startup_s", "loss_first", "loss_last", "versions"}.
    """
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="newslora-tt-bench-")
        work_dir = Path(tmp.name)
    work_dir = Path(work_dir)
    try:
        if dataset_dir is None:
            dataset_dir = _ag_news_bench_dataset(work_dir / "dataset", n_records)
        spec = TrainSpec(dataset_id=1, model=model, backend="torchtune", max_steps=steps, batch_size=batch_size,
                         max_seq_len=max_seq_len, dtype=dtype, device=device, warmup_steps=1, seed=seed)
        t0 = time.perf_counter()
        result = train_torchtune(spec, dataset_dir, work_dir / "out", LocalContext(work_dir=work_dir))
        wall = time.perf_counter() - t0
        steps_rows = [json.loads(line) for line in (work_dir / "out" / METRICS_FILE).read_text().splitlines()
                      if "loss" in json.loads(line)]
        dev = pick_device(device)
        return {
            "backend": "torchtune",
            "model": model,
            "tokens_per_s": result.metrics.tokens_per_s,
            "steps": steps,
            "batch_size": batch_size,
            "max_seq_len": max_seq_len,
            "dtype": recipe_dtype(spec, dev),
            "device": dev,
            "wall_s": wall,
            "train_s": result.metrics.train_s,
            "startup_s": wall - _steady_seconds(result.metrics.tokens_per_s, steps_rows),
            "loss_first": steps_rows[0]["loss"],
            "loss_last": steps_rows[-1]["loss"],
            "versions": {"torchtune": TORCHTUNE_VERSION},
        }
    finally:
        if tmp is not None:
            tmp.cleanup()


def _steady_seconds(rate: float | None, steps: list[dict[str, Any]]) -> float:
    tokens = sum(r.get("tokens") or 0 for r in steps[1:])
    return tokens / rate if rate else 0.0


def _ag_news_bench_dataset(root: Path, n_records: int) -> Path:
    """A prepared-dataset folder of the first n AG News training articles from the shared data
    (Settings.shared_data, $NEWSLORA_SHARED_DATA), its meta.json a `DatasetMeta` as a prep job writes it."""
    shared = get_settings().shared_data / "ag_news"
    if not (shared / "train.jsonl").is_file():
        raise FileNotFoundError(f"no AG News data at {shared}: set NEWSLORA_SHARED_DATA, or pass dataset_dir")
    labels = (shared / "classes.txt").read_text().split("\n") if (shared / "classes.txt").is_file() else []
    labels = [x.strip() for x in labels if x.strip()] or ["World", "Sports", "Business", "Sci/Tech"]
    instruction = default_instruction(labels)
    root.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with (shared / "train.jsonl").open(encoding="utf-8") as src, (root / "train.jsonl").open("w") as dst:
        for i, line in enumerate(src):
            if i >= n_records:
                break
            row = json.loads(line)
            dst.write(json.dumps({"id": str(i), "instruction": instruction, "input": row["text"],
                                  "output": labels[row["label"]], "label_id": row["label"]}) + "\n")
            counts[labels[row["label"]]] = counts.get(labels[row["label"]], 0) + 1
    (root / "validation.jsonl").write_text("")
    splits = {name: SplitFile(file=f"{name}.jsonl", records=n,
                              sha256=hashlib.sha256((root / f"{name}.jsonl").read_bytes()).hexdigest())
              for name, n in (("train", sum(counts.values())), ("validation", 0))}
    DatasetMeta(name=f"ag-news-first-{n_records}", hash=f"ag-news-first-{n_records}",
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), code_version=code_version(),
                sources={"train": {"path": str(shared / "train.jsonl"), "first": n_records}}, label_names=labels,
                label_map={name: i for i, name in enumerate(labels)}, template="alpaca", instruction=instruction,
                splits=splits, counts={"train": counts, "validation": {}}, spec={"bench": "torchtune_throughput"}
                ).save(root)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=160)
    ap.add_argument("--records", type=int, default=64)
    args = ap.parse_args()
    print(json.dumps(torchtune_tokens_per_s(args.model, steps=args.steps, batch_size=args.batch_size,
                                            max_seq_len=args.max_seq_len, n_records=args.records), indent=2))


if __name__ == "__main__":
    main()
