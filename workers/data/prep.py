"""Data preparation: a labeled news set -> Alpaca-style instruction records, written as a fixed artifact.

`prepare_dataset(spec, out_dir, ctx)` reads the train and test sources (see `workers/data/loaders.py`),
cleans the AG News escapes, drops bad rows (or fails on the first one), removes exact duplicates within
and across splits, draws a stratified validation split and any per-class caps with a seed, measures
token lengths, and writes `train.jsonl`, `validation.jsonl`, `test.jsonl` and `meta.json` into
`out_dir`. Training and inference read that folder through `load_records` and `read_meta`, and nothing
else. One record:

    {"id": "test-42", "instruction": "Classify this news article as ...", "input": "<cleaned text>",
     "output": "Sports", "label_id": 1}

`id` is the source (train or test, the PrepSpec field) and the record's row in that source's file, so
it stays the same whatever the seed; validation records are drawn from the train source and keep
`train-<row>` ids.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from core.atomic import atomic_dir
from core.contracts.base import ContractError
from core.contracts.dataset import DatasetMeta
from core.context import JobContext
from workers.data.clean import clean_text
from workers.data.chat_formats import NOT_TRAINED
from workers.data.loaders import LoadedSource, PrepError, label_names_in, load_source
from workers.modeling.prompts import default_instruction, split_prompt
from workers.modeling.registry import ModelNotFound, load_tokenizer
from core.specs.prep import AG_NEWS_LABELS, PrepSpec
from core.version import code_version

__all__ = ["PrepError", "prepare_dataset", "load_records", "read_meta", "clean_text", "token_lengths",
           "SPLITS", "META_VERSION"]

SPLITS = ("train", "validation", "test")
META_VERSION = DatasetMeta.FORMAT_VERSION
PHASES = ("setup", "load", "clean", "dedupe", "split", "tokenize", "write")

# More distinct string labels than this is a label_column that holds something else (a title, an id).
MAX_LABELS_FROM_DATA = 256

# Rows dropped for these reasons are not bad input: they are counted in meta.json but never fail a run.
# NOT_TRAINED: an OpenAI chat line whose every assistant turn has weight 0 (workers/data/chat_formats.py).
NOT_BAD = frozenset({"blank_line", "duplicate", "duplicate_label_conflict", "in_test", "in_validation", "over_cap",
                     NOT_TRAINED})

# ---------------------------------------------------------------------------------------------------
# Rows -> examples
# ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Example:
    source: str  # "train" or "test"
    row: int
    text: str
    label_id: int
    raw: str


class DropLog:
    """Counts dropped rows per source and reason, and raises on bad input where on_bad_rows is "fail"."""

    def __init__(self, on_bad_rows: str) -> None:
        self.on_bad_rows = on_bad_rows
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.first_rows: dict[tuple[str, str], list[int]] = defaultdict(list)

    def drop(self, src: LoadedSource, row: int, reason: str, detail: str) -> None:
        if reason not in NOT_BAD and self.on_bad_rows == "fail":
            raise PrepError(f"{src.where} {src.unit} {row} {detail}; fix the row, or set on_bad_rows='skip' "
                            f"to drop such rows and count them in meta.json")
        self.counts[src.key][reason] += 1
        if len(self.first_rows[src.key, reason]) < 5:
            self.first_rows[src.key, reason].append(row)

    def totals(self) -> dict[str, int]:
        total: Counter = Counter()
        for c in self.counts.values():
            total.update(c)
        return dict(sorted(total.items()))

    def report(self, ctx: JobContext, sources: dict[str, LoadedSource]) -> None:
        for key, counts in self.counts.items():
            for reason, n in sorted(counts.items()):
                level = "info" if reason in NOT_BAD else "warning"
                ctx.event(f"prep: dropped {n} row(s) of {sources[key].where}: {reason}", level=level,
                          metrics={"source": key, "reason": reason, "count": n,
                                   f"first_{sources[key].unit}s": self.first_rows[key, reason]})


def _label_id(value: Any, id_names: dict[int, str], label_index: dict[str, int]) -> tuple[int | None, str]:
    """(label id in the dataset's label_names, "") or (None, what is wrong)."""
    if isinstance(value, str):
        v = value.strip()
        if v in label_index:
            return label_index[v], ""
        if v.lstrip("-").isdigit():
            value = int(v)
        else:
            return None, f"has label {value!r}, which is not one of label_names ({', '.join(label_index)})"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None, f"has label {value!r} ({type(value).__name__}): give a label name or an integer id"
    name = id_names.get(value)
    if name is None:
        known = f"ids {min(id_names)}-{max(id_names)}" if id_names else "empty"  # never the classes file's names
        return None, f"has label {value}, outside the label map ({known}): fix the label, or check first_label_id"
    if name not in label_index:
        return None, (f"has label {value}, which this source's label map names, not one of label_names "
                      f"({', '.join(label_index)}): add it to label_names")
    return label_index[name], ""


def _examples(src: LoadedSource, spec: PrepSpec, label_names: list[str], drops: DropLog,
              cleaned: Counter) -> list[Example]:
    """Clean and check each row of a source; bad rows fail the run or are dropped and counted."""
    label_index = {n: i for i, n in enumerate(label_names)}
    out = []
    for r in src.rows:
        if r.problem:
            drops.drop(src, r.row, r.problem, r.detail)
            continue
        label_id, why = _label_id(r.label, src.id_names, label_index)
        if label_id is None:
            drops.drop(src, r.row, "unknown_label", why)
            continue
        raw = " ".join(r.texts)
        text, counts = clean_text(raw, line_breaks=spec.line_breaks)
        if not text:
            drops.drop(src, r.row, "empty_text", "has no text (empty after cleaning): fill it in or remove the row")
            continue
        if len(text) > spec.max_text_chars:
            drops.drop(src, r.row, "too_long",
                       f"has {len(text):,} characters of text, over max_text_chars={spec.max_text_chars:,}: "
                       f"is it one article? raise max_text_chars if it is")
            continue
        cleaned.update(counts)
        out.append(Example(src.key, r.row, text, label_id, raw))
    if not out:
        dropped = ", ".join(f"{k}: {v}" for k, v in sorted(drops.counts[src.key].items())) or "none"
        raise PrepError(f"{src.where}: no usable rows ({len(src.rows)} read; dropped: {dropped}); check the "
                        f"file's format and its text_columns / label_column")
    return out


def _dedupe(examples: list[Example], src: LoadedSource, drops: DropLog,
            elsewhere: set[str] | None = None, elsewhere_reason: str = "in_test") -> list[Example]:
    """Keep the first of each exact text; drop a text found in `elsewhere` (the test split) too."""
    seen: dict[str, int] = {}
    kept = []
    for ex in examples:
        if elsewhere is not None and ex.text in elsewhere:
            drops.drop(src, ex.row, elsewhere_reason, "")
        elif ex.text in seen:
            drops.drop(src, ex.row, "duplicate" if seen[ex.text] == ex.label_id else "duplicate_label_conflict", "")
        else:
            seen[ex.text] = ex.label_id
            kept.append(ex)
    return kept


def _by_class(examples: list[Example]) -> dict[int, list[Example]]:
    groups: dict[int, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex.label_id].append(ex)
    return dict(sorted(groups.items()))


def _split_train(examples: list[Example], spec: PrepSpec, src: LoadedSource,
                 drops: DropLog) -> tuple[list[Example], list[Example]]:
    """(train, validation): validation_fraction of each class, drawn with the seed; max_per_class caps train.

    Under a cap, validation keeps validation_fraction of train + validation, so it shrinks with train.
    """
    f, cap = spec.validation_fraction, spec.max_per_class
    train, val = [], []
    for label_id, items in _by_class(examples).items():
        items = items[:]
        random.Random(f"{spec.seed}:validation:{label_id}").shuffle(items)
        n_val = int(f * len(items) + 0.5)
        if f > 0 and len(items) >= 2:
            n_val = min(max(n_val, 1), len(items) - 1)  # every class in both, where it has two rows
        if cap is not None:
            n_val = min(n_val, int(cap * f / (1 - f) + 0.5))
        val += items[:n_val]
        rest = items[n_val:]
        keep = rest if cap is None else rest[:cap]
        train += keep
        for ex in rest[len(keep):]:
            drops.drop(src, ex.row, "over_cap", "")
    return train, val


def _cap_test(examples: list[Example], spec: PrepSpec, src: LoadedSource, drops: DropLog) -> list[Example]:
    """A seeded sample of test_max_per_class rows a class (all of a smaller class)."""
    cap = spec.test_max_per_class
    if cap is None:
        return examples
    kept = []
    for label_id, items in _by_class(examples).items():
        chosen = items if len(items) <= cap else random.Random(f"{spec.seed}:test:{label_id}").sample(items, cap)
        chosen_rows = {ex.row for ex in chosen}
        for ex in items:
            if ex.row in chosen_rows:
                kept.append(ex)
            else:
                drops.drop(src, ex.row, "over_cap", "")
    return kept


def _record(ex: Example, spec: PrepSpec, label_names: list[str], instruction: str) -> dict[str, Any]:
    rec = {"id": f"{ex.source}-{ex.row}", "instruction": instruction, "input": ex.text,
           "output": label_names[ex.label_id], "label_id": ex.label_id}
    if spec.keep_raw:
        rec["raw"] = ex.raw
    return rec


# ---------------------------------------------------------------------------------------------------
# Token lengths
# ---------------------------------------------------------------------------------------------------

def _load_tokenizer(spec: PrepSpec):
    if spec.tokenizer is None:
        return None
    try:
        tok = load_tokenizer(spec.tokenizer)
    except ModelNotFound as e:
        raise PrepError(f"tokenizer {spec.tokenizer!r}: {e}") from None
    if spec.template == "chat" and not getattr(tok, "chat_template", None):
        raise PrepError(f"template 'chat' needs a tokenizer with a chat template and {spec.tokenizer!r} has none: "
                        f"use template 'alpaca', or a tokenizer that has one")
    return tok


def _prefix_is_separable(tokenizer, prefix: str) -> bool:
    """True where tokens(prefix + suffix) == tokens(prefix) + tokens(suffix) for a suffix starting with a
    non-space: a byte-level BPE whose pre-tokenizer regex always cuts after the prefix's final newline."""
    from tokenizers.pre_tokenizers import ByteLevel
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or not prefix.endswith("\n"):
        return False
    pre = backend.pre_tokenizer
    return isinstance(pre, ByteLevel) and bool(getattr(pre, "use_regex", False))


def _full_lengths(tokenizer, texts: list[str]) -> list[int]:
    enc = tokenizer(texts, return_attention_mask=False, return_token_type_ids=False)
    return [len(ids) for ids in enc["input_ids"]]


def token_lengths(tokenizer, instruction: str, inputs: Sequence[str], outputs: Sequence[str], *,
                  template: str = "alpaca", exact_check: int = 32) -> tuple[list[int], str]:
    """Token counts of each full rendered prompt + response (`render_prompt(...) + output`), batched.

    The prompt's shared prefix (header and instruction) is tokenized once where the tokenizer allows it
    (see `_prefix_is_separable`), and the first `exact_check` rows are checked against whole-prompt
    encodings; otherwise, or on any mismatch, every whole prompt is encoded in one batch.

    Returns:
        (lengths, method): method is "prefix+suffix" or "full".
    """
    prefix, after = split_prompt(instruction, "", template=template, tokenizer=tokenizer)
    suffixes = [i + after + o for i, o in zip(inputs, outputs)]
    if suffixes and _prefix_is_separable(tokenizer, prefix) and all(s[:1] and not s[0].isspace() for s in inputs):
        # The prefix's tokens as they are when text follows it: alone, its final "\n\n" would be one token.
        n_prefix = len(tokenizer(prefix + "a")["input_ids"]) - \
            len(tokenizer("a", add_special_tokens=False)["input_ids"])

        def encode(texts: list[str]) -> list[int]:
            enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)
            return [n_prefix + len(ids) for ids in enc["input_ids"]]

        head = suffixes[:exact_check]
        if encode(head) == _full_lengths(tokenizer, [prefix + s for s in head]):
            return encode(suffixes), "prefix+suffix"
    return _full_lengths(tokenizer, [prefix + s for s in suffixes]), "full"


