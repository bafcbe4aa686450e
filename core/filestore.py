"""The bytes of stored files (uploads and job outputs), under the artifact home's `files/` folder.

A file is streamed to a temporary name, hashed (SHA-256) and counted as it arrives, refused past a size
limit (nothing is left behind), then renamed into place: a reader never sees half a file. The rows that
describe files (owner, purpose, name) live in the store (`db/files.py`); this module knows only bytes.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterable

from core.settings import get_settings


class FileTooLarge(ValueError):
    """An upload went past the size limit: the message says the limit and what to do."""


@dataclass(frozen=True)
class StoredBytes:
    path: Path
    size: int
    sha256: str


def files_dir() -> Path:
    return get_settings().path("files")


def file_path(file_id: str) -> Path:
    if "/" in file_id or file_id.startswith("."):
        raise ValueError(f"not a file id: {file_id!r}")
    return files_dir() / file_id


class _Writer:
    def __init__(self, file_id: str, max_bytes: int):
        self.final = file_path(file_id)
        self.tmp = self.final.with_name(f".{file_id}.{uuid.uuid4().hex}.part")
        self.max_bytes = max_bytes
        self.size = 0
        self.hash = hashlib.sha256()
        self.fh = self.tmp.open("wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise FileTooLarge(f"the file is over the upload limit of {self.max_bytes:,} bytes "
                               f"(NEWSLORA_MAX_UPLOAD_BYTES): split it into several files")
        self.hash.update(chunk)
        self.fh.write(chunk)

    def finish(self) -> StoredBytes:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.final)
        return StoredBytes(self.final, self.size, self.hash.hexdigest())

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def store_chunks(file_id: str, chunks: Iterable[bytes], *, max_bytes: int) -> StoredBytes:
    """Write `chunks` as file `file_id`, all or nothing.

    Raises:
        FileTooLarge: past `max_bytes` (the partial file is removed).
        OSError: the disk is full or not writable (the partial file is removed).
    """
    w = _Writer(file_id, max_bytes)
    try:
        for chunk in chunks:
            w.write(chunk)
        return w.finish()
    except BaseException:
        w.abort()
        raise


async def store_stream(file_id: str, chunks: AsyncIterator[bytes], *, max_bytes: int) -> StoredBytes:
    """`store_chunks` for an async stream (an upload read as it arrives)."""
    w = _Writer(file_id, max_bytes)
    try:
        async for chunk in chunks:
            w.write(chunk)
        return w.finish()
    except BaseException:
        w.abort()
        raise


def named_path(file_id: str, filename: str) -> Path:
    """The file's bytes under its uploaded name (`files/named/<id>/<name>`, a hard link made on first use),
    so that a reader tells its format by the extension and names it in messages as its owner knows it."""
    name = Path(filename.replace("\\", "/")).name.lstrip(".") or "upload"
    target = files_dir() / "named" / file_id / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file_path(file_id), target)
        except FileExistsError:  # made by a concurrent submission
            pass
        except OSError:  # a file system without hard links
            shutil.copyfile(file_path(file_id), target)
    return target


def remove(file_id: str) -> None:
    file_path(file_id).unlink(missing_ok=True)
    named = files_dir() / "named" / file_id
    if named.is_dir():
        for f in named.iterdir():
            f.unlink(missing_ok=True)
        named.rmdir()
