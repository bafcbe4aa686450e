"""Migrations on SQLite and PostgreSQL: a store written at an older revision upgrades with its rows, and the
migrated schema is the one db/models.py declares."""
from __future__ import annotations

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, text

from db import results as resq
from db.models import Base
from db.session import get_engine, session_scope, upgrade_db


@pytest.fixture(params=["sqlite", "postgres"])
def empty_store_url(request, tmp_path) -> str:
    """A store with no tables at all, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    url = request.getfixturevalue("pg_url")
    with get_engine(url).begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    return url


def _insert_0001_rows(url: str) -> dict[str, int]:
    """Two adapters, two exports of the first and one of the second, and one of an adapter whose row is
    gone, as revision 0001's code wrote them (the adapter's id only in the export's JSON). Returns the ids
    by name."""
    def insert(c, name: str, kind: str, spec: str, metrics: str | None) -> int:
        c.execute(text("INSERT INTO model_artifacts (kind, name, spec, metrics, base_model, path, created_at) "
                       "VALUES (:kind, :name, :spec, :metrics, 'm', '/p', '2026-01-01 00:00:00')"),
                  {"kind": kind, "name": name, "spec": spec, "metrics": metrics})
        return c.execute(text("SELECT id FROM model_artifacts WHERE name = :name"), {"name": name}).scalar_one()

    with get_engine(url).begin() as c:
        ids = {name: insert(c, name, "adapter", "{}", None) for name in ("a1", "a2")}
        for name, adapter, fmt in (("e1", "a1", "gguf"), ("e2", "a2", "merged"), ("e3", "a1", "peft")):
            ids[name] = insert(c, name, "export", json.dumps({"adapter_id": ids[adapter], "format": fmt}),
                               json.dumps({"adapter_id": ids[adapter]}))
        ids["gone"] = insert(c, "gone", "export", json.dumps({"adapter_id": ids["a2"] + 100}), None)
    return ids


def test_0002_backfills_source_adapter_id_and_exports_of_finds_old_exports(empty_store_url):
    upgrade_db(empty_store_url, revision="0001")
    ids = _insert_0001_rows(empty_store_url)
    upgrade_db(empty_store_url)
    with session_scope(empty_store_url) as s:
        assert [e.id for e in resq.exports_of(ids["a1"], session=s)] == [ids["e3"], ids["e1"]]  # newest first
        assert [e.id for e in resq.exports_of(ids["a2"], session=s)] == [ids["e2"]]
        assert resq.get_artifact(ids["gone"], session=s).source_adapter_id is None  # no dangling reference
        new_id = resq.add_model_artifact(session=s, kind="export", source_adapter_id=ids["a2"], name="e4",
                                         base_model="m", path="/p", spec={"adapter_id": ids["a2"]}).id
    with session_scope(empty_store_url) as s:
        assert [e.id for e in resq.exports_of(ids["a2"], session=s)] == [new_id, ids["e2"]]


def test_exports_of_is_one_query_on_the_column(store_url):
    """No export row is read to filter it: the adapter's id is matched in SQL."""
    with session_scope(store_url) as s:
        adapter = resq.add_model_artifact(session=s, kind="adapter", name="a", base_model="m", path="/p", spec={})
        other = resq.add_model_artifact(session=s, kind="adapter", name="b", base_model="m", path="/p", spec={})
        for n, source in enumerate((adapter.id, other.id, adapter.id)):
            resq.add_model_artifact(session=s, kind="export", source_adapter_id=source, name=f"e{n}",
                                    base_model="m", path="/p", spec={"adapter_id": source})
        adapter_id = adapter.id
    statements: list[str] = []

    def listener(conn, cursor, sql, *rest) -> None:
        statements.append(sql)
    with session_scope(store_url) as s:
        engine = s.get_bind()
        event.listen(engine, "before_cursor_execute", listener)
        try:
            assert [r.name for r in resq.exports_of(adapter_id, session=s)] == ["e2", "e0"]
        finally:
            event.remove(engine, "before_cursor_execute", listener)
    [sql] = [q for q in statements if "model_artifacts" in q]
    assert "source_adapter_id" in sql


def test_migrated_schema_matches_the_models(empty_store_url):
    upgrade_db(empty_store_url)
    with get_engine(empty_store_url).connect() as c:
        assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