def _percentiles(lengths: list[int]) -> dict[str, float | int] | None:
    import numpy as np
    if not lengths:
        return None
    a = np.asarray(lengths)
    p50, p90, p99 = np.percentile(a, [50, 90, 99], method="inverted_cdf")  # actual lengths, not interpolated
    return {"p50": int(p50), "p90": int(p90), "p99": int(p99), "max": int(a.max()), "mean": round(float(a.mean()), 2),
            "count": int(a.size)}


# ---------------------------------------------------------------------------------------------------
# Writing the artifact
# ---------------------------------------------------------------------------------------------------

def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepError(f"out_dir {out_dir} is a file: give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise PrepError(f"out_dir {out_dir} holds other files and no meta.json: give an empty or new folder "
                        f"(a prepared dataset there would be replaced, anything else is left alone)")


def _write_split(path: Path, records: list[dict[str, Any]]) -> str:
    """Write JSONL; return the sha256 of the bytes written."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------

class _Phases:
    """Times each phase, reports it as progress, and checks for cancellation between phases."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx, self.seconds, self._t = ctx, {}, time.perf_counter()

    def done(self, name: str, **metrics: Any) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 4)
        self._t = now
        self.ctx.progress(PHASES.index(name) + 1, len(PHASES), message=f"prep: {name}",
                          seconds=self.seconds[name], **metrics)
        self.ctx.check_cancel()


