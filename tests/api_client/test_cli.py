"""The `newslora` CLI as a user runs it, on the embedded default (SQLite + embedded broker, no services)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port


@pytest.fixture
def cli_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "NEWSLORA_API_URL")}
    env.update(NEWSLORA_HOME=str(tmp_path / "home"), NEWSLORA_API_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    yield env
    subprocess.run([sys.executable, "-m", "api_client.cli", "down"], env=env, cwd=REPO, timeout=60,
                   capture_output=True)


def newslora(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "api_client.cli", *args], env=env, cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


def test_demo_starts_the_embedded_stack_and_a_second_terminal_sees_and_cancels(cli_env):
    r = newslora(cli_env, "demo")
    assert r.returncode == 0, r.stderr
    assert '"steps": 20' in r.stdout
    # "A second terminal": another process lists the job and cancels a long one started elsewhere.
    r = newslora(cli_env, "submit", "noop", "--spec", '{"steps": 500, "sleep_s": 0.05}', "--no-wait")
    assert r.returncode == 0, r.stderr
    long_id = int(r.stdout.strip())
    listed = newslora(cli_env, "jobs", "list")
    assert listed.returncode == 0 and "noop" in listed.stdout and "2 of 2" in listed.stdout
    deadline = time.monotonic() + 60
    while "running" not in newslora(cli_env, "jobs", "show", str(long_id)).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = newslora(cli_env, "jobs", "cancel", str(long_id))
    assert r.returncode == 0 and "running" in r.stdout
    r = newslora(cli_env, "jobs", "wait", str(long_id), "--timeout", "60")
    assert r.returncode == 1 and "cancelled" in r.stdout
    # Cancel of a finished job: a clear error and a non-zero exit.
    r = newslora(cli_env, "jobs", "cancel", str(long_id))
    assert r.returncode == 3 and "already cancelled" in r.stderr and "409" in r.stderr
    st = json.loads(newslora(cli_env, "status").stdout)
    assert st["api_up"] and st["processes"]["worker"]


def test_bad_input_exits_non_zero_with_a_clear_message(cli_env):
    assert newslora(cli_env, "up").returncode == 0
    r = newslora(cli_env, "jobs", "show", "4242")
    assert r.returncode == 3 and "no job with id 4242" in r.stderr
    r = newslora(cli_env, "submit", "bake")
    assert r.returncode == 3 and "unknown job kind" in r.stderr
    r = newslora(cli_env, "submit", "noop", "steps=-3")
    assert r.returncode == 3 and "greater than or equal to 0" in r.stderr
    r = newslora(cli_env, "submit", "noop", "--spec", "{not json")
    assert r.returncode != 0 and "not JSON" in r.stderr
    r = newslora(cli_env, "--no-start", "jobs", "list")
    assert r.returncode == 0  # the embedded API is up: --no-start just reuses it


def test_unreachable_api_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(NEWSLORA_HOME=str(tmp_path / "h"), NEWSLORA_API_URL=f"http://127.0.0.1:{free_port()}")
    r = newslora(env, "jobs", "list")
    assert r.returncode == 3 and "unreachable" in r.stderr


def test_two_homes_on_one_port_is_a_clear_error(cli_env, tmp_path):
    assert newslora(cli_env, "up").returncode == 0
    other = dict(cli_env, NEWSLORA_HOME=str(tmp_path / "other-home"))
    r = newslora(other, "jobs", "list")
    assert r.returncode == 3 and "serves NEWSLORA_HOME" in r.stderr


def test_classify_one_text_prints_label_and_probabilities(cli_env, tiny_model_dir):
    r = newslora(cli_env, "classify", "--model", str(tiny_model_dir), "--text", "Stocks rallied as the Fed held rates",
                 "dtype=fp32", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    labels = {"World", "Sports", "Business", "Sci/Tech"}
    assert lines[0] in labels
    probs = {ln.split()[0]: float(ln.split()[1]) for ln in lines[1:5]}
    assert set(probs) == labels and abs(sum(probs.values()) - 1) < 0.01
    r = newslora(cli_env, "classify", "--model", str(tiny_model_dir), "--text", "   ", "dtype=fp32", timeout=300)
    assert r.returncode != 0 and "empty" in r.stderr.lower()
