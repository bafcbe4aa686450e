"""The review's probes (issue #24), each against the real API: two members and an admin, on SQLite and
PostgreSQL (the `store_url` fixture), with real Redis as the broker."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.settings import reset_settings

ADMIN_TOKEN = "admin-bootstrap-token-for-tests"
SECRET = "root:x:0:0:secret-line"


@pytest.fixture
def team(store_url, redis_url, monkeypatch, tmp_path):
    """(client, headers of admin, alice, bob, the data root, an outside folder)."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.csv").write_text(f"text,label\n{SECRET},x\n")
    (root / "ok.csv").write_text("text,label\nhello,World\nbye,Sports\n")
    (root / "escape.csv").symlink_to(outside / "secret.csv")
    monkeypatch.setenv("NEWSLORA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DATABASE_URL", store_url)
    monkeypatch.setenv("BROKER_URL", redis_url)
    monkeypatch.setenv("NEWSLORA_API_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("NEWSLORA_DATA_ROOTS", json.dumps([str(root)]))
    monkeypatch.setenv("NEWSLORA_MAX_INLINE_ITEMS", "5")
    reset_settings()
    from api.app import app
    with TestClient(app) as api:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        heads = {}
        for name in ("alice", "bob"):
            r = api.post("/tokens", json={"name": name}, headers=admin)
            assert r.status_code == 201, r.text
            heads[name] = {"Authorization": f"Bearer {r.json()['token']}"}
        yield api, admin, heads["alice"], heads["bob"], root, outside
    reset_settings()


def _seed_results(job_id: int) -> dict[str, int]:
    """A dataset, an adapter, an export (with files) and an evaluation made by job `job_id`."""
    from core.settings import get_settings
    from db.models import Dataset, Evaluation, Job, ModelArtifact
    from db.session import session_scope
    export = get_settings().path("exports", f"e{job_id}")
    export.mkdir(parents=True, exist_ok=True)
    (export / "adapter_config.json").write_text("{}")
    with session_scope() as s:
        kids = [Job(kind="noop", queue="cpu", status="succeeded", spec={}, parent_id=job_id,
                    owner_id=s.get(Job, job_id).owner_id) for _ in range(3)]
        s.add_all(kids)
        s.flush()
        ds = Dataset(job_id=job_id, name="d", path="/tmp/d", hash="0" * 64, spec_hash="1" * 64, spec={}, meta={})
        s.add(ds)
        s.flush()
        ad = ModelArtifact(job_id=kids[0].id, kind="adapter", name="a", base_model="m", path="/tmp/a", spec={})
        s.add(ad)
        s.flush()
        ex = ModelArtifact(job_id=kids[1].id, kind="export", source_adapter_id=ad.id, name="e", base_model="m",
                           path=str(export), spec={})
        ev = Evaluation(job_id=kids[2].id, name="ev", spec={}, document={"models": {}}, report_path=None)
        s.add_all([ex, ev])
        s.flush()
        return {"dataset": ds.id, "adapter": ad.id, "export": ex.id, "evaluation": ev.id}


def test_a_member_sees_only_their_own_and_an_admin_sees_all(team):
    api, admin, alice, bob, *_ = team
    job = api.post("/jobs", json={"kind": "noop", "spec": {}}, headers=alice).json()
    ids = _seed_results(job["id"])
    f = api.post("/files", files={"file": ("mine.csv", b"text,label\na,b\n")}, data={"purpose": "data"},
                 headers=alice).json()
    theirs = [f"/jobs/{job['id']}", f"/jobs/{job['id']}/events", f"/jobs/{job['id']}/predictions",
              f"/jobs/{job['id']}/judge_scores", f"/datasets/{ids['dataset']}", f"/models/{ids['adapter']}",
              f"/models/{ids['adapter']}/exports", f"/models/{ids['export']}/download",
              f"/evaluations/{ids['evaluation']}", f"/evaluations/{ids['evaluation']}/report",
              f"/dashboard/fragments/jobs/{job['id']}", f"/files/{f['id']}", f"/files/{f['id']}/content"]
    for path in theirs:
        assert api.get(path, headers=bob).status_code == 404, path
        assert api.get(path, headers=admin).status_code in (200, 409), path  # 409: a report with no models
    for path in ("/jobs", "/datasets", "/models", "/evaluations", "/files"):
        got = api.get(path, headers=bob).json()
        items = got["items"] if isinstance(got, dict) else got
        assert items == [], (path, got)
        mine = api.get(path, headers=alice).json()
        assert (mine["items"] if isinstance(mine, dict) else mine), path
    assert "alice" not in api.get("/dashboard/fragments/jobs", headers=bob).text
    assert api.post(f"/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert api.delete(f"/files/{f['id']}", headers=bob).status_code == 404
    # A spec that names another's dataset, adapter, job or file: 404 as if missing.
    for kind, spec in (("train", {"dataset_id": ids["dataset"]}),
                       ("classify", {"items": [{"id": "a", "text": "x"}], "adapter_id": ids["adapter"]}),
                       ("evaluate", {"classify_job_ids": [job["id"]]}),
                       ("prep", {"train": {"path": f["id"]}, "test": None})):
        r = api.post("/jobs", json={"kind": kind, "spec": spec}, headers=bob)
        assert r.status_code == 404, (kind, r.text)
    assert api.get(f"/files/{f['id']}/content", headers=alice).content == b"text,label\na,b\n"
    assert api.delete(f"/files/{f['id']}", headers=alice).status_code == 200


def test_only_an_admin_manages_tokens_and_a_revoked_token_is_refused(team):
    api, admin, alice, bob, *_ = team
    assert api.post("/tokens", json={"name": "eve", "role": "admin"}, headers=alice).status_code == 403
    assert api.get("/tokens", headers=bob).status_code == 403
    listed = api.get("/tokens", headers=admin).json()
    assert {t["user"] for t in listed} == {"alice", "bob"} and all("token" not in t for t in listed)
    assert api.post("/tokens/bob/revoke", headers=admin).json() == {"revoked": 1}
    assert api.get("/jobs", headers=bob).status_code == 401
    assert api.get("/jobs").status_code == 401  # tokens configured: loopback needs one too


def test_an_upload_is_named_by_its_id_in_a_spec(team):
    api, admin, alice, *_ = team
    content = b"text,label\nhello,World\nbye,Sports\n"
    f = api.post("/files", files={"file": ("news.csv", content)},
                 data={"purpose": "data"}, headers=alice)
    assert f.status_code == 201, f.text
    fid = f.json()["id"]
    assert f.json()["bytes"] == len(content) and len(f.json()["sha256"]) == 64 and "path" not in f.json()
    job = api.post("/jobs", json={"kind": "prep", "spec": {"train": {"path": fid}, "test": None,
                                                           "validation_fraction": 0}}, headers=alice)
    assert job.status_code == 201, job.text
    stored = Path(job.json()["spec"]["train"]["path"])
    assert stored.name == "news.csv" and stored.read_bytes().startswith(b"text,label")


def test_every_path_field_out_of_the_roots_is_403_without_content(team):
    api, admin, alice, bob, root, outside = team
    secret = str(outside / "secret.csv")
    for value in (secret, f"{root}/../outside/secret.csv", str(root / "escape.csv")):
        for kind, spec in (
                ("prep", {"train": {"path": value}, "test": None}),
                ("prep", {"train": {"path": value, "format": "hub", "split": "train"}, "test": None}),
                ("prep", {"train": {"path": str(root / "ok.csv"), "classes_file": value}, "test": None}),
                ("prep", {"train": {"path": str(root / "ok.csv")}, "test": None, "tokenizer": value}),
                ("classify", {"input_file": value}),
                ("classify", {"items": [{"id": "a", "text": "x"}], "model": value}),
                ("train", {"dataset_id": 1, "model": value}),
                ("judge", {"classify_job_id": 1, "backend": "local", "judge_model": value}),
                ("pipeline", {"prep": {"train": {"path": value}, "test": None}}),
                ("pipeline", {"prep": {"train": {"path": str(root / "ok.csv"), "classes_file": value},
                                       "test": None}})):
            r = api.post("/jobs", json={"kind": kind, "spec": spec}, headers=admin)
            assert r.status_code == 403, (kind, spec, r.text)
            assert SECRET not in r.text and "secret-line" not in r.text
            field = r.json()["detail"].split(":")[0]
            assert field and " " not in field, r.text  # names the field first
    r = api.post("/jobs", json={"kind": "prep", "spec": {"train": {"path": str(root / "ok.csv")}, "test": None}},
                 headers=alice)
    assert r.status_code == 201, r.text
    assert api.get("/jobs", headers=admin).json()["total"] == 1


def test_cross_site_requests_and_foreign_hosts_are_403(team):
    api, admin, alice, *_ = team
    job = api.post("/jobs", json={"kind": "noop", "spec": {}}, headers=alice).json()
    for extra in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
        r = api.post(f"/jobs/{job['id']}/cancel", headers={**alice, **extra,
                                                           "Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 403, (extra, r.text)
    assert api.get(f"/jobs/{job['id']}", headers=alice).json()["status"] == "queued"
    assert api.get("/jobs", headers={**alice, "Host": "evil.example"}).status_code == 403
    same = api.post(f"/jobs/{job['id']}/cancel", headers={**alice, "Origin": "http://testserver"})
    assert same.status_code == 200 and same.json()["status"] == "cancelled"


def test_judge_endpoints_and_key_variables_only_from_the_allow_lists(team):
    api, admin, alice, *_ = team
    for spec, setting in (({"backend": "openai", "base_url": "http://attacker/v1"}, "NEWSLORA_JUDGE_URLS"),
                          ({"backend": "ollama", "host": "http://169.254.169.254"}, "NEWSLORA_JUDGE_URLS"),
                          ({"backend": "openai", "base_url": "http://127.0.0.1:11434/v1",
                            "api_key_env": "NEWSLORA_API_TOKEN"}, "NEWSLORA_JUDGE_KEY_ENVS"),
                          ({"backend": "openai", "base_url": "http://127.0.0.1:11434/v1",
                            "api_key_env": "AWS_SECRET_ACCESS_KEY"}, "NEWSLORA_JUDGE_KEY_ENVS")):
        r = api.post("/jobs", json={"kind": "judge", "spec": {"dialogue": True, **spec}}, headers=alice)
        assert r.status_code == 403 and setting in r.json()["detail"], r.text
        r = api.post("/jobs", json={"kind": "pipeline", "spec": {"judge": spec}}, headers=alice)
        assert r.status_code == 403 and setting in r.json()["detail"] and "judge." in r.json()["detail"], r.text


def test_bounds_on_items_texts_and_lists(team):
    api, admin, alice, *_ = team
    many = [{"id": str(i), "text": "x"} for i in range(6)]
    r = api.post("/jobs", json={"kind": "classify", "spec": {"items": many}}, headers=alice)
    assert r.status_code == 422 and "NEWSLORA_MAX_INLINE_ITEMS" in r.text
    r = api.post("/jobs", json={"kind": "prep", "spec": {"instruction": "x" * 20_000}}, headers=alice)
    assert r.status_code == 422 and "x" * 100 not in r.text
    r = api.post("/jobs", json={"kind": "bake" * 1000, "spec": {}}, headers=alice)
    assert r.status_code == 422 and "bakebake" not in r.text
    api.post("/jobs", json={"kind": "noop", "spec": {}}, headers=alice)
    listed = api.get("/jobs", headers=alice).json()
    assert "spec" not in listed["items"][0]
    assert "spec" in api.get(f"/jobs/{listed['items'][0]['id']}", headers=alice).json()
    assert api.get("/jobs", params={"limit": 100_000}, headers=alice).status_code == 422


def test_html_answers_carry_a_policy_and_nosniff(team):
    api, admin, *_ = team
    for path in ("/dashboard", "/dashboard/fragments/jobs", "/dashboard/fragments/evaluations"):
        r = api.get(path, headers=admin)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        assert r.headers["x-content-type-options"] == "nosniff" and "default-src" in \
            r.headers["content-security-policy"], path