def prepare_dataset(spec: PrepSpec, out_dir: Path, ctx: JobContext) -> dict[str, Any]:
    """Prepare the dataset a PrepSpec describes into `out_dir`.

    Writes out_dir/train.jsonl, validation.jsonl, test.jsonl (empty where there is no such split) and
    meta.json. They are written into a temporary folder beside out_dir and renamed into place at the end,
    so a failed or cancelled run leaves nothing behind; a prepared dataset already in out_dir is replaced.

    Args:
        spec: what to read and how to split it.
        out_dir: the dataset folder to (re)create.
        ctx: receives progress per phase and an event per drop reason; `check_cancel()` runs between phases.

    Returns:
        The meta dict written to meta.json.

    Raises:
        PrepError: bad input (missing file, wrong format, missing column, bad row with on_bad_rows="fail",
            no usable rows, an unusable tokenizer or out_dir), with the file, row and what to do.
        JobCancelled: from `ctx.check_cancel()`.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    phases = _Phases(ctx)
    tokenizer = _load_tokenizer(spec)
    phases.done("setup")

    sources = {"train": load_source("train", spec.train, spec.label_names)}
    if spec.test is not None:
        sources["test"] = load_source("test", spec.test, spec.label_names)
    if spec.validation is not None:
        sources["validation"] = load_source("validation", spec.validation, spec.label_names)
    label_names, label_source = _label_names(spec, sources)
    if label_source == "data":
        ctx.event(f"prep: label_names not given; using the {len(label_names)} labels found in the data, sorted: "
                  f"{', '.join(label_names)}", metrics={"label_names": label_names})
    # An OpenAI chat file's system message, where every line has the same one (loaders.py `_read_openai`).
    instruction = spec.instruction or sources["train"].info.get("instruction") or default_instruction(label_names)
    phases.done("load", rows=sum(len(s.rows) for s in sources.values()))

    drops, cleaned = DropLog(spec.on_bad_rows), Counter()
    examples = {key: _examples(src, spec, label_names, drops, cleaned) for key, src in sources.items()}
    phases.done("clean", rows=sum(map(len, examples.values())))

    test = _dedupe(examples["test"], sources["test"], drops) if "test" in examples else []
    train_pool = _dedupe(examples["train"], sources["train"], drops, elsewhere={ex.text for ex in test})
    given_val = None
    if "validation" in examples:  # a validation source: its rows are the split, none drawn from train
        given_val = _dedupe(examples["validation"], sources["validation"], drops, elsewhere={ex.text for ex in test})
        train_pool = _dedupe(train_pool, sources["train"], drops, elsewhere={ex.text for ex in given_val},
                             elsewhere_reason="in_validation")
    phases.done("dedupe", rows=len(test) + len(train_pool) + len(given_val or ()))

    if given_val is None:
        train, val = _split_train(train_pool, spec, sources["train"], drops)
    else:
        train = _split_train(train_pool, spec.model_copy(update={"validation_fraction": 0.0}), sources["train"],
                             drops)[0]
        val = given_val
    if "test" in sources:
        test = _cap_test(test, spec, sources["test"], drops)
    if not train:
        raise PrepError(f"{sources['train'].where}: no train rows are left after removing those also in the "
                        f"test split and the validation split; give a train source that differs from the test one")
    splits = {name: [_record(ex, spec, label_names, instruction) for ex in sorted(exs, key=lambda e: e.row)]
              for name, exs in (("train", train), ("validation", val), ("test", test))}
    phases.done("split", **{name: len(recs) for name, recs in splits.items()})

    lengths = _length_stats(tokenizer, spec, instruction, splits)
    phases.done("tokenize", rows=sum(map(len, splits.values())))

    drops.report(ctx, sources)
    meta = _meta(spec, label_names, label_source, instruction, sources, examples, splits, lengths, cleaned, drops)
    _write_artifact(out_dir, splits, meta, phases)
    ctx.event(f"prep: wrote {out_dir}", metrics={n: meta["splits"][n]["records"] for n in SPLITS}
              | {"hash": meta["hash"]})
    return meta


def _label_names(spec: PrepSpec, sources: dict[str, LoadedSource]) -> tuple[list[str], str]:
    """The dataset's labels and where they came from: "spec" (given, or AG News's four by default) or "data"
    (not given, and every label in the sources is a name: the distinct names, sorted).

    Raises:
        PrepError: the names found are too few (one) or too many to be labels.
    """
    if spec.label_names is not None:
        return list(spec.label_names), "spec"
    found: set[str] = set()
    for src in sources.values():
        names = label_names_in(src.rows)
        if names is None:  # integer ids: AG News's names (or the source's classes.txt / ClassLabel)
            return list(AG_NEWS_LABELS), "spec"
        found |= names
    if not found or found <= set(AG_NEWS_LABELS):  # AG News named: keep its label ids
        return list(AG_NEWS_LABELS), "spec"
    where = sources["train"].where
    col = sources["train"].spec.label_column
    if len(found) < 2:
        raise PrepError(f"{where}: every row has the label {next(iter(found))!r} in column {col!r}; a classifier "
                        f"needs two labels or more: check label_column, or give label_names")
    if len(found) > MAX_LABELS_FROM_DATA:
        raise PrepError(f"{where}: column {col!r} holds {len(found):,} distinct values (e.g. "
                        f"{', '.join(map(repr, sorted(found)[:3]))}), too many to be labels: check label_column, "
                        f"or give label_names to use them all")
    return sorted(found), "data"


def _length_stats(tokenizer, spec: PrepSpec, instruction: str,
                  splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Token-length percentiles of prompt + response, over all records and per split (None without a tokenizer)."""
    if tokenizer is None:
        return None
    records = [r for name in SPLITS for r in splits[name]]
    lens, method = token_lengths(tokenizer, instruction, [r["input"] for r in records],
                                 [r["output"] for r in records], template=spec.template)
    stats: dict[str, Any] = {"tokenizer": spec.tokenizer, "method": method, "all": _percentiles(lens)}
    i = 0
    for name in SPLITS:
        stats[name] = _percentiles(lens[i:i + len(splits[name])])
        i += len(splits[name])
    return stats


