"""Source readers for data preparation: one reader per format, each returning raw rows.

A reader checks what concerns the whole file (it exists, it is what its extension says, the columns
are there) and raises `PrepError` for that; what concerns one row (bad JSON, a field too many, bytes
that are not UTF-8, a missing field) it reports on the row as a `RawRow.problem`, so that the caller
can fail or skip-and-count by its `on_bad_rows` setting. Rows are numbered from 1 as a user opening
the file counts them: the line where the record starts in a text file, the row in a table.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from core.specs.prep import AG_NEWS_LABELS, SourceSpec
from workers.data.chat_formats import OPENAI_FORMATS, RecordProblem, example_from


class PrepError(ValueError):
    """Bad input for data preparation; the message names the file, the row where there is one, and what to do."""


FILE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
                 ".parquet": "parquet", ".pq": "parquet"}
FORMAT_NAMES = {"jsonl": "JSONL", "csv": "CSV", "agnews_csv": "AG News CSV", "parquet": "Parquet", "hub": "hub",
                "openai_chat": "OpenAI chat JSONL", "prompt_completion": "prompt/completion JSONL"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MAGIC = [(b"PAR1", "a Parquet file"), (b"\x1f\x8b", "a gzip file"), (b"PK\x03\x04", "a zip file"),
          (b"\xff\xfe", "UTF-16 text"), (b"\xfe\xff", "UTF-16 text"), (b"BZh", "a bzip2 file"),
          (b"\xfd7zXZ", "an xz file"), (b"\x28\xb5\x2f\xfd", "a zstd file")]
_SKIP_HINT = "or set on_bad_rows='skip' to drop such rows and count them in meta.json"
csv.field_size_limit(2**31 - 1)  # an over-long article is a bad row we report, not a csv.Error mid-file


@dataclass(frozen=True, slots=True)
class RawRow:
    """One row as read: its texts and label value, or the problem that makes it unusable."""

    row: int  # 1-based; see `LoadedSource.unit`
    texts: tuple[str, ...] = ()
    label: Any = None
    problem: str | None = None  # reason key: encoding, bad_json, not_an_object, field_count, missing_field, bad_text
    detail: str = ""  # what is wrong, for the error message


@dataclass
class LoadedSource:
    """A source's rows plus what the caller needs to interpret them and to record where they came from."""

    key: str  # "train" or "test": the PrepSpec field it came from
    spec: SourceSpec
    where: str  # the file or hub id, as shown in messages
    format: str  # the resolved format
    unit: str  # "line" (text files) or "row" (tables): how row numbers read in messages
    rows: list[RawRow]
    id_names: dict[int, str]  # integer label id -> label name, in this source's convention
    info: dict[str, Any] = field(default_factory=dict)  # provenance for meta.json


