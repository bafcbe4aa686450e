"""Engines, one session per unit of work, and migrations on start."""
from __future__ import annotations

import contextlib
import fcntl
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings

log = logging.getLogger("newslora.db")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class StoreUnavailable(RuntimeError):
    """The database cannot be reached (after bounded retries)."""


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().resolved_database_url
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # WAL: readers do not block the writer
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    # prepare_threshold=None: no server-side prepared statements. psycopg prepares a statement after its fifth
    # run on a connection; after a PostgreSQL restart a write failed with `InvalidSqlStatementName: prepared
    # statement "_pg3_2" does not exist` (found by the soak, issue #27). The statements here are short.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                         connect_args={"connect_timeout": 5, "prepare_threshold": None})


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextlib.contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One session per unit of work: commits on success, rolls back on error."""
    session = _sessionmaker(url or get_settings().resolved_database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def wait_for_db(url: str | None = None, *, retries: int | None = None, delay_s: float = 1.0) -> None:
    """Block until the database answers, with bounded retries, saying what it waits for."""
    url = url or get_settings().resolved_database_url
    retries = get_settings().wait_retries if retries is None else retries
    for attempt in range(1, retries + 1):
        try:
            with get_engine(url).connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except OperationalError as e:
            log.warning("waiting for the database at %s (try %d/%d): %s", _redact(url), attempt, retries,
                        str(e).splitlines()[0])
            time.sleep(delay_s)
    raise StoreUnavailable(f"the database at {_redact(url)} did not answer after {retries} tries")


def _redact(url: str) -> str:
    """The URL without its password (never log secrets)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<database>"


def upgrade_db(url: str | None = None, *, revision: str = "head") -> None:
    """Run the Alembic migrations up to `revision` (tests stop at an older one), one process at a time."""
    url = url or get_settings().resolved_database_url
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":
        lock_path = Path(url.split("///", 1)[1] + ".migrate.lock")
        with lock_path.open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
    else:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(771177)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)


def init_db(url: str | None = None) -> None:
    wait_for_db(url)
    upgrade_db(url)
