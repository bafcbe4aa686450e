"""One settings object, read from the environment (and `.env`), for every process.

With neither `BROKER_URL` nor `DATABASE_URL` set, newslora runs embedded: SQLite for the
store and kombu's SQLAlchemy transport (also on SQLite) for the broker, all under
`NEWSLORA_HOME` (default `~/.newslora`).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # No populate_by_name: a field name such as `home` must not read the HOME variable.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    home: Path = Field(default=Path.home() / ".newslora", alias="NEWSLORA_HOME")
    database_url: str | None = Field(default=None, alias="DATABASE_URL")
    broker_url: str | None = Field(default=None, alias="BROKER_URL")
    api_url: str | None = Field(default=None, alias="NEWSLORA_API_URL")
    api_host: str = Field(default="127.0.0.1", alias="NEWSLORA_API_HOST")
    api_port: int = Field(default=8765, alias="NEWSLORA_API_PORT")
    # Required on every route when the API listens on anything but loopback.
    api_token: str | None = Field(default=None, alias="NEWSLORA_API_TOKEN")
    ollama_host: str = Field(default="http://127.0.0.1:11434", alias="OLLAMA_HOST")
    # Folders that dataset and adapter paths given to the API must lie under (besides home).
    data_roots: list[Path] = Field(default_factory=list, alias="NEWSLORA_DATA_ROOTS")
    # A running job renews its lease every heartbeat_s; a lease older than lease_s means its worker died.
    heartbeat_s: float = Field(default=5.0, alias="NEWSLORA_HEARTBEAT_S")
    lease_s: float = Field(default=30.0, alias="NEWSLORA_LEASE_S")
    # Redis re-delivers an unacked message after this many seconds; the lease makes that safe. Keep it
    # above job_time_limit_s so a healthy long job is never delivered twice (see redelivery_warning).
    visibility_timeout_s: int = Field(default=7 * 3600, alias="NEWSLORA_VISIBILITY_TIMEOUT_S")
    # Hard ceiling on any one job's run time; a job past it is failed with the reason.
    job_time_limit_s: int = Field(default=6 * 3600, alias="NEWSLORA_JOB_TIME_LIMIT_S")
    # A job queued this long without a worker taking it has its message re-sent: a broker killed before
    # it wrote a message to disk (Redis appendfsync everysec) loses up to a second of them. Duplicates are
    # dropped by the lease, so this only costs a message.
    requeue_queued_after_s: float = Field(default=900.0, alias="NEWSLORA_REQUEUE_QUEUED_AFTER_S")
    # Torch intra-op threads in each worker process (None: torch's default, one per core). On a small
    # machine shared with other processes, 1 avoids threads waiting on each other (measured on 2 cores
    # under load: 12 generated tokens 55 s with 2 threads, 3 s with 1).
    torch_threads: int | None = Field(default=None, ge=1, alias="NEWSLORA_TORCH_THREADS")
    wait_retries: int = Field(default=30, alias="NEWSLORA_WAIT_RETRIES")
    # A classify job with more items than this becomes shard child jobs on the gpu queue, so that every gpu
    # worker takes a part (workers/jobs/shards.py); a killed worker costs at most one shard's unsaved items.
    classify_shard_size: int = Field(default=4000, ge=1, alias="NEWSLORA_CLASSIFY_SHARD_SIZE")
    max_body_bytes: int = Field(default=50 * 1024 * 1024, alias="NEWSLORA_MAX_BODY_BYTES")

    def redelivery_warning(self) -> str | None:
        """Why Redis could deliver a healthy running job a second time, or None when the settings agree."""
        if self.visibility_timeout_s > self.job_time_limit_s:
            return None
        return (f"NEWSLORA_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s} s) is not above "
                f"NEWSLORA_JOB_TIME_LIMIT_S ({self.job_time_limit_s} s): Redis will re-deliver a job that runs longer "
                f"than the visibility timeout while it still runs (the job's lease drops the duplicate). Set the "
                f"visibility timeout above the time limit, e.g. 25200 and 21600.")

    @property
    def embedded(self) -> bool:
        return self.broker_url is None and self.database_url is None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'newslora.sqlite'}"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.sqlite'}"

    @property
    def resolved_api_url(self) -> str:
        return self.api_url or f"http://{self.api_host}:{self.api_port}"

    def path(self, *parts: str) -> Path:
        """A folder under home, created on first use."""
        p = self.home.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()
