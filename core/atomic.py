"""`atomic_dir`: the one way newslora writes an artifact folder - into a temp folder beside it, renamed
into place only when complete. A crash, a cancel or a full disk leaves either the old folder or the new
one, never half of one, and no temp folder behind: a process killed mid-write (whose `finally` never ran)
leaves its temp folder, and the next `atomic_dir` in that folder removes it (`sweep_leftovers`).

A full disk is reported as `DiskFull`, naming the folder that could not be written, whatever library did
the write (Python's own OSError, safetensors' error, torch's "unexpected pos"): `atomic_dir` and
`reports_disk_full` turn them into it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Iterator, Literal

# Below this many free bytes, a write error on the folder's file system is taken for a full disk (torch's
# writer says only "unexpected pos ..." when a write comes up short).
FULL_BELOW_BYTES = 1 << 20
_FULL_MARKERS = ("no space left on device", "os error 28", "disk quota exceeded")


class DiskFull(OSError):
    """No space left on the device holding `folder`: the message says so, names the folder and what to do."""

    def __init__(self, folder: Path, *, kept: str = ""):
        self.folder = Path(folder)
        super().__init__(errno.ENOSPC, f"the disk is full (no space left on device) under {self.folder}"
                                       f"{kept}: free space there and run the job again")

    def __str__(self) -> str:
        return self.strerror


def _free_bytes(folder: Path) -> int | None:
    for p in (Path(folder), *Path(folder).parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether `exc` (raised while writing under `folder`) comes from a full disk: an ENOSPC/EDQUOT OSError
    anywhere in its chain, a library's message saying so, or a write error while the disk is full now."""
    seen: set[int] = set()
    e: BaseException | None = exc
    io_error = False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(m in str(e).lower() for m in _FULL_MARKERS):
            return True
        if type(e) is RuntimeError and "inline_container" in str(e) and "unexpected pos" in str(e):
            return True  # torch's zip writer on a short write: the disk filled (it may be freed by the time we look)
        io_error |= isinstance(e, OSError) or type(e) is RuntimeError  # torch's writer: a plain RuntimeError
        e = e.__cause__ or e.__context__
    free = _free_bytes(folder) if io_error else None
    return free is not None and free < FULL_BELOW_BYTES


@contextlib.contextmanager
def reports_disk_full(folder: Path) -> Iterator[None]:
    """Re-raise an error that a full disk caused while the block wrote under `folder` as `DiskFull`."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as e:
        if is_disk_full(e, folder):
            raise DiskFull(folder) from e
        raise


# Temp and swapped-out folders are named .<target>.tmp-<host>-<pid>-<hex> and .<target>.old-<host>-<pid>-<hex>.
_OWNER = socket.gethostname().replace(os.sep, "_") or "host"


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove the temp and swapped-out folders in `folder` that a process of this host left when it was
    killed mid-write (SIGKILL, OOM: no `finally` ran). A live process's folders, and other hosts', are kept.

    Returns:
        the folders removed.
    """
    removed = []
    for p in Path(folder).glob(".*"):
        for marker in (".tmp-", ".old-"):
            if marker not in p.name:
                continue
            owner = p.name.rsplit(marker, 1)[1].rsplit("-", 2)  # host, pid, hex
            if len(owner) == 3 and owner[0] == _OWNER and owner[1].isdigit() and _dead(int(owner[1])):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(target: Path, *, exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; on a clean exit rename it to `target`.

    Args:
        exists: what to do when `target` already exists at the end: "replace" it (swapped out, then
            removed) or "keep" it and drop the new folder (another process finished the same work first).

    Raises:
        DiskFull: the disk filled up while the folder was written (the temp folder is removed).
        whatever else the block raises, after removing the temp folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{_OWNER}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if exists == "keep":
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = target.with_name(f".{target.name}.old-{_OWNER}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException as e:
        # Judged before the temp folder goes: a short write of our own may be what filled the disk.
        full = isinstance(e, Exception) and not isinstance(e, DiskFull) and is_disk_full(e, target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(target, kept=" (nothing of it was kept)") from e
        raise
