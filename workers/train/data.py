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

from workers.prompts import split_prompt

IGNORE = -100  # label value that the loss skips (the Hugging Face convention)
SPLIT_FILES = ("train.jsonl", "validation.jsonl", "meta.json")


class DatasetNotPrepared(ValueError):
    """The dataset folder is not a prepared dataset (missing or malformed files)."""


@dataclass
class PreparedDataset:
    meta: dict[str, Any]
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]


def load_prepared(dataset_dir: Path) -> PreparedDataset:
    """Read the train and validation records and meta.json that a prep job wrote.

    Raises:
        DatasetNotPrepared: a file is missing or unreadable, or meta.json lacks a required key.
    """
    dataset_dir = Path(dataset_dir)
    hint = "run a prep job (workers.prep.prepare_dataset) to make one"
    if not dataset_dir.is_dir():
        raise DatasetNotPrepared(f"dataset folder {dataset_dir} does not exist: {hint}")
    missing = [f for f in SPLIT_FILES if not (dataset_dir / f).is_file()]
    if missing:
        raise DatasetNotPrepared(f"{dataset_dir} is not a prepared dataset (missing {', '.join(missing)}): {hint}")
    try:
        meta = json.loads((dataset_dir / "meta.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetNotPrepared(f"{dataset_dir / 'meta.json'} is not valid JSON ({e}): {hint}") from None
    need = [k for k in ("label_names", "template", "instruction", "hash") if not meta.get(k)]
    if need:
        raise DatasetNotPrepared(f"{dataset_dir / 'meta.json'} lacks {', '.join(need)}: {hint}")
    splits = {name: _read_jsonl(dataset_dir / f"{name}.jsonl", hint) for name in ("train", "validation")}
    if not splits["train"]:
        raise DatasetNotPrepared(f"{dataset_dir / 'train.jsonl'} has no records: {hint}")
    unknown = {r["output"] for r in splits["train"] + splits["validation"]} - set(meta["label_names"])
    if unknown:
        raise DatasetNotPrepared(f"{dataset_dir}: outputs {sorted(unknown)} are not among label_names "
                                 f"{meta['label_names']}: {hint}")
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


@dataclass
class Example:
    """One tokenized record: the full sequence and its labels (Hugging Face layout, not shifted)."""

    id: str
    input_ids: list[int]  # prefix + article + tail + label + EOS
    labels: list[int]  # IGNORE on prompt tokens unless train_on_input
    prefix_len: int  # tokens of the shared prefix at the start of input_ids
    prompt_len: int  # tokens before the response
    label_index: int
    truncated: bool


class PromptEncoder:
    """Tokenizes records exactly as inference does: the whole prompt at once, split by character offsets.

    Args:
        tokenizer: a fast tokenizer (offsets are needed to find the article's tokens).
        template, instruction, label_names: from the dataset's meta.json.
        max_seq_len: cap on prompt + label + EOS; the article is cut to fit, never the template or label.

    Raises:
        ValueError: max_seq_len leaves no room for the article, or a label tokenizes to nothing.
    """

    def __init__(self, tokenizer: Any, *, template: str, instruction: str, label_names: Sequence[str],
                 max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.prefix_text, self.tail_text = split_prompt(instruction, "", template=template, tokenizer=tokenizer)
        self.prefix_ids: list[int] = tokenizer(self.prefix_text, add_special_tokens=True)["input_ids"]
        head = tokenizer(self.prefix_text + self.tail_text, add_special_tokens=True)["input_ids"]
        self.eos_id = tokenizer.eos_token_id
        # Labels as they follow the prompt (tokenized jointly with it), as inference scores them.
        self.label_ids: list[list[int]] = []
        for name in self.label_names:
            full = tokenizer(self.prefix_text + self.tail_text + name, add_special_tokens=True)["input_ids"]
            ids = full[len(head):] if full[:len(head)] == head else \
                tokenizer(name, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"label {name!r} tokenizes to nothing: rename it in the prep job")
            self.label_ids.append(ids)
        # The template's tail as it follows an article (alone after the prefix, newlines would merge).
        probe = tokenizer(self.prefix_text + "A" + self.tail_text, add_special_tokens=True,
                          return_offsets_mapping=True)
        tail_from = len(self.prefix_text) + 1
        self.tail_ids = [t for t, (s, _) in zip(probe["input_ids"], probe["offset_mapping"]) if s >= tail_from]
        tail_len = len(self.tail_ids)
        longest_response = max(len(ids) for ids in self.label_ids) + 1  # + EOS
        self.max_article_tokens = max_seq_len - len(self.prefix_ids) - tail_len - longest_response
        if self.max_article_tokens < 8:
            raise ValueError(f"max_seq_len {max_seq_len} leaves {self.max_article_tokens} tokens for the article "
                             f"(template {len(self.prefix_ids) + tail_len}, longest label + EOS "
                             f"{longest_response}): raise max_seq_len to at least "
                             f"{max_seq_len - self.max_article_tokens + 32}")

    def prompt_ids(self, texts: Sequence[str]) -> list[tuple[list[int], bool]]:
        """(per-item prompt tokens after the prefix: article cut to fit + tail, was it cut) for each text."""
        plen = len(self.prefix_text)
        P = len(self.prefix_ids)
        prompts = [self.prefix_text + t + self.tail_text for t in texts]
        enc = self.tokenizer(prompts, add_special_tokens=True, return_offsets_mapping=True)
        out = []
        for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            art_end = plen + len(text)
            start = P if ids[:P] == self.prefix_ids else next(
                (i for i, (s, _) in enumerate(offs) if s >= plen), len(ids))
            tail_start = next((i for i in range(start, len(ids))
                               if offs[i][0] >= art_end and offs[i][1] > offs[i][0]), len(ids))
            article, tail = ids[start:tail_start], ids[tail_start:]
            if len(article) > self.max_article_tokens:  # cut: the whole template tail follows, never a part
                out.append((article[:self.max_article_tokens] + self.tail_ids, True))
            else:
                out.append((article + tail, False))
        return out

    def encode(self, records: Sequence[dict[str, Any]], *, train_on_input: bool = False) -> list[Example]:
        """Tokenize records ({"id", "input", "output"}) into examples; the response is label + EOS."""
        index = {name: i for i, name in enumerate(self.label_names)}
        out = []
        for n, (rec, (body, cut)) in enumerate(zip(records, self.prompt_ids([r["input"] for r in records]))):
            li = index[rec["output"]]
            response = self.label_ids[li] + [self.eos_id]
            prompt = self.prefix_ids + body
            labels = (list(prompt) if train_on_input else [IGNORE] * len(prompt)) + response
            out.append(Example(id=str(rec.get("id", n)), input_ids=prompt + response, labels=labels,
                               prefix_len=len(self.prefix_ids), prompt_len=len(prompt), label_index=li,
                               truncated=cut))
        return out


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


@dataclass
class ScoreBatch:
    """Prompts (without responses) laid out for label scoring: bodies left-padded so every prompt ends in
    the last column, then each multi-token label's tokens after the first, as a branch per row."""

    prefix_ids: torch.Tensor  # (1, P)
    input_ids: torch.Tensor  # (B, S) left-padded prompt bodies
    attention_mask: torch.Tensor  # (B, P + S)
    position_ids: torch.Tensor  # (B, S)
    lengths: torch.Tensor  # (B,) body tokens of each row
    gold: torch.Tensor  # (B,) label index


def collate_scoring(examples: Sequence[Example], pad_id: int) -> ScoreBatch:
    P = examples[0].prefix_len
    bodies = [e.input_ids[P:e.prompt_len] for e in examples]
    B, S = len(examples), max(len(b) for b in bodies)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + S), dtype=torch.long)
    mask[:, :P] = 1
    pos = torch.full((B, S), P, dtype=torch.long)
    for r, body in enumerate(bodies):
        n = len(body)
        ids[r, S - n:] = torch.tensor(body)
        mask[r, P + S - n:] = 1
        pos[r, S - n:] = torch.arange(P, P + n)
    return ScoreBatch(prefix_ids=torch.tensor([examples[0].input_ids[:P]]), input_ids=ids, attention_mask=mask,
                      position_ids=pos, lengths=torch.tensor([len(b) for b in bodies]),
                      gold=torch.tensor([e.label_index for e in examples]))
