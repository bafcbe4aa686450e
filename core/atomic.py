"""`atomic_dir`: the one way newslora writes an artifact folder - into a temp folder beside it, renamed
into place only when complete. A crash, a cancel or a full disk leaves either the old folder or the new
one, never half of one, and no temp folder behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Literal


@contextlib.contextmanager
def atomic_dir(target: Path, *, exists: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """Yield a fresh temp folder beside `target`; on a clean exit rename it to `target`.

    Args:
        exists: what to do when `target` already exists at the end: "replace" it (swapped out, then
            removed) or "keep" it and drop the new folder (another process finished the same work first).

    Raises:
        whatever the block raises, after removing the temp folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            if exists == "keep":
                shutil.rmtree(tmp, ignore_errors=True)
                return
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
