"""The bind decides: an API listening on every interface without a token serves nobody; the CLI against an API
on another address (a second loopback address) preps from a local file the server never saw (an upload)."""
from __future__ import annotations

import json
import sys

import httpx

from tests.conftest import newslora_cli, wait_status

TOKEN = "bind-test-admin-token"


def _serve(st, host: str) -> None:
    st._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(st.port),
                      "--log-level", "warning"])
    st.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{st.port}"


def _wait(url: str, headers: dict[str, str]) -> httpx.Response:
    import time
    deadline = time.monotonic() + 60
    while True:
        try:
            return httpx.get(url + "/jobs", headers=headers, timeout=5)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_a_wildcard_bind_without_a_token_serves_nobody(stack_factory):
    st = stack_factory()
    st.env.pop("NEWSLORA_API_TOKEN", None)
    _serve(st, "0.0.0.0")
    r = _wait(st.url, {})
    assert r.status_code == 403 and "listens beyond loopback" in r.json()["detail"], r.text
    assert "NEWSLORA_API_TOKEN" in r.json()["detail"]


def test_a_wildcard_bind_with_a_token_serves_with_the_token(stack_factory):
    st = stack_factory(NEWSLORA_API_TOKEN=TOKEN)
    _serve(st, "0.0.0.0")
    assert _wait(st.url, {"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(st.url + "/jobs").status_code == 401


def test_the_cli_preps_from_a_local_file_through_an_upload(stack_factory, tmp_path):
    data_root = tmp_path / "server-data"
    data_root.mkdir()
    st = stack_factory(NEWSLORA_API_TOKEN=TOKEN, NEWSLORA_DATA_ROOTS=json.dumps([str(data_root)]))
    _serve(st, "127.0.0.2")
    assert _wait(st.url, {"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    st.start_worker(queues="cpu")
    mine = tmp_path / "laptop" / "mine.jsonl"  # outside the server's data roots: only an upload gets it there
    mine.parent.mkdir()
    mine.write_text("".join(json.dumps({"text": f"article {i} about {lab}", "label": lab}) + "\n"
                            for i in range(12) for lab in ("World", "Sports")))
    env = {**st.env, "NEWSLORA_API_URL": st.url, "NEWSLORA_HOME": str(tmp_path / "cli-home")}
    r = newslora_cli(env, "prep", str(mine), "--name", "mine", "--no-wait", "validation_fraction=0")
    assert r.returncode == 0, r.stdout + r.stderr
    client = st.client()
    job = client.list()["items"][0]
    full = client.get(job["id"])
    assert full["spec"]["train"]["path"].endswith("/mine.jsonl") and str(mine) != full["spec"]["train"]["path"]
    done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=120)
    assert done["status"] == "succeeded", done