def load_source(key: str, spec: SourceSpec, label_names: list[str] | None) -> LoadedSource:
    """Read one source's rows.

    Args:
        key: "train" or "test", the PrepSpec field (used in messages and record ids).
        spec: where and how to read.
        label_names: the dataset's labels (None: AG News's); integer labels are ids into this list from
            `spec.first_label_id`, unless the source names its own (AG News classes.txt, a hub ClassLabel).

    Raises:
        PrepError: the file is missing, is not what its extension says, lacks a column, or cannot be parsed.
    """
    label_names = list(label_names or AG_NEWS_LABELS)
    fmt = detect_format(spec)
    if fmt == "hub":
        return _load_hub(key, spec, label_names)
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise PrepError(f"{key} source {path} is not a file: give a JSONL, CSV or Parquet file, a folder of "
                        f"them for format='hub', or a hub id")
    data = path.read_bytes()
    _check_magic(path, data, fmt)
    info = {"path": spec.path, "resolved_path": str(path.resolve()), "format": fmt,
            "file_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    id_names = {spec.first_label_id + i: name for i, name in enumerate(label_names)}
    if fmt == "parquet":
        rows = _read_parquet(path, spec)
        return LoadedSource(key, spec, str(path), fmt, "row", rows, id_names, info)
    text = _decode(path, data)
    if fmt in OPENAI_FORMATS:
        rows, info["instruction"] = _read_openai(path, text, fmt)
    elif fmt == "jsonl":
        rows = _read_jsonl(path, text, spec)
    elif fmt == "csv":
        rows = _read_csv(path, text, spec)
    else:
        classes = _classes_file(path, spec)
        if classes is not None:
            names = _read_classes(classes)
            id_names = {i + 1: name for i, name in enumerate(names)}
            info["classes_file"] = str(classes.resolve())
        else:
            id_names = {i + 1: name for i, name in enumerate(label_names)}
            info["classes_file"] = None
        rows = _read_agnews_csv(path, text)
    return LoadedSource(key, spec, str(path), fmt, "line", rows, id_names, info)


def label_names_in(rows: Iterable[RawRow]) -> set[str] | None:
    """The distinct label names of the usable rows, where every label is a name (a string that is not an
    integer id); None where any label is an integer id or not a string. Empty labels are left out (they
    are bad rows)."""
    names: set[str] = set()
    for r in rows:
        if r.problem:
            continue
        if not isinstance(r.label, str):
            return None
        name = r.label.strip()
        if name.lstrip("-").isdigit():
            return None
        if name:
            names.add(name)
    return names


def detect_format(spec: SourceSpec) -> str:
    """The source's format: as given, else from the path (a folder or a hub id -> hub; else the extension).

    Raises:
        PrepError: a local file is missing, or its extension names no format we read.
    """
    if spec.format != "auto":
        return spec.format
    path = Path(spec.path).expanduser()
    if path.is_dir():
        return "hub"
    if path.is_file():
        fmt = FILE_SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise PrepError(f"cannot tell the format of {path} from its extension {path.suffix!r}: name it "
                            f".jsonl, .csv or .parquet, or set the source's format")
        if fmt == "csv" and _looks_like_agnews_csv(path, spec):
            return "agnews_csv"
        return fmt
    looks_local = path.suffix.lower() in FILE_SUFFIXES or spec.path.startswith(("/", ".", "~")) or \
        spec.path.count("/") > 1 or not _HUB_ID.match(spec.path)
    if looks_local:
        raise PrepError(f"{path} does not exist (a relative path is read from the worker's folder): check the path, "
                        f"or give a hub id such as fancyzhx/ag_news")
    return "hub"


def _looks_like_agnews_csv(path: Path, spec: SourceSpec) -> bool:
    """The original AG News layout: no header, three fields, an integer class first, classes.txt beside it."""
    if _classes_file(path, spec) is None:
        return False
    with path.open("rb") as fh:
        head = fh.read(65536).decode("utf-8", errors="replace")
    first = next(csv.reader(io.StringIO(head)), [])
    return len(first) == 3 and first[0].strip().isdigit()


def _classes_file(path: Path, spec: SourceSpec) -> Path | None:
    if spec.classes_file:
        f = Path(spec.classes_file).expanduser()
        if not f.is_file():
            raise PrepError(f"classes_file {f} does not exist: give the AG News classes.txt (one class name a line)")
        return f
    beside = path.with_name("classes.txt")
    return beside if beside.is_file() else None


def _read_classes(f: Path) -> list[str]:
    try:
        names = [n.strip() for n in f.read_text(encoding="utf-8-sig").splitlines()]
    except UnicodeDecodeError as e:
        raise PrepError(f"{f} is not UTF-8 ({e.reason} at byte {e.start}): re-save it as UTF-8") from None
    while names and not names[-1]:
        names.pop()
    if not names or any(not n for n in names):
        raise PrepError(f"{f} must name one class a line, with no blank lines (line n names class index n)")
    return names


def _check_magic(path: Path, data: bytes, fmt: str) -> None:
    """A file must be what its extension (or format) says: catch binaries and misnamed files early."""
    if not data:
        raise PrepError(f"{path} is empty: give a file with rows in it")
    if fmt == "parquet":
        if data[:4] != b"PAR1" or data[-4:] != b"PAR1":
            head = data[:40].decode("utf-8", errors="replace").lstrip()
            what = next((w for m, w in _MAGIC if data.startswith(m)), None)
            if what is None and head[:1] in "{[":
                what = "JSON text"
            elif what is None and head.isprintable():
                what = "text"
            raise PrepError(f"{path} is not a Parquet file (it looks like {what or 'something else'}): give a real "
                            f".parquet file, or rename it to what it is (.jsonl, .csv) "
                            f"or set the source's format")
        return
    for magic, what in _MAGIC:
        if data.startswith(magic):
            todo = "re-save it as UTF-8" if what == "UTF-16 text" else "unpack it or convert it to text"
            raise PrepError(f"{path} is {what}, not {FORMAT_NAMES[fmt]} text: {todo}, or set the source's format")
    if b"\x00" in data[:65536]:
        line = data[:data.index(b"\x00")].count(b"\n") + 1
        raise PrepError(f"{path} line {line}: NUL bytes; this is a binary file, not {FORMAT_NAMES[fmt]} text: "
                        f"give the text file, or set the source's format to what it is")


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text; undecodable bytes survive as lone surrogates so that only their rows turn bad."""
    return data.decode("utf-8-sig", errors="surrogateescape")


def _encoding_problem(text: str) -> str | None:
    """What is wrong when a decoded row holds bytes that were not UTF-8, else None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00
        return (f"is not UTF-8 (byte 0x{byte:02x} at character {e.start + 1}): re-save the file as UTF-8, e.g. "
                f"`iconv -f cp1252 -t utf-8 in > out`")


def _lines(text: str) -> Iterable[tuple[int, str]]:
    for n, line in enumerate(text.split("\n"), start=1):
        yield n, line.removesuffix("\r")


def _text_value(value: Any) -> str | None:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _row_from_mapping(n: int, obj: dict, spec: SourceSpec) -> RawRow:
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in obj]
    if missing:
        return RawRow(n, problem="missing_field",
                      detail=f"has no {', '.join(map(repr, missing))} field (fields: {', '.join(map(str, obj))}); "
                             f"set text_columns / label_column to the names this file uses")
    texts = []
    for c in spec.text_columns:
        t = _text_value(obj[c])
        if t is None:
            return RawRow(n, problem="bad_text", detail=f"field {c!r} is a {type(obj[c]).__name__}, not text")
        texts.append(t)
    return RawRow(n, tuple(texts), obj[spec.label_column])