def _meta(spec: PrepSpec, label_names: list[str], label_source: str, instruction: str,
          sources: dict[str, LoadedSource], examples: dict[str, list[Example]],
          splits: dict[str, list[dict[str, Any]]], lengths: dict[str, Any] | None, cleaned: Counter,
          drops: DropLog) -> dict[str, Any]:
    return {
        "format_version": META_VERSION,
        "name": spec.name,
        "hash": None,  # sha256 over the split files' sha256s (see _write_artifact)
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "sources": {key: {**src.info, "rows_read": len(src.rows), "rows_kept": len(examples[key])}
                    for key, src in sources.items()},
        "label_names": list(label_names),
        "label_map": {name: i for i, name in enumerate(label_names)},
        "label_source": label_source,
        "template": spec.template,
        "instruction": instruction,
        "splits": {},
        "counts": {name: {label: sum(r["output"] == label for r in recs) for label in label_names}
                   for name, recs in splits.items()},
        "token_lengths": lengths,
        "cleaned": dict(sorted(cleaned.items())),
        "dropped": drops.totals(),
        "dropped_by_source": {key: dict(sorted(c.items())) for key, c in drops.counts.items()},
        "spec": spec.model_dump(mode="json"),
    }


def _write_artifact(out_dir: Path, splits: dict[str, list[dict[str, Any]]], meta: dict[str, Any],
                    phases: _Phases) -> None:
    """Write the splits and meta.json (filling in its hashes) into a temp folder beside out_dir, then rename it
    into place; on any failure, cancellation included, the temp folder is removed."""
    with atomic_dir(out_dir) as tmp:
        content = hashlib.sha256()
        for name in SPLITS:
            digest = _write_split(tmp / f"{name}.jsonl", splits[name])
            meta["splits"][name] = {"file": f"{name}.jsonl", "records": len(splits[name]), "sha256": digest}
            content.update(f"{name}:{digest}\n".encode())
        meta["hash"] = content.hexdigest()
        phases.done("write", bytes=sum((tmp / f"{n}.jsonl").stat().st_size for n in SPLITS))
        meta["timings_s"] = phases.seconds
        DatasetMeta.validated(meta, where="the meta.json being written").save(tmp)


