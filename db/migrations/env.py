"""Alembic environment: runs on the connection handed in by db.session.upgrade_db (or the URL)."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    conn = config.attributes.get("connection")
    if conn is None:
        engine = create_engine(config.attributes.get("url") or config.get_main_option("sqlalchemy.url"))
        with engine.begin() as c:
            context.configure(connection=c, target_metadata=target_metadata, render_as_batch=True)
            context.run_migrations()
        return
    context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
    context.run_migrations()


run_migrations_online()
