"""Fixtures of the reliability tests: Redis and PostgreSQL of their own (restartable), and stacks on them.

Secrets are set to recognisable values so the tests can check they never appear in logs, events or errors.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_status  # noqa: F401 - re-exported for the tests here

from tests.conftest import Stack, make_stack_env
from tests.reliability.services import PostgresCluster, RedisServer

DB_PASSWORD = "pg-Secret-7Qz9"
API_TOKEN = "tok-Secret-K3v8"
SECRETS = (DB_PASSWORD, API_TOKEN)


@pytest.fixture(scope="session")
def own_pg() -> PostgresCluster:
    pg = PostgresCluster(DB_PASSWORD)
    try:
        pg.init()
    except Exception as e:  # noqa: BLE001
        pg.destroy()
        pytest.fail(f"could not start a PostgreSQL cluster of our own: {e}")
    yield pg
    pg.destroy()


@pytest.fixture(scope="session")
def own_redis(tmp_path_factory) -> RedisServer:
    r = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield r
    r.stop()


@pytest.fixture
def rel_db_url(own_pg) -> str:
    """A fresh database in our own cluster (with a password in its URL)."""
    try:
        own_pg.psql("SELECT 1")
    except Exception:  # noqa: BLE001 - a test that stopped it failed midway: bring it back
        own_pg.start()
    return own_pg.create_database(f"rel_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def rel_redis_url(own_redis) -> str:
    if own_redis.proc is None:
        own_redis.start()
    own_redis.client().flushall()
    return own_redis.url


@pytest.fixture
def rel_stack_factory(tmp_path, rel_db_url, rel_redis_url):
    """Build Stacks on our own Redis and PostgreSQL; each is stopped at the end of the test."""
    stacks: list[Stack] = []

    def make(**extra: str) -> Stack:
        home = tmp_path / f"home{len(stacks)}"
        home.mkdir()
        env = make_stack_env(home, database_url=rel_db_url, broker_url=rel_redis_url,
                             **{"NEWSLORA_VISIBILITY_TIMEOUT_S": "5", **extra})
        st = Stack(env, home)
        stacks.append(st)
        return st
    yield make
    for st in stacks:
        st.stop()


def assert_no_secrets(stack: Stack, *texts: str) -> None:
    """No secret in any log of the stack's processes, nor in the given texts (errors, events)."""
    logs = {p.name: p.read_text(errors="replace") for p in Path(stack.log_dir).glob("*.log")}
    for secret in SECRETS:
        for name, text in logs.items():
            assert secret not in text, f"a secret leaked into {name}"
        for i, t in enumerate(texts):
            assert secret not in t, f"a secret leaked into text #{i}: {t[:300]}"
