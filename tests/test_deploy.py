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
    env = {k: v for k, v in os.environ.items() if k not in ("NEWSLORA_API_TOKEN", "FLOWER_BASIC_AUTH")}
    env["FLOWER_BASIC_AUTH"] = "ops:ci-validation"
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


def test_flower_needs_a_password_and_stays_on_loopback():
    r = _compose("config", token="ci-validation")
    assert r.returncode == 0, r.stderr
    flower = r.stdout.split("\n  flower:", 1)[1].split("\n  gpu-worker:", 1)[0].split("\n  ollama:", 1)[0]
    assert "--basic-auth=ops:ci-validation" in flower and "- 127.0.0.1:5555:5555" in flower, flower
