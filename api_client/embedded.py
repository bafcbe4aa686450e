"""The embedded default: the API and one worker serving both queues, on this machine, under NEWSLORA_HOME.

`ensure_running()` starts them in the background when no API answers and no BROKER_URL/DATABASE_URL
is set, so that any CLI command just works; `newslora down` stops them. A second terminal finds the
same processes through the pid files under `$NEWSLORA_HOME/run/`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from api_client.client import ApiError, Client
from core.settings import child_environment, get_settings

PROCESSES = ("api", "worker")


def _run_dir() -> Path:
    return get_settings().path("run")


def _pid(name: str) -> int | None:
    f = _run_dir() / f"{name}.pid"
    try:
        pid = int(f.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def commands() -> dict[str, list[str]]:
    s = get_settings()
    return {
        "api": [sys.executable, "-m", "uvicorn", "api.app:app", "--host", s.api_host, "--port", str(s.api_port),
                "--log-level", "warning"],
        "worker": [sys.executable, "-m", "celery", "-A", "broker.app:app", "worker", "-Q", "cpu,gpu",
                   "-c", "1", "--loglevel", "INFO", "-n", f"embedded-{os.getpid()}@%h", "--without-gossip",
                   "--without-mingle", "--without-heartbeat"],
    }


DASHBOARD_PATH = "/dashboard/jobs"  # served by the API itself (api/dashboard)


def dashboard_url(api_url: str | None = None) -> str:
    """Where the web dashboard of the API at `api_url` (default: this machine's) is."""
    return (api_url or get_settings().resolved_api_url).rstrip("/") + DASHBOARD_PATH


def api_up(client: Client | None = None) -> bool:
    """True when an API answers for this NEWSLORA_HOME.

    Raises:
        ApiError: the API on this port serves another NEWSLORA_HOME (two embedded homes, one port).
    """
    c = client or Client(timeout=3)
    try:
        health = c.health()
    except ApiError:
        return False
    s = get_settings()
    if s.embedded and not s.api_url and health.get("home") and Path(health["home"]) != s.home:
        raise ApiError(0, f"the API on {c.base_url} serves NEWSLORA_HOME={health['home']}, not {s.home}: "
                          f"stop it (NEWSLORA_HOME={health['home']} newslora down) or set NEWSLORA_API_PORT")
    return True


def start(*, wait_s: float = 90.0, quiet: bool = False) -> None:
    """Start the embedded API and worker in the background (those not already running)."""
    s = get_settings()
    if not s.embedded:
        raise RuntimeError("BROKER_URL or DATABASE_URL is set: start the API and workers of that deployment "
                           "instead (see docker-compose.yml)")
    logs = s.path("logs")
    env = child_environment(NEWSLORA_HOME=str(s.home))
    repo = Path(__file__).resolve().parents[1]
    for name, cmd in commands().items():
        if _pid(name):
            continue
        with (logs / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=repo, start_new_session=True)
        (_run_dir() / f"{name}.pid").write_text(str(proc.pid))
        if not quiet:
            print(f"started {name} (pid {proc.pid}, log {logs / (name + '.log')})", file=sys.stderr)
    deadline = time.monotonic() + wait_s
    client = Client(timeout=3)
    while time.monotonic() < deadline:
        if api_up(client):
            return
        if not _pid("api"):
            raise RuntimeError(f"the API exited at start; see {logs / 'api.log'}")
        time.sleep(0.3)
    raise RuntimeError(f"the API did not answer within {wait_s:.0f} s; see {logs / 'api.log'}")


def ensure_running() -> None:
    """Make sure an API answers: start the embedded one if this is the embedded default."""
    if api_up():
        return
    s = get_settings()
    if not s.embedded or s.api_url:
        raise ApiError(0, f"the newslora API at {s.resolved_api_url} is unreachable")
    start()


def stop(timeout_s: float = 20.0) -> list[str]:
    """Stop the embedded processes (SIGTERM, then SIGKILL). Returns what was stopped."""
    stopped = []
    for name in PROCESSES:
        pid = _pid(name)
        if not pid:
            continue
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _pid(name):
            time.sleep(0.2)
        if _pid(name):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        (_run_dir() / f"{name}.pid").unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def status() -> dict[str, int | None]:
    return {name: _pid(name) for name in PROCESSES}
