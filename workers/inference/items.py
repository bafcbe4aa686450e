"""Reading the items to classify: inline items, a JSONL/CSV file, or a prepared dataset split."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from core.specs.classify import ClassifySpec


class InputFileError(ValueError):
    """An input file cannot be read (missing, not UTF-8, unknown format, or a CSV without id/text)."""


def read_text_strict(path: Path) -> str:
    """The file's text as UTF-8.

    Raises:
        InputFileError: the file is missing, or not UTF-8 (naming the byte offset and line of the first bad byte).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputFileError(f"cannot read input file {path}: {e.strerror or e}") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputFileError(
            f"{path} is not UTF-8: byte {data[e.start]:#04x} at byte offset {e.start} (line {line}) cannot be "
            f"decoded; re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def _item(raw: dict[str, Any], *, where: str, seq: int, text_key: str = "text",
          label_key: str = "label") -> tuple[dict | None, dict | None]:
    """(item, None) or (None, rejection) for one raw record."""
    rid = raw.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return None, {"id": f"<{where}>", "seq": seq, "reason": f"{where}: no id (each item needs a unique id)"}
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return None, {"id": f"<{where}>", "seq": seq, "reason": f"{where}: id must be a string or integer"}
    rid = str(rid)
    if len(rid) > 512:
        return None, {"id": rid[:64] + "...", "seq": seq, "reason": f"{where}: id longer than 512 characters"}
    text = raw.get(text_key)
    if not isinstance(text, str):
        return None, {"id": rid, "seq": seq,
                      "reason": f"{where}: {text_key!r} is missing or not a string"}
    label = raw.get(label_key)
    return {"id": rid, "text": text, "label": None if label in (None, "") else str(label), "seq": seq}, None


def _parse_jsonl(path: Path, text: str, *, text_key: str = "text", label_key: str = "label") -> tuple[list, list]:
    items, rejected = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            raw = json.loads(line)
        except ValueError as e:
            rejected.append({"id": f"<{where}>", "seq": n, "reason": f"{where}: not valid JSON ({e})"})
            continue
        if not isinstance(raw, dict):
            rejected.append({"id": f"<{where}>", "seq": n, "reason": f"{where}: not a JSON object"})
            continue
        item, bad = _item(raw, where=where, seq=n, text_key=text_key, label_key=label_key)
        (items if item else rejected).append(item or bad)
    return items, rejected


def _parse_csv(path: Path, text: str) -> tuple[list, list]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "id" not in fields or "text" not in fields:
        raise InputFileError(f"{path}: a CSV input needs a header row with columns id and text (and optionally "
                             f"label); found {reader.fieldnames}")
    items, rejected = [], []
    for n, row in enumerate(reader, start=2):
        raw = {(k or "").strip().lower(): v for k, v in row.items()}
        item, bad = _item(raw, where=f"{path.name} line {n}", seq=n)
        (items if item else rejected).append(item or bad)
    return items, rejected


def load_items(spec: ClassifySpec, dataset_dir: Path | None) -> tuple[list[dict], list[dict]]:
    """The items a classify spec names, and the records rejected on the way.

    Items come from `spec.items`, `spec.input_file` (JSONL with `id` and `text` per line, optional
    `label`; or CSV with an `id,text[,label]` header) or a prepared dataset split
    (`dataset_dir/<split>.jsonl`, `input` is the text and `output` the gold label). `spec.limit`
    keeps the first valid items.

    Returns:
        (items as {"id", "text", "label", "seq"}, rejected as {"id", "seq", "reason"}).

    Raises:
        InputFileError: a file is missing, not UTF-8, of unknown format, or a CSV lacks id/text columns.
        ValueError: dataset_id is set but no dataset folder was given.
    """
    shard = spec.shard
    if spec.items is not None:  # a shard child's inline items are its slice: they count on from shard.start
        first = shard.start if shard is not None else 0
        items = [{"id": it.id, "text": it.text, "label": it.label, "seq": first + i}
                 for i, it in enumerate(spec.items)]
        rejected: list[dict] = []
    elif spec.input_file is not None:
        path = Path(spec.input_file).expanduser()
        if not path.is_file():
            raise InputFileError(f"input file {path} does not exist on this worker (a worker on another machine "
                                 f"must see it at the same path: mount the shared volume there)")
        text = read_text_strict(path)
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            items, rejected = _parse_jsonl(path, text)
        elif suffix in (".csv", ".tsv"):
            items, rejected = _parse_csv(path, text)
        else:
            raise InputFileError(f"{path}: unknown input format {suffix!r}; use .jsonl (id and text per line) "
                                 f"or .csv (header id,text)")
    else:
        if dataset_dir is None:
            raise ValueError(f"spec names dataset {spec.dataset_id} but no dataset folder was given")
        if not Path(dataset_dir).is_dir():
            raise InputFileError(f"dataset {spec.dataset_id}'s folder {dataset_dir} does not exist on this worker: a "
                                 f"worker on another machine must see the artifact volume at the same path - mount "
                                 f"the shared volume (NEWSLORA_HOME) there")
        path = Path(dataset_dir) / f"{spec.split}.jsonl"
        if not path.is_file():
            raise InputFileError(f"dataset {spec.dataset_id} has no {spec.split} split ({path} is missing); "
                                 f"pick another split or re-run the prep job")
        items, rejected = _parse_jsonl(path, read_text_strict(path), text_key="input", label_key="output")
    if spec.limit is not None:
        items = items[:spec.limit]
    if shard is not None and spec.items is None:
        items = items[shard.start:shard.stop]
    return items, rejected
