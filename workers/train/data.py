"""Training data: read a prepared dataset, tokenize it with its template, bucket it, collate batches.

Every prompt of a dataset starts with the same prefix (template header + instruction), so a batch
carries that prefix once (`prefix_ids`, shape (1, P)) and each row holds only its own tokens after it
(article + the template's tail + label + EOS). The trainer runs the prefix once per batch and attends
every row to its keys/values: the same loss as running the full sequences, at about half the tokens.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from core.contracts.base import ContractError
from core.contracts.dataset import DatasetMeta
from workers.modeling.codec import IGNORE, Example

SPLIT_FILES = ("train.jsonl", "validation.jsonl", "meta.json")


class DatasetNotPrepared(ValueError):
    """The dataset folder is not a prepared dataset (missing or malformed files)."""


@dataclass
class PreparedDataset:
    meta: DatasetMeta
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def load_prepared(dataset_dir: Path) -> PreparedDataset:
    """Read the train and validation records and meta.json that a prep job wrote.

    Raises:
        DatasetNotPrepared: a file is missing or unreadable, or meta.json does not match its contract.
    """
    dataset_dir = Path(dataset_dir)
    hint = "run a prep job (workers.data.prep.prepare_dataset) to make one"
    if not dataset_dir.is_dir():
        raise DatasetNotPrepared(f"dataset folder {dataset_dir} does not exist: {hint}")
    missing = [f for f in SPLIT_FILES if not (dataset_dir / f).is_file()]
    if missing:
        raise DatasetNotPrepared(f"{dataset_dir} is not a prepared dataset (missing {', '.join(missing)}): {hint}")
    try:
        meta = DatasetMeta.load(dataset_dir)
    except ContractError as e:
        raise DatasetNotPrepared(f"{e}: {hint}") from None
    splits = {name: _read_jsonl(dataset_dir / f"{name}.jsonl", hint) for name in ("train", "validation")}
    if not splits["train"]:
        raise DatasetNotPrepared(f"{dataset_dir / 'train.jsonl'} has no records: {hint}")
    unknown = {r["output"] for r in splits["train"] + splits["validation"]} - set(meta.label_names)
    if unknown:
        raise DatasetNotPrepared(f"{dataset_dir}: outputs {sorted(unknown)} are not among label_names "
                                 f"{meta.label_names}: {hint}")
    return PreparedDataset(meta=meta, train=splits["train"], validation=splits["validation"])


def _read_jsonl(path: Path, hint: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetNotPrepared(f"{path} line {n} is not JSON ({e}): {hint}") from None
        if not isinstance(row, dict) or not {"instruction", "input", "output"} <= row.keys():
            raise DatasetNotPrepared(f"{path} line {n} lacks instruction/input/output: {hint}")
        rows.append(row)
    return rows


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int,
                            chunk_batches: int = 16) -> list[list[int]]:
    """One epoch's batches of example indices: shuffled, then sorted by length within chunks of
    `chunk_batches` batches so each batch pads little, then the batch order shuffled again.

    Deterministic in (seed, epoch), so a resumed run only needs its position in this list.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: lengths[i])
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class TrainBatch:
    """A batch with its shared prefix split off; targets are already shifted (target[t] = label[t + 1])."""

    prefix_ids: torch.Tensor  # (1, P)
    input_ids: torch.Tensor  # (B, S) right-padded
    attention_mask: torch.Tensor  # (B, P + S): 1 on the prefix and real tokens
    targets: torch.Tensor  # (B, S): next-token targets for the suffix positions, IGNORE elsewhere
    prefix_targets: torch.Tensor | None  # (B, P): targets for the prefix positions, None when all IGNORE
    n_targets: int
    n_tokens: int  # real tokens, the prefix counted once per row (what the batch stands for)
    rows: list[int] | None = None  # the examples' indices in the training set, where the trainer sets them


def collate_train(examples: Sequence[Example], pad_id: int) -> TrainBatch:
    P = examples[0].prefix_len
    prefix = examples[0].input_ids[:P]
    S = max(len(e.input_ids) for e in examples) - P
    B = len(examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + S), dtype=torch.long)
    mask[:, :P] = 1
    shifted = torch.full((B, P + S), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        if e.input_ids[:P] != prefix:
            raise ValueError(f"example {e.id} does not start with the shared prompt prefix")
        n = len(e.input_ids) - P
        ids[b, :n] = torch.tensor(e.input_ids[P:])
        mask[b, P:P + n] = 1
        shifted[b, :P + n - 1] = torch.tensor(e.labels[1:])
    prefix_targets = shifted[:, :P]
    n_targets = int((shifted != IGNORE).sum())
    return TrainBatch(prefix_ids=torch.tensor([prefix]), input_ids=ids, attention_mask=mask,
                      targets=shifted[:, P:].contiguous(),
                      prefix_targets=prefix_targets.contiguous() if bool((prefix_targets != IGNORE).any()) else None,
                      n_targets=n_targets, n_tokens=int(mask.sum()))
