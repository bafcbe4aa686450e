"""One settings object, read from the environment (and `.env`), for every process.

With neither `BROKER_URL` nor `DATABASE_URL` set, newslora runs embedded: SQLite for the
store and kombu's SQLAlchemy transport (also on SQLite) for the broker, all under
`NEWSLORA_HOME` (default `~/.newslora`).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from pydantic import Field, PrivateAttr
from pydantic_settings import BaseSettings, SettingsConfigDict


REPO = Path(__file__).resolve().parents[1]


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
    # A JSON body is parsed whole (the largest, of tiny items, takes ~12x its size in memory: 8 MiB -> ~100 MB):
    # 8 MiB holds NEWSLORA_MAX_INLINE_ITEMS news articles; anything bigger is an upload, streamed to disk.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, alias="NEWSLORA_MAX_BODY_BYTES")
    # The torchtune backend's isolated environment (scripts/setup_torchtune_env.sh): a python executable,
    # else a venv folder, else the repository's .venv-torchtune.
    torchtune_python: Path | None = Field(default=None, alias="NEWSLORA_TORCHTUNE_PYTHON")
    torchtune_venv: Path | None = Field(default=None, alias="NEWSLORA_TORCHTUNE_VENV")
    # The shared data folder (ag_news/ ...) the benchmarks read their articles from.
    shared_data: Path = Field(default=REPO.parent / "shared" / "data", alias="NEWSLORA_SHARED_DATA")
    # W&B's mode for training runs with `wandb: true` (both backends): offline unless set otherwise, so a run
    # syncs only where asked to ("online"); "disabled" turns it off.
    wandb_mode: str = Field(default="offline", alias="WANDB_MODE")
    # ---- sharing one instance with a team (README "Running it for a team")
    # Folders that model and tokenizer paths given to the API must lie under (besides home).
    model_roots: list[Path] = Field(default_factory=list, alias="NEWSLORA_MODEL_ROOTS")
    # Host names the API answers to (the Host header; DNS rebinding): loopback names by default.
    allowed_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost", "::1", "[::1]"],
                                     alias="NEWSLORA_ALLOWED_HOSTS")
    # Judge endpoints a judge spec may name (Ollama hosts and OpenAI-compatible base URLs): a worker calls
    # nothing else. The local Ollama by default.
    judge_urls: list[str] = Field(default_factory=lambda: ["http://127.0.0.1:11434", "http://localhost:11434",
                                                           "http://127.0.0.1:11434/v1", "http://localhost:11434/v1"],
                                  alias="NEWSLORA_JUDGE_URLS")
    # Environment variables a judge spec may name as `api_key_env` (never the API's own token).
    judge_key_envs: list[str] = Field(default_factory=lambda: ["OPENAI_API_KEY", "NEWSLORA_JUDGE_API_KEY"],
                                      alias="NEWSLORA_JUDGE_KEY_ENVS")
    # One upload's size limit (POST /files, /v1/files).
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1, alias="NEWSLORA_MAX_UPLOAD_BYTES")
    # Items a classify job may carry in its body; a larger batch is an uploaded file (sharded as usual).
    max_inline_items: int = Field(default=10_000, ge=1, alias="NEWSLORA_MAX_INLINE_ITEMS")
    # How long POST /v1/chat/completions and /v1/completions wait for their worker before answering 429
    # (`x-should-retry: false`: send more than a few texts as a batch, POST /v1/batches).
    openai_sync_timeout_s: float = Field(default=60.0, gt=0, alias="NEWSLORA_OPENAI_SYNC_TIMEOUT_S")
    # NEWSLORA_<PRESET>_DIR (the preset's name upper-cased, '-' as '_'), e.g. NEWSLORA_LLAMA2_7B_DIR: a local
    # checkpoint folder that the model preset loads from instead of its own source (`preset_dir`).
    _preset_dirs: dict[str, Path] = PrivateAttr(default_factory=lambda: _preset_dirs_from_environ())

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

    def preset_dir(self, preset: str) -> Path | None:
        """The checkpoint folder $NEWSLORA_<PRESET>_DIR names for a model preset, or None."""
        return self._preset_dirs.get(preset_dir_variable(preset))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment)."""
    get_settings.cache_clear()


def preset_dir_variable(preset: str) -> str:
    """The environment variable that points a model preset at a local checkpoint folder."""
    return f"NEWSLORA_{preset.upper().replace('-', '_')}_DIR"


def _preset_dirs_from_environ() -> dict[str, Path]:
    return {k: Path(v).expanduser() for k, v in os.environ.items()
            if k.startswith("NEWSLORA_") and k.endswith("_DIR") and v}


def child_environment(*, drop: Iterable[str] = (), **overrides: str) -> dict[str, str]:
    """The environment for a subprocess: this process's, less the variables in `drop`, plus `overrides`.

    The one place a child's environment is built from os.environ (a subprocess inherits the settings'
    variables, PATH, HOME ... as it would by default).
    """
    dropped = set(drop)
    return {**{k: v for k, v in os.environ.items() if k not in dropped}, **overrides}


def environment_secret(name: str) -> str | None:
    """The value of the environment variable `name`, for a secret a spec may only name (a judge's API key
    variable: which names are allowed is the judge spec's rule), or None when unset or empty."""
    return os.environ.get(name) or None