def _read_jsonl(path: Path, text: str, spec: SourceSpec) -> list[RawRow]:
    """JSON Lines (one object a line), or a .json file holding one array of objects."""
    if text.lstrip()[:1] == "[" and path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepError(f"{path} line {e.lineno}: not valid JSON ({e.msg}): fix the file, or write it as "
                            f"JSON Lines (one object a line)") from None
        rows = [_row_from_mapping(i, o, spec) if isinstance(o, dict) else
                RawRow(i, problem="not_an_object", detail=f"is a {type(o).__name__}, not an object")
                for i, o in enumerate(items, start=1)]
        _check_columns(path, rows, spec)
        return rows
    rows = [obj if isinstance(obj, RawRow) else _row_from_mapping(n, obj, spec)
            for n, obj in _json_objects(path, text)]
    _check_columns(path, rows, spec)
    return rows


def _json_objects(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """(line, object) for each JSON object line; (line, RawRow with its problem) for a line that is not one."""
    last = text.count("\n") + 1
    for n, line in _lines(text):
        if not line.strip():
            if n != last:  # the empty piece after the final newline is not a row
                yield n, RawRow(n, problem="blank_line", detail="is blank")
            continue
        bad = _encoding_problem(line)
        if bad:
            yield n, RawRow(n, problem="encoding", detail=bad)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, RawRow(n, problem="bad_json", detail=f"is not valid JSON ({e.msg} at column {e.colno}); is "
                                                          f"{path.name} really JSON Lines (one object a line)?")
            continue
        if not isinstance(obj, dict):
            yield n, RawRow(n, problem="not_an_object", detail=f"is a JSON {type(obj).__name__}, not an object")
            continue
        yield n, obj


def _read_openai(path: Path, text: str, fmt: str) -> tuple[list[RawRow], str | None]:
    """An OpenAI fine-tuning file (workers/data/chat_formats.py): its rows (text, label), and the instruction
    its lines share (their one system message; None where they have none, or differ)."""
    rows: list[RawRow] = []
    instructions: set[str | None] = set()
    for n, obj in _json_objects(path, text):
        if isinstance(obj, RawRow):
            rows.append(obj)
            continue
        try:
            ex = example_from(fmt, obj)
        except RecordProblem as e:
            rows.append(RawRow(n, problem=e.reason, detail=e.detail))
            continue
        instructions.add(ex.instruction)
        rows.append(RawRow(n, (ex.text,), ex.label))
    return rows, next(iter(instructions)) if len(instructions) == 1 else None


def _check_columns(path: Path, rows: list[RawRow], spec: SourceSpec, sample: int = 1000) -> None:
    """A column absent from every one of the first rows is misnamed, not missing from a row."""
    sampled = [r for r in rows[:sample] if r.problem in (None, "missing_field")]
    if sampled and all(r.problem == "missing_field" for r in sampled):
        raise PrepError(f"{path}: no row among the first {len(sampled)} has the columns text_columns="
                        f"{spec.text_columns} and label_column={spec.label_column!r}; line {sampled[0].row} "
                        f"{sampled[0].detail}")


def _read_csv(path: Path, text: str, spec: SourceSpec) -> list[RawRow]:
    """A CSV file with a header row naming its columns."""
    if text.lstrip()[:1] in ("{", "["):
        raise PrepError(f"{path} looks like JSON, not CSV (it starts with {text.lstrip()[:1]!r}): rename it to "
                        f".jsonl, or set the source's format to 'jsonl'")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise PrepError(f"{path} is empty: give a CSV file with a header row and rows") from None
    except csv.Error as e:
        raise PrepError(f"{path} line 1: not readable as CSV ({e})") from None
    header = [h.strip() for h in header]
    if _encoding_problem(",".join(header)):
        raise PrepError(f"{path} line 1 (the header) {_encoding_problem(','.join(header))}")
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in header]
    if missing:
        hint = " (this looks like the headerless AG News CSV: put classes.txt beside it or set format='agnews_csv')" \
            if len(header) == 3 and header[0].isdigit() else ""
        raise PrepError(f"{path} line 1: no column {', '.join(map(repr, missing))} in the header "
                        f"(of {len(header)} columns); set text_columns / label_column to the names this file "
                        f"uses{hint}")
    text_idx = [header.index(c) for c in spec.text_columns]
    label_idx = header.index(spec.label_column)
    return list(_csv_rows(path, reader, len(header), text_idx, label_idx,
                          "the header's columns"))


