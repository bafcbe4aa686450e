"""The recipe subprocess: started with the isolated python, its output turned into progress, terminated
on cancel, and never left running behind a killed worker.

`entry.py` runs in the subprocess and prints one line per optimizer step (`METRIC_PREFIX`), per chunk
checkpoint (`CHECKPOINT_PREFIX`) and per warning (`WARNING_PREFIX`); this module reads them.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from core.context import JobContext
from workers.train.torchtune.entry import CHECKPOINT_PREFIX, ENTRY, METRIC_PREFIX, WARNING_PREFIX
from workers.train.torchtune.env import recipe_environment

TERMINATE_GRACE_S = 10.0
PID_FILE = "recipe.pid"  # under the run's torchtune/ folder: the recipe subprocess's pid


class TorchtuneRunFailed(RuntimeError):
    """The recipe subprocess exited with an error."""


def run_recipe(python: Path, config_path: Path, ctx: JobContext, *, total_steps: int,
               step_tokens: list[int], log_path: Path,
               on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the recipe subprocess to its end; returns one history row per optimizer step it ran.

    Each metric line becomes a `ctx.progress` event (and goes to `on_step` as it arrives), each
    checkpoint line an event, each warning line a warning event; `ctx.check_cancel()` is polled about
    twice a second, and on cancel the subprocess (and its process group) gets SIGTERM, then SIGKILL.
    The subprocess's pid is kept in `recipe.pid` beside the config, and it exits by itself if this
    process dies. The log is appended to, so a resumed run's log follows the killed one's.

    Raises:
        JobCancelled: the job was cancelled (the subprocess is gone when this is raised).
        TorchtuneRunFailed: the recipe exited with an error; the message holds its last lines.
    """
    cmd = [str(python), str(ENTRY), "--config", str(config_path), "--parent-pid", str(os.getpid())]
    wait_for_orphan(config_path.parent / PID_FILE)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=recipe_environment(), cwd=str(config_path.parent), start_new_session=True)
    (config_path.parent / PID_FILE).write_text(str(proc.pid))
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    history: list[dict[str, Any]] = []
    tail: list[str] = []
    try:
        with log_path.open("a", encoding="utf-8") as log_fh:
            while True:
                ctx.check_cancel()
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                if line is None:
                    break
                log_fh.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if line.startswith(METRIC_PREFIX):
                    row = _history_row(json.loads(line[len(METRIC_PREFIX):]), history, step_tokens)
                    history.append(row)
                    if on_step is not None:
                        on_step(row)
                    ctx.progress(row["step"], total_steps, message="train", loss=row["loss"], lr=row["lr"],
                                 tokens_per_s=row.get("tokens_per_s"))
                elif line.startswith(CHECKPOINT_PREFIX):
                    saved = json.loads(line[len(CHECKPOINT_PREFIX):])
                    if not saved.get("final"):
                        ctx.event(f"train: checkpoint at step {saved['step']} of {total_steps}",
                                  metrics={"checkpoint_step": saved["step"]})
                elif line.startswith(WARNING_PREFIX):
                    ctx.event(line[len(WARNING_PREFIX):].strip(), level="warning")
    except BaseException:
        _terminate(proc)
        raise
    rc = proc.wait()
    if rc != 0:
        raise TorchtuneRunFailed(
            f"torchtune's recipe exited with status {rc}; full log: {log_path}; last lines:\n" + "\n".join(tail))
    return history


def _history_row(raw: dict[str, Any], history: list[dict[str, Any]], step_tokens: list[int]) -> dict[str, Any]:
    step = int(raw["step"])
    tokens = step_tokens[step - 1] if 0 < step <= len(step_tokens) else None
    row: dict[str, Any] = {"step": step, "loss": raw["loss"], "lr": raw["lr"], "tokens": tokens,
                           "time": raw.get("time")}
    if history and tokens and row["time"] is not None and history[-1]["time"] is not None:
        row["tokens_per_s"] = tokens / max(row["time"] - history[-1]["time"], 1e-9)
    return row


def wait_for_orphan(pid_file: Path, timeout_s: float = TERMINATE_GRACE_S) -> None:
    """Make sure the recipe subprocess of a killed earlier attempt is gone before a new one starts.

    It exits by itself within a fraction of a second of its parent's death (entry.exit_with_parent); if it
    is somehow still there after timeout_s, it is killed.
    """
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout_s
    while is_recipe_process(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
            break
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)


def is_recipe_process(pid: int) -> bool:
    """Whether `pid` is a live recipe subprocess (running this checkout's entry.py), not a zombie or a
    process that got the pid later."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    zombie = any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
    return not zombie and str(ENTRY).encode() in cmdline


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the recipe's process group, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
