"""An export folder as a streamed tar.gz: bytes flow out as they are compressed, never the whole archive
in memory (a merged 7B checkpoint is tens of GB). Light on purpose (no torch): the API imports it.
"""
from __future__ import annotations

import gzip
import queue
import tarfile
import threading
from pathlib import Path
from typing import Iterator

CHUNK = 1 << 20


class _QueueWriter:
    """A write-only file whose writes go to a bounded queue (the reader is the HTTP response)."""

    def __init__(self, q: "queue.Queue[bytes | BaseException | None]", stop: threading.Event):
        self._q, self._stop, self._buf = q, stop, bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        while len(self._buf) >= CHUNK:
            self._put(bytes(self._buf[:CHUNK]))
            del self._buf[:CHUNK]
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._put(bytes(self._buf))
            self._buf.clear()

    def _put(self, item: bytes) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue
        raise BrokenPipeError("the download was abandoned")


def stream_tar_gz(folder: Path, arcname: str, *, compresslevel: int = 1) -> Iterator[bytes]:
    """Yield a tar.gz of `folder` (its files under `arcname/`) chunk by chunk.

    Level 1 by default: model weights barely compress, and level 9 would make the CPU the bottleneck.
    Closing the generator early (a client that disconnects) stops the writer thread.
    """
    folder = Path(folder)
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    q: "queue.Queue[bytes | BaseException | None]" = queue.Queue(maxsize=8)
    stop = threading.Event()

    def produce() -> None:
        sink = _QueueWriter(q, stop)
        try:
            with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
                with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                    for f in files:
                        tar.add(str(f), arcname=f"{arcname}/{f.relative_to(folder)}", recursive=False)
            sink.flush()
            q.put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the reader, which re-raises it
            if not stop.is_set():
                q.put(e)

    worker = threading.Thread(target=produce, name="export-tar", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
