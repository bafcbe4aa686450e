"""docker-compose.yml is for deployment: validated by docker-compose itself (no Docker engine runs it here)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _compose(*args: str, token: str | None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose not found: `make test` installs it (scripts/install_test_tools.sh)")
    env = {k: v for k, v in os.environ.items() if k != "NEWSLORA_API_TOKEN"}
    if token is not None:
        env["NEWSLORA_API_TOKEN"] = token
    return subprocess.run([exe, "-f", str(REPO / "docker-compose.yml"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid():
    r = _compose("config", "-q", token="ci-validation")
    assert r.returncode == 0, r.stderr


def test_compose_refuses_to_start_without_an_api_token():
    """The API listens beyond loopback in a deployment: the file itself demands a token."""
    r = _compose("config", "-q", token=None)
    assert r.returncode != 0 and "NEWSLORA_API_TOKEN" in r.stderr, r.stderr