# ---------------------------------------------------------------------------------------------------
# Reading the artifact
# ---------------------------------------------------------------------------------------------------

def read_meta(dataset_dir: Path) -> DatasetMeta:
    """The meta.json of a prepared dataset, checked against its contract.

    Raises:
        PrepError: the folder holds no meta.json, or one that does not match `DatasetMeta`.
    """
    try:
        return DatasetMeta.load(dataset_dir)
    except ContractError as e:
        raise PrepError(str(e)) from None


def load_records(dataset_dir: Path, split: str, *, verify: bool = True) -> list[dict[str, Any]]:
    """The records of one split of a prepared dataset.

    Args:
        split: "train", "validation" or "test".
        verify: check the file's sha256 against meta.json (a few ms for AG News).

    Raises:
        PrepError: not a prepared dataset, an unknown split, or a file changed since it was written.
    """
    if split not in SPLITS:
        raise PrepError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    meta = read_meta(dataset_dir)
    f = Path(dataset_dir) / meta.splits[split].file
    try:
        data = f.read_bytes()
    except OSError as e:
        raise PrepError(f"{f} cannot be read ({e.strerror}): re-run the prep job that made {dataset_dir}") from None
    if verify and hashlib.sha256(data).hexdigest() != meta.splits[split].sha256:
        raise PrepError(f"{f} changed after it was prepared (its sha256 differs from meta.json): re-run the prep "
                        f"job rather than editing a prepared dataset")
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