def _read_agnews_csv(path: Path, text: str) -> list[RawRow]:
    """The original AG News CSV: no header; class index (1-based), title, description."""
    reader = csv.reader(io.StringIO(text, newline=""))
    return list(_csv_rows(path, reader, 3, [1, 2], 0, "class index, title, description"))


def _csv_rows(path: Path, reader, n_fields: int, text_idx: list[int], label_idx: int,
              expected: str) -> Iterable[RawRow]:
    start = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise PrepError(f"{path} line {reader.line_num}: not readable as CSV ({e}): fix the quoting "
                            f"there") from None
        n, start = start, reader.line_num + 1
        if not fields:
            yield RawRow(n, problem="blank_line", detail="is blank")
            continue
        bad = _encoding_problem("".join(fields))
        if bad:
            yield RawRow(n, problem="encoding", detail=bad)
        elif len(fields) != n_fields:
            yield RawRow(n, problem="field_count",
                         detail=f"has {len(fields)} fields, expected {n_fields} ({expected}); quote fields "
                                f"that contain commas")
        else:
            yield RawRow(n, tuple(fields[i] for i in text_idx), fields[label_idx])


def _read_parquet(path: Path, spec: SourceSpec) -> list[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepError(f"{path} is not a readable Parquet file ({e}): give a real .parquet file") from None
    cols = [*spec.text_columns, spec.label_column]
    missing = [c for c in cols if c not in schema.names]
    if missing:
        raise PrepError(f"{path}: no column {', '.join(map(repr, missing))} (of {len(schema.names)} columns); "
                        f"set text_columns / label_column to the names this file uses")
    table = pq.read_table(path, columns=list(dict.fromkeys(cols)))
    return _table_rows(table.to_pydict(), spec)


def _table_rows(columns: dict[str, list], spec: SourceSpec) -> list[RawRow]:
    texts = [columns[c] for c in spec.text_columns]
    labels = columns[spec.label_column]
    rows = []
    for i, label in enumerate(labels):
        parts = tuple(_text_value(col[i]) for col in texts)
        if any(p is None for p in parts):
            c = spec.text_columns[[p is None for p in parts].index(True)]
            rows.append(RawRow(i + 1, problem="bad_text", detail=f"column {c!r} holds a non-text value"))
        else:
            rows.append(RawRow(i + 1, parts, label))
    return rows


def _load_hub(key: str, spec: SourceSpec, label_names: list[str]) -> LoadedSource:
    """Through `datasets.load_dataset`: a hub id, a local folder of data files, or one local data file."""
    import datasets

    split = spec.split or key
    local = Path(spec.path).expanduser()
    try:
        if local.is_file():
            builder = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}.get(
                FILE_SUFFIXES.get(local.suffix.lower(), ""))
            if builder is None:
                raise PrepError(f"{local}: datasets cannot read {local.suffix!r} files; give .jsonl, .csv or .parquet")
            ds = datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
        else:
            ds = datasets.load_dataset(str(local) if local.is_dir() else spec.path, split=split)
    except PrepError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (network, missing split, bad files)
        raise PrepError(f"could not load {spec.path!r} split {split!r} with datasets.load_dataset "
                        f"({type(e).__name__}: {str(e)[:300]}); where the hub is out of reach, download the "
                        f"dataset's files and give their local path (a .parquet/.jsonl/.csv file or a "
                        f"folder)") from None
    cols = [*spec.text_columns, spec.label_column]
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise PrepError(f"{spec.path} split {split!r}: no column {', '.join(map(repr, missing))} (columns: "
                        f"{', '.join(ds.column_names)}); set text_columns / label_column to the names it uses")
    feature = ds.features[spec.label_column]
    class_names = getattr(feature, "names", None)
    id_names = {i: n for i, n in enumerate(class_names)} if class_names else \
        {spec.first_label_id + i: n for i, n in enumerate(label_names)}
    rows = _table_rows(ds.select_columns(list(dict.fromkeys(cols))).to_dict(), spec)
    info = {"path": spec.path, "format": "hub", "split": split, "fingerprint": getattr(ds, "_fingerprint", None),
            "class_label_names": class_names}
    return LoadedSource(key, spec, f"{spec.path} [{split}]", "hub", "row", rows, id_names, info)
