"""The bind decides: an API listening on every interface without a token serves nobody; the CLI against an API
on another address (a second loopback address) preps, trains and classifies from local files the server never
saw (uploads)."""
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


def test_the_cli_preps_trains_and_classifies_from_local_files_the_server_never_saw(stack_factory, tmp_path,
                                                                                   tiny_model_dir):
    data_root = tmp_path / "server-data"
    data_root.mkdir()
    st = stack_factory(NEWSLORA_API_TOKEN=TOKEN, NEWSLORA_DATA_ROOTS=json.dumps([str(data_root)]),
                       NEWSLORA_MODEL_ROOTS=json.dumps([str(tiny_model_dir.parent)]))
    _serve(st, "127.0.0.2")
    assert _wait(st.url, {"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    st.start_worker(queues="cpu,gpu")
    laptop = tmp_path / "laptop"  # outside the server's data roots: only an upload gets these there
    laptop.mkdir()
    mine = laptop / "mine.jsonl"
    mine.write_text("".join(json.dumps({"text": f"article {i} about {lab}", "label": lab}) + "\n"
                            for i in range(12) for lab in ("World", "Sports")))
    env = {**st.env, "NEWSLORA_API_URL": st.url, "NEWSLORA_HOME": str(tmp_path / "cli-home")}
    client = st.client()

    def cli_job(*args: str) -> dict:
        before = {j["id"] for j in client.list()["items"]}
        r = newslora_cli(env, *args, "--no-wait", timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        (job,) = [j for j in client.list()["items"] if j["id"] not in before]
        done = wait_status(client, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", (done.get("error"), st.log("worker")[-3000:])
        return client.get(job["id"])

    prep = cli_job("prep", str(mine), "--name", "mine", "validation_fraction=0")
    uploads = st.env["NEWSLORA_HOME"] + "/files/"  # a file id resolves to its bytes on the server, never the laptop
    assert prep["spec"]["train"]["path"].startswith(uploads) and str(laptop) not in json.dumps(prep["spec"])
    dataset_id = prep["result"]["dataset_id"]
    train = cli_job("train", "--dataset", str(dataset_id), "--model", str(tiny_model_dir), "max_steps=2",
                    "batch_size=4", "warmup_steps=0", "eval_every=2", "val_samples=4", "dtype=fp32", "max_seq_len=96")
    adapter_id = train["result"]["adapter_id"]
    articles = laptop / "articles.jsonl"
    articles.write_text("".join(json.dumps({"id": f"a{i}", "text": f"news story number {i}"}) + "\n"
                                for i in range(7)))
    classify = cli_job("classify", "--adapter", str(adapter_id), "--model", str(tiny_model_dir), str(articles),
                       "dtype=fp32")
    assert classify["spec"]["input_file"].startswith(uploads) and str(laptop) not in json.dumps(classify["spec"])
    preds = client.predictions(classify["id"])["items"]
    assert sorted(p["item_id"] for p in preds) == [f"a{i}" for i in range(7)]
    assert {p["label"] for p in preds} <= {"World", "Sports"}
