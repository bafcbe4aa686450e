"""A soak under faults (issue #27): many clients, killed workers, restarted Redis and PostgreSQL, a full disk,
and every invariant checked over the whole history at the end.

    nice -n 10 .venv/bin/python -m tests.reliability.soak --minutes 10 --clients 8 --fault-every 20 --seed 1 \\
        --out /tmp/soak-seed1

What runs (all real, each a process of its own): a Redis and a PostgreSQL cluster of the soak's own
(tests/reliability/services.py, restartable), the API (uvicorn), two gpu workers (queue gpu) and a cpu
worker (queue cpu), started as tests/conftest.py's `Stack` starts them. The artifact home (NEWSLORA_HOME)
lies on a small tmpfs so that the disk can be filled. N client threads, each with its own
`api_client.Client`, submit a seeded mix for a bounded time: classify batches of 50-2,000 items (the big
ones sharded), classify with an adapter, prep, short training runs on a tiny seeded Llama, evaluate,
export (peft and merged), pipelines, cancels of random jobs, and re-submissions with the same idempotency
key. A client retries a 503 after its `Retry-After`, and an unreachable API, with the same idempotency key;
a 500 is a violation. Meanwhile a seeded fault injector SIGKILLs a worker (restarted after a delay),
SIGKILLs and restarts the API, restarts PostgreSQL, SIGKILLs and restarts Redis, and fills the artifact
disk, holds it full, then frees it; each fault is logged with its time.

After the bounded time the faults stop, every job must reach a terminal state within a bound, and the
invariants (`check_invariants`) are checked over the store, the artifact folders and what the clients
saw. The table is printed and written to OUT/table.md; OUT/soak.json holds the whole report, OUT/faults.jsonl
the fault log, OUT/rss.csv the memory samples and OUT/logs/ every process's log.

tests/reliability/test_soak.py runs the same code for two minutes in CI.
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.conftest import Stack, make_stack_env, make_tiny_llama, smollm2_checkpoint
from tests.reliability.services import PostgresCluster, RedisServer, SmallDisk

REPO = Path(__file__).resolve().parents[2]
AG_NEWS = Path(os.environ.get("NEWSLORA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ag_news"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TERMINAL = ("succeeded", "failed", "cancelled")
WORKERS = {"gpu1": "gpu", "gpu2": "gpu", "cpu1": "cpu"}
FAULTS = ("kill_worker", "kill_api", "restart_postgres", "kill_redis", "fill_disk")
PG_PASSWORD = "soak-pg-Secret-1"
REFUSED = object()  # SoakClient.call: the API answered with one of the statuses the caller expects


@dataclass
class SoakConfig:
    out: Path
    minutes: float = 10.0
    clients: int = 8
    fault_every: float = 20.0
    seed: int = 1
    drain_s: float = 600.0  # every job terminal within this long after the faults stop
    shard_size: int = 500  # NEWSLORA_CLASSIFY_SHARD_SIZE: a batch over this many items is sharded
    disk_mb: int = 384  # the artifact home's tmpfs
    outstanding: int = 2  # unfinished jobs a client keeps at most (the machine has 2 cores)
    min_faults_per_type: int = 5
    rss_bound_mb: dict[str, int] = field(default_factory=lambda: {"api": 1024, "worker": 3072})
    model_dir: Path | None = None  # the tiny seeded Llama (built under OUT when None)

    @property
    def seconds(self) -> float:
        return self.minutes * 60


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ================================================================ history: what everyone saw

class History:
    """Everything the clients and the injector saw, appended from many threads."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.lock = threading.Lock()
        self.submissions: dict[str, dict[str, Any]] = {}  # idempotency key -> {kind, spec, ids, client, t}
        self.accepted: dict[int, str] = {}  # job id -> key
        self.final: dict[int, dict[str, Any]] = {}  # job id -> the job as a client last saw it, terminal
        self.cancels: list[dict[str, Any]] = []
        self.http: collections.Counter = collections.Counter()  # "METHOD status"
        self.violations: list[dict[str, Any]] = []  # 500s, 503s without Retry-After, lost jobs ...
        self.faults: list[dict[str, Any]] = []
        self.probes: list[dict[str, Any]] = []  # jobs submitted right after the disk was freed
        self.gave_up: list[dict[str, Any]] = []

    def t(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def violation(self, kind: str, **detail: Any) -> None:
        with self.lock:
            self.violations.append({"t": self.t(), "kind": kind, **detail})

    def fault(self, kind: str, **detail: Any) -> dict[str, Any]:
        ev = {"t": self.t(), "time": now_iso(), "fault": kind, **detail}
        with self.lock:
            self.faults.append(ev)
        print(f"[soak {ev['t']:7.1f}s] fault {kind} {json.dumps(detail)}", flush=True)
        return ev

    def submitted(self, key: str, kind: str, spec: dict[str, Any], client: str, job_id: int) -> None:
        with self.lock:
            sub = self.submissions.setdefault(key, {"kind": kind, "spec": spec, "ids": set(), "client": client,
                                                    "t": self.t()})
            sub["ids"].add(job_id)
            self.accepted[job_id] = key


# ================================================================ the stack under faults

class SoakStack:
    """Redis, PostgreSQL, the API and three workers, each restartable; the artifact home on a tmpfs."""

    def __init__(self, cfg: SoakConfig, history: History):
        self.cfg = cfg
        self.history = history
        self.lock = threading.RLock()
        self.root = cfg.out
        self.home = self.root / "home"
        self.logs = self.root / "logs"
        self.redis = RedisServer(self.root / "redis")
        self.pg = PostgresCluster(PG_PASSWORD)
        self.disk: SmallDisk | None = None
        self.mount_error: str | None = None
        self.stack: Stack | None = None
        self.db_url = ""
        self.down: set[str] = set()  # processes the injector took down on purpose
        self.timers: list[threading.Timer] = []

    # -- start and stop
    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self._mount_tmpfs()
        self.redis.start()
        self.pg.init()
        # Durable commits, as in deployment: the shared test clusters turn them off for speed, and then an
        # immediate shutdown (a crash) loses the last commits that the workers were told had succeeded.
        self.pg.psql("ALTER SYSTEM SET synchronous_commit = on")
        self.pg.psql("SELECT pg_reload_conf()")
        self.db_url = self.pg.create_database("soak")
        env = make_stack_env(
            self.home, database_url=self.db_url, broker_url=self.redis.url,
            NEWSLORA_HEARTBEAT_S="1", NEWSLORA_LEASE_S="6", NEWSLORA_VISIBILITY_TIMEOUT_S="600",
            NEWSLORA_JOB_TIME_LIMIT_S="500", NEWSLORA_REQUEUE_QUEUED_AFTER_S="30",
            NEWSLORA_CLASSIFY_SHARD_SIZE=str(self.cfg.shard_size), NEWSLORA_TORCH_THREADS="1",
            NEWSLORA_WAIT_RETRIES="10", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.stack = Stack(env, self.logs)
        self.stack.start_api()
        for name, queue in WORKERS.items():
            self.stack.start_worker(name, queues=queue)
        deadline = time.monotonic() + 120
        while not all(" ready." in self.stack.log(w) for w in WORKERS):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start: " + " | ".join(self.stack.log(w)[-1500:] for w in WORKERS))
            time.sleep(0.5)

    def _mount_tmpfs(self) -> None:
        """NEWSLORA_HOME on a tmpfs of disk_mb MiB, so that filling it fills nothing else."""
        try:
            self.disk = SmallDisk(self.home, self.cfg.disk_mb).mount()
        except RuntimeError as e:
            self.mount_error = str(e)
            print(f"[soak] {e}: the full-disk fault is NOT injected; the other faults run", flush=True)

    def stop(self) -> None:
        for t in self.timers:
            t.cancel()
        if self.stack is not None:
            self.stack.stop()
        try:
            self.redis.stop()
        except Exception:  # noqa: BLE001 - best effort at the end
            pass
        self.pg.destroy()
        if self.disk is not None:
            self.disk.unmount()

    # -- processes
    @property
    def url(self) -> str:
        assert self.stack is not None
        return self.stack.url

    def pids(self) -> dict[str, int]:
        with self.lock:
            return {name: p.pid for name, p in self.stack.procs.items()}

    def kill(self, name: str, *, child_only: bool = False) -> str:
        """SIGKILL a process (its whole process group), or only its pool child (a prefork worker's job
        runner; the parent then starts a new child)."""
        import psutil
        with self.lock:
            if child_only:
                try:
                    kids = psutil.Process(self.stack.procs[name].pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    kids = []
                if kids:
                    for k in kids:
                        k.kill()
                    return "pool child"
            if name not in self.stack.procs:
                return "not running"
            self.down.add(name)
            self.stack.kill(name, 9)
            return "process group"

    def start_proc(self, name: str) -> None:
        with self.lock:
            if name in self.stack.procs and self.stack.procs[name].poll() is None:
                self.down.discard(name)
                return
            self.stack.procs.pop(name, None)
            if name == "api":
                self.stack._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1",
                                          "--port", str(self.stack.port), "--log-level", "warning"])
            else:
                self.stack.start_worker(name, queues=WORKERS[name])
            self.down.discard(name)
        if name == "api":
            self.stack.wait_api(timeout=120)

    def restart_later(self, name: str, delay: float) -> None:
        t = threading.Timer(delay, self._restart_quietly, args=(name,))
        t.daemon = True
        self.timers.append(t)
        t.start()

    def _restart_quietly(self, name: str) -> None:
        try:
            self.start_proc(name)
        except Exception as e:  # noqa: BLE001 - recorded; the supervisor tries again
            self.history.violation("restart_failed", process=name, error=str(e)[:300])

    def supervise(self) -> None:
        """Restart a process that exited without the injector killing it (and record that it did)."""
        with self.lock:
            exited = [(n, p.returncode) for n, p in self.stack.procs.items()
                      if p.poll() is not None and n not in self.down]
        for name, rc in exited:
            self.history.violation("unexpected_exit", process=name, returncode=rc,
                                   log_tail=self.stack.log(name)[-1500:])
            self._restart_quietly(name)

    def ensure_all_up(self) -> None:
        for t in self.timers:
            t.cancel()
        if self.redis.proc is None:
            self.redis.start()
        try:
            self.pg.psql("SELECT 1")
        except Exception:  # noqa: BLE001
            self.pg.start()
        for name in ("api", *WORKERS):
            if name not in self.stack.procs or self.stack.procs[name].poll() is not None:
                self.start_proc(name)

    # -- the disk
    def fill_disk(self, hold_s: float) -> dict[str, Any]:
        """Fill the artifact disk until ENOSPC, hold it full `hold_s`, free it."""
        assert self.disk is not None
        try:
            written = self.disk.fill()
            full = self.disk.free_bytes()
            time.sleep(hold_s)
        finally:
            self.disk.free()
        return {"filler_mb": round(written / 2**20, 1), "free_while_full_kb": full // 1024, "held_s": hold_s}


# ================================================================ resources sampled over the run

class Sampler(threading.Thread):
    """VmRSS of the API's and each worker's processes (a prefork worker: its parent and pool child), every
    2 s; also restarts a process that exited unasked (SoakStack.supervise)."""

    def __init__(self, stack: SoakStack, out: Path):
        super().__init__(name="sampler", daemon=True)
        self.stack = stack
        self.stop_event = threading.Event()
        self.max_rss_mb: dict[str, float] = collections.defaultdict(float)  # role -> max over its processes
        self.max_group_mb: dict[str, float] = collections.defaultdict(float)  # role -> max sum over its group
        self.csv = (out / "rss.csv").open("w")
        self.csv.write("t,process,pid,rss_mb\n")

    def run(self) -> None:
        while not self.stop_event.wait(2.0):
            try:
                self.sample()
                self.stack.supervise()
            except Exception as e:  # noqa: BLE001 - sampling must not end the soak
                print(f"[soak] sampler: {type(e).__name__}: {e}", flush=True)
        self.csv.close()

    def sample(self) -> None:
        import psutil
        for name, pid in self.stack.pids().items():
            try:
                procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            total = 0.0
            for p in procs:
                mb = _vmrss_mb(p.pid)
                if mb is None:
                    continue
                total += mb
                self.max_rss_mb[name] = max(self.max_rss_mb[name], mb)
                self.csv.write(f"{self.stack.history.t()},{name},{p.pid},{mb:.1f}\n")
            self.max_group_mb[name] = max(self.max_group_mb[name], total)
        self.csv.flush()


def _vmrss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ================================================================ the fault injector

class FaultInjector(threading.Thread):
    """One fault about every fault_every seconds (seeded jitter), the types in a seeded round robin so that each
    gets its share; now and then a worker is killed in the middle of another outage (faults overlap)."""

    def __init__(self, stack: SoakStack, cfg: SoakConfig, history: History, probe: Callable[[int], None]):
        super().__init__(name="faults", daemon=True)
        self.stack, self.cfg, self.history, self.probe = stack, cfg, history, probe
        self.rng = random.Random(cfg.seed * 7919 + 1)
        self.stop_event = threading.Event()
        self.counts: collections.Counter = collections.Counter()
        self.types = [f for f in FAULTS if f != "fill_disk" or stack.disk is not None]

    def run(self) -> None:
        order: list[str] = []
        start, n = time.monotonic(), 0
        while True:  # fault n at about n * fault_every from the start, however long the faults before took
            n += 1
            at = start + self.cfg.fault_every * (n + self.rng.uniform(-0.25, 0.25))
            if self.stop_event.wait(max(0.0, at - time.monotonic())):
                return
            if not order:
                order = self.types[:]
                self.rng.shuffle(order)
            kind = order.pop()
            try:
                getattr(self, kind)()
            except Exception as e:  # noqa: BLE001 - a fault that could not be injected is a finding
                self.history.violation("fault_failed", fault=kind, error=f"{type(e).__name__}: {e}"[:500])

    def _overlap(self) -> None:
        """With probability 1/3, kill a worker now (inside another fault's outage)."""
        if self.rng.random() < 1 / 3:
            self.kill_worker(delay=self.rng.uniform(2, 6), overlapping=True)

    def kill_worker(self, delay: float | None = None, overlapping: bool = False) -> None:
        up = [w for w in WORKERS if w not in self.stack.down]
        if not up:
            return
        name = self.rng.choice(up)
        child_only = self.rng.random() < 0.3
        delay = self.rng.uniform(1, 8) if delay is None else delay
        what = self.stack.kill(name, child_only=child_only)
        self.counts["kill_worker"] += 1
        self.history.fault("kill_worker", worker=name, what=what, restart_after_s=round(delay, 1),
                           overlapping=overlapping)
        if what == "process group":
            self.stack.restart_later(name, delay)

    def kill_api(self) -> None:
        down = self.rng.uniform(0.5, 3)
        self.stack.kill("api")
        self.counts["kill_api"] += 1
        self.history.fault("kill_api", down_s=round(down, 1))
        self._overlap()
        time.sleep(down)
        self.stack.start_proc("api")
        self.history.fault("api_back")

    def restart_postgres(self) -> None:
        mode = self.rng.choice(["fast", "immediate"])
        down = self.rng.uniform(1, 4)
        self.stack.pg.stop(mode)
        self.counts["restart_postgres"] += 1
        self.history.fault("restart_postgres", mode=mode, down_s=round(down, 1))
        self._overlap()
        time.sleep(down)
        self.stack.pg.start()
        self.history.fault("postgres_back")

    def kill_redis(self) -> None:
        down = self.rng.uniform(0.5, 3)
        self.stack.redis.kill()
        self.counts["kill_redis"] += 1
        self.history.fault("kill_redis", down_s=round(down, 1))
        self._overlap()
        time.sleep(down)
        self.stack.redis.start()
        self.history.fault("redis_back")

    def fill_disk(self) -> None:
        hold = self.rng.uniform(3, 8)
        self.counts["fill_disk"] += 1
        ev = self.history.fault("fill_disk", hold_s=round(hold, 1))
        ev.update(self.stack.fill_disk(hold))
        self.history.fault("disk_freed")
        self.probe(self.counts["fill_disk"])


# ================================================================ the clients

def _ag_news_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows) of AG News as {text, label name}."""
    with (AG_NEWS / "train.jsonl").open(encoding="utf-8") as f:
        train = [{"text": r["text"], "label": LABELS[int(r["label"])]} for r in map(json.loads, f)]
    with (AG_NEWS / "test.csv").open(encoding="utf-8", newline="") as f:
        test = [{"text": f"{title} {desc}", "label": LABELS[int(c) - 1]} for c, title, desc in csv.reader(f)]
    return train, test


class Catalog:
    """What the clients may build on: datasets, adapters, classify jobs with gold labels (all succeeded)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.datasets: list[int] = []
        self.adapters: list[int] = []
        self.scored: list[int] = []

    def add(self, job: dict[str, Any]) -> None:
        res = job.get("result") or {}
        with self.lock:
            if job["kind"] == "prep" and res.get("dataset_id"):
                self.datasets.append(res["dataset_id"])
            elif job["kind"] == "train" and res.get("adapter_id"):
                self.adapters.append(res["adapter_id"])
            elif job["kind"] == "classify" and res.get("n_gold") and res.get("mode") == "score":
                self.scored.append(job["id"])

    def pick(self, rng: random.Random, what: str) -> int | None:
        with self.lock:
            pool = getattr(self, what)
            return rng.choice(pool[-20:]) if pool else None


class Soak:
    """The run: setup, clients and faults for the bounded time, drain, then the invariants."""

    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        cfg.out.mkdir(parents=True, exist_ok=True)
        self.history = History(time.monotonic())
        self.stack = SoakStack(cfg, self.history)
        self.catalog = Catalog()
        self.stop_clients = threading.Event()
        self.train_rows, self.test_rows = _ag_news_rows()
        self.data_dir = cfg.out / "data"
        self.model = ""

    # -- setup
    def prepare_inputs(self) -> None:
        model_dir = self.cfg.model_dir
        if model_dir is None:
            model_dir = self.cfg.out / "model" / "tiny-llama"
            if not (model_dir / "config.json").exists():
                make_tiny_llama(model_dir, smollm2_checkpoint())
        self.model = str(model_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        rng = random.Random(self.cfg.seed)
        train = [r for lab in LABELS for r in rng.sample([x for x in self.train_rows if x["label"] == lab], 50)]
        test = [r for lab in LABELS for r in rng.sample([x for x in self.test_rows if x["label"] == lab], 20)]
        for name, rows in (("train", train), ("test", test)):
            (self.data_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def prep_spec(self, seed: int) -> dict[str, Any]:
        return {"name": f"soak-{seed}", "train": {"path": str(self.data_dir / "train.jsonl")},
                "test": {"path": str(self.data_dir / "test.jsonl")}, "validation_fraction": 0.1, "seed": seed}

    def train_spec(self, dataset_id: int, rng: random.Random) -> dict[str, Any]:
        return {"dataset_id": dataset_id, "model": self.model, "max_steps": rng.randint(3, 8), "save_every": 2,
                "eval_every": 1000, "val_samples": 8, "batch_size": 4, "max_seq_len": 96, "warmup_steps": 0,
                "dtype": "fp32", "device": "cpu", "lora": {"rank": 4, "alpha": 8}, "seed": rng.randint(0, 10**6)}

    def seed_jobs(self) -> None:
        """A dataset, an adapter and a scored classify job before the faults start (the mix builds on them)."""
        from api_client.client import Client
        with Client(self.stack.url) as c:
            for kind, spec_of in (("prep", lambda: self.prep_spec(0)),
                                  ("train", lambda: self.train_spec(self.catalog.datasets[0], random.Random(0))),
                                  ("classify", lambda: self.classify_spec(random.Random(0), "seed", 60))):
                spec = spec_of()
                key = f"soak-{self.cfg.seed}-setup-{kind}"
                job = c.submit(kind, spec, idempotency_key=key)
                self.history.submitted(key, kind, spec, "setup", job["id"])
                done = c.wait(job["id"], timeout=600, poll_s=0.5)
                if done["status"] != "succeeded":
                    raise RuntimeError(f"setup {kind} job {done['id']} {done['status']}: {done['error']}")
                self.history.final[done["id"]] = done
                self.catalog.add(done)

    def classify_spec(self, rng: random.Random, key: str, n: int, adapter_id: int | None = None) -> dict[str, Any]:
        rows = rng.sample(self.test_rows, n)
        spec = {"items": [{"id": f"{key}-{i}", "text": r["text"], "label": r["label"]} for i, r in enumerate(rows)],
                "model": self.model, "mode": "score", "batch_size": 32, "dtype": "fp32", "device": "cpu"}
        if adapter_id is not None:
            spec["adapter_id"] = adapter_id
        return spec

    def pipeline_spec(self, rng: random.Random) -> dict[str, Any]:
        return {"name": "soak-pipeline", "prep": self.prep_spec(rng.randint(1, 3)), "model": self.model,
                "train": {k: v for k, v in self.train_spec(1, rng).items() if k not in ("dataset_id", "model")},
                "classify": {"batch_size": 32, "dtype": "fp32", "device": "cpu"}, "eval_limit": 40,
                "generate_limit": 0, "judge": None}

    # -- the probe after a full disk
    def probe_after_disk(self, n: int) -> None:
        """A prep job right after the disk is freed: it must succeed (unless a later fill failed it)."""
        def run() -> None:
            client = SoakClient(self, -1 - n)
            job = client.submit("prep", self.prep_spec(1000 + n), key=f"soak-{self.cfg.seed}-probe-{n}")
            if job is not None:
                with self.history.lock:
                    self.history.probes.append({"fill": n, "job_id": job["id"], "t": self.history.t()})
            client.close()
        threading.Thread(target=run, name=f"probe-{n}", daemon=True).start()

    # -- the run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        print(f"[soak] {cfg.minutes} min, {cfg.clients} clients, a fault every ~{cfg.fault_every} s, seed "
              f"{cfg.seed}, out {cfg.out}", flush=True)
        t_setup = time.monotonic()
        sampler = injector = None
        clients: list[SoakClient] = []
        try:
            self.prepare_inputs()
            self.stack.start()
            self.seed_jobs()
            setup_s = time.monotonic() - t_setup
            print(f"[soak] setup done in {setup_s:.0f} s; clients and faults start", flush=True)
            sampler = Sampler(self.stack, cfg.out)
            sampler.start()
            clients = [SoakClient(self, i) for i in range(cfg.clients)]
            for c in clients:
                c.start()
            injector = FaultInjector(self.stack, cfg, self.history, self.probe_after_disk)
            injector.start()
            t_run = time.monotonic()
            time.sleep(cfg.seconds)
            injector.stop_event.set()
            self.stop_clients.set()
            injector.join(timeout=120)
            for c in clients:
                c.join(timeout=120)
            run_s = time.monotonic() - t_run
            self.stack.ensure_all_up()
            print(f"[soak] faults stopped after {run_s:.0f} s; draining (bound {cfg.drain_s:.0f} s)", flush=True)
            t_drain = time.monotonic()
            unfinished = self.drain()
            drain_s = time.monotonic() - t_drain
            time.sleep(2 * 6)  # two leases: re-delivered duplicates arrive and must change nothing
            sampler.stop_event.set()
            sampler.join(timeout=10)
            report = check_invariants(self, unfinished=unfinished, sampler=sampler, injector=injector)
            report["timing_s"] = {"setup": round(setup_s, 1), "run": round(run_s, 1), "drain": round(drain_s, 1),
                                  "total": round(time.monotonic() - t_setup, 1)}
            return report
        finally:
            if sampler is not None:
                sampler.stop_event.set()
            if injector is not None:
                injector.stop_event.set()
            self.stop_clients.set()
            self.stack.stop()

    def drain(self) -> list[dict[str, Any]]:
        """Wait until every job in the store is terminal; returns those still not after drain_s."""
        from sqlalchemy import select
        from db.models import Job
        deadline = time.monotonic() + self.cfg.drain_s
        while True:
            with self.session() as s:
                left = [{"id": j.id, "kind": j.kind, "status": j.status, "parent_id": j.parent_id}
                        for j in s.scalars(select(Job).where(Job.status.notin_(TERMINAL)))]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(2)

    def session(self):
        from db.session import session_scope
        return session_scope(self.stack.db_url)


class SoakClient(threading.Thread):
    """One user: submits the mix with idempotency keys, keeps at most `outstanding` jobs unfinished, polls
    them, cancels some, re-submits some with the same key. Retries a 503 after its Retry-After and an
    unreachable API; records every answer's status."""

    ACTIONS = (("classify_small", 30), ("classify_large", 10), ("classify_adapter", 8), ("prep", 7),
               ("train", 8), ("evaluate", 8), ("export", 7), ("pipeline", 3), ("cancel", 9), ("resubmit", 6))

    def __init__(self, soak: Soak, index: int):
        super().__init__(name=f"client-{index}", daemon=True)
        from api_client.client import Client
        self.soak, self.index, self.history = soak, index, soak.history
        self.rng = random.Random(soak.cfg.seed * 1000 + index)
        self.c = Client(soak.stack.url, timeout=60)
        self.c._http.event_hooks = {"request": [], "response": [self._on_response]}  # every answer's status
        self.retry_after: float | None = None
        self.outstanding: dict[int, str] = {}  # job id -> kind
        self.mine: list[tuple[str, str, dict[str, Any], int]] = []  # (key, kind, spec, id)
        self.n = 0

    def close(self) -> None:
        self.c.close()

    def _on_response(self, r: httpx.Response) -> None:
        self.history.http[f"{r.request.method} {r.status_code}"] += 1
        self.retry_after = None
        if r.status_code == 503:
            ra = r.headers.get("retry-after")
            if ra is None:
                r.read()
                self.history.violation("503_without_retry_after", path=r.request.url.path, body=r.text[:300])
            self.retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else 1.0
        elif r.status_code >= 500:
            r.read()
            self.history.violation("http_5xx", status=r.status_code, method=r.request.method,
                                   path=r.request.url.path, body=r.text[:500])

    def call(self, fn: Callable[[], Any], what: str, *, ok: tuple[int, ...] = (), budget_s: float = 300) -> Any:
        """`fn()` until it answers: 503 waits Retry-After, an unreachable API or a 5xx waits a moment. Returns
        None (recorded) when it gives up after `budget_s`, or REFUSED for an error status listed in `ok`."""
        from api_client.client import ApiError
        deadline = time.monotonic() + budget_s
        while True:
            try:
                return fn()
            except ApiError as e:
                if e.status in ok:
                    return REFUSED
                if e.status not in (0, 500, 502, 503, 504):
                    self.history.violation("unexpected_status", what=what, status=e.status, detail=str(e.detail)[:300])
                    return None
                if time.monotonic() > deadline:
                    with self.history.lock:
                        self.history.gave_up.append({"t": self.history.t(), "what": what, "status": e.status})
                    return None
                time.sleep(self.retry_after or 0.5 if e.status == 503 else 0.5)

    def submit(self, kind: str, spec: dict[str, Any], *, key: str | None = None) -> dict[str, Any] | None:
        self.n += 1
        key = key or f"soak-{self.soak.cfg.seed}-c{self.index}-{self.n}"
        job = self.call(lambda: self.c.submit(kind, spec, idempotency_key=key), f"submit {kind}")
        if job is not None:
            self.history.submitted(key, kind, spec, self.name, job["id"])
            self.outstanding[job["id"]] = kind
            self.mine.append((key, kind, spec, job["id"]))
        return job

    def run(self) -> None:
        names = [a for a, _ in self.ACTIONS]
        weights = [w for _, w in self.ACTIONS]
        try:
            while not self.soak.stop_clients.is_set():
                self.poll()
                if len(self.outstanding) >= self.soak.cfg.outstanding:
                    time.sleep(1.0)
                    continue
                getattr(self, "do_" + self.rng.choices(names, weights)[0])()
                time.sleep(self.rng.uniform(0.2, 1.5))
        except Exception as e:  # noqa: BLE001 - a client bug must show, not end silently
            self.history.violation("client_crashed", client=self.name, error=f"{type(e).__name__}: {e}"[:500])
        finally:
            self.close()

    def poll(self) -> None:
        for job_id in list(self.outstanding):
            job = self.call(lambda: self.c.get(job_id), "get", ok=(404,), budget_s=60)
            if job is None:
                continue
            if job is REFUSED:
                self.history.violation("accepted_job_missing", job_id=job_id)
                del self.outstanding[job_id]
                continue
            if job["status"] in TERMINAL:
                del self.outstanding[job_id]
                self.history.final[job_id] = job
                if job["status"] == "succeeded":
                    self.soak.catalog.add(job)

    # -- the mix
    def do_classify_small(self) -> None:
        self.submit("classify", self.soak.classify_spec(self.rng, self._key(), self.rng.randint(50, 400)))

    def do_classify_large(self) -> None:
        self.submit("classify", self.soak.classify_spec(self.rng, self._key(), self.rng.randint(600, 2000)))

    def do_classify_adapter(self) -> None:
        adapter = self.soak.catalog.pick(self.rng, "adapters")
        self.submit("classify", self.soak.classify_spec(self.rng, self._key(), self.rng.randint(50, 300), adapter))

    def do_prep(self) -> None:
        self.submit("prep", self.soak.prep_spec(self.rng.randint(1, 10**6)))

    def do_train(self) -> None:
        ds = self.soak.catalog.pick(self.rng, "datasets")
        self.submit("train", self.soak.train_spec(ds, self.rng))

    def do_evaluate(self) -> None:
        cj = self.soak.catalog.pick(self.rng, "scored")
        self.submit("evaluate", {"classify_job_ids": [cj], "bootstrap": 50, "report": self.rng.random() < 0.4,
                                 "seed": self.rng.randint(0, 1000)})

    def do_export(self) -> None:
        adapter = self.soak.catalog.pick(self.rng, "adapters")
        fmt = "merged" if self.rng.random() < 0.3 else "peft"
        spec = {"adapter_id": adapter, "format": fmt, "verify": True, "verify_samples": 16, "device": "cpu"}
        self.submit("export", spec)

    def do_pipeline(self) -> None:
        self.submit("pipeline", self.soak.pipeline_spec(self.rng))

    def do_cancel(self) -> None:
        pool = list(self.outstanding) or list(self.history.accepted)
        if not pool:
            return
        job_id = self.rng.choice(pool)
        t = self.history.t()
        out = self.call(lambda: self.c.cancel(job_id), "cancel", ok=(409,), budget_s=60)
        with self.history.lock:
            self.history.cancels.append({"t": t, "job_id": job_id, "accepted": out not in (None, REFUSED)})

    def do_resubmit(self) -> None:
        if not self.mine:
            return
        key, kind, spec, first = self.rng.choice(self.mine[-10:])
        job = self.call(lambda: self.c.submit(kind, spec, idempotency_key=key), f"resubmit {kind}")
        if job is not None:
            self.history.submitted(key, kind, spec, self.name, job["id"])
            if job["id"] != first:
                self.history.violation("idempotency_key_made_two_jobs", key=key, first=first, second=job["id"])

    def _key(self) -> str:
        return f"c{self.index}-{self.n + 1}"


# ================================================================ the invariants

def _is_disk_full_message(error: str | None, home: Path) -> bool:
    """The failure says the disk is full and names the folder under the artifact home."""
    e = (error or "").lower()
    return ("disk is full" in e or "disk filled" in e or "no space left" in e) and str(home).lower() in e


def _loads(kind: str, path: str) -> str | None:
    """Why the artifact at `path` does not load, or None when it does."""
    from core.contracts.export import ExportManifest
    from workers.data.prep import load_records, read_meta
    from workers.inference.adapter import read_adapter_meta
    p = Path(path)
    try:
        if kind == "dataset":
            meta = read_meta(p)
            for split in ("train", "validation", "test"):
                load_records(p, split, verify=True)
            return None if meta.hash else "no hash"
        if kind == "adapter":
            from safetensors.torch import load_file
            read_adapter_meta(p)
            if not load_file(str(p / "adapter_model.safetensors")):
                return "no weights"
            return None
        if kind == "export":
            man = ExportManifest.load(p)
            for name, info in man.files.items():
                f = p / name
                if not f.is_file() or f.stat().st_size != info.get("bytes"):
                    return f"{name}: missing or of another size"
                if info.get("sha256") and hashlib.sha256(f.read_bytes()).hexdigest() != info["sha256"]:
                    return f"{name}: sha256 differs"
            return None if man.files else "export.json lists no files"
        if kind == "report":
            return None if (p.is_file() and p.stat().st_size > 0) else "report.html missing or empty"
    except Exception as e:  # noqa: BLE001 - the reason is the finding
        return f"{type(e).__name__}: {e}"[:300]
    return f"unknown kind {kind}"


def check_invariants(soak: Soak, *, unfinished: list[dict[str, Any]], sampler: Sampler,
                     injector: FaultInjector) -> dict[str, Any]:
    from sqlalchemy import select
    from db.models import Dataset, Evaluation, Job, JobEvent, ModelArtifact, Prediction

    cfg, h, home = soak.cfg, soak.history, soak.stack.home
    rows: list[dict[str, Any]] = []

    def inv(name: str, ok: bool, detail: Any = "", examples: list | None = None) -> None:
        rows.append({"invariant": name, "ok": bool(ok), "detail": detail, "examples": (examples or [])[:10]})

    with soak.session() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        kids: dict[int, list[Job]] = collections.defaultdict(list)
        for j in jobs.values():
            if j.parent_id is not None:
                kids[j.parent_id].append(j)
        events: dict[int, list[JobEvent]] = collections.defaultdict(list)
        for e in s.scalars(select(JobEvent).order_by(JobEvent.id)):
            events[e.job_id].append(e)
        preds: dict[int, list[tuple[str, str | None, str | None, str | None]]] = collections.defaultdict(list)
        for job_id, item_id, label, gold, error in s.execute(
                select(Prediction.job_id, Prediction.item_id, Prediction.label, Prediction.gold, Prediction.error)):
            preds[job_id].append((item_id, label, gold, error))
        datasets = list(s.scalars(select(Dataset)))
        artifacts = list(s.scalars(select(ModelArtifact)))
        evaluations = list(s.scalars(select(Evaluation)))
        s.expunge_all()

    # 1. every accepted job (and every child) terminal within the bound
    inv("every job terminal within the drain bound", not unfinished,
        f"{len(jobs)} jobs, {len(unfinished)} not terminal (bound {cfg.drain_s:.0f} s)", unfinished)

    # 2. every accepted job exists; each ended exactly once
    lost_jobs = [j for j in h.accepted if j not in jobs]
    inv("every accepted job is in the store", not lost_jobs, f"{len(h.accepted)} accepted by clients", lost_jobs)
    twice = [{"job": jid, "terminal_events": n} for jid, evs in events.items()
             if (n := sum((e.metrics or {}).get("status") in TERMINAL for e in evs)) != (jobs[jid].status in TERMINAL)]
    inv("each job recorded its outcome exactly once", not twice, "one terminal event per terminal job", twice)

    # 3. classify: the result matches the stored rows; every item stored once, none lost
    totals = collections.Counter()
    bad_results = []
    for j in jobs.values():
        if j.kind != "classify" or (j.spec or {}).get("shard") is not None:
            continue
        ids = [j.id] + [k.id for k in kids[j.id] if k.kind == "classify"]
        stored = [p for i in ids for p in preds[i]]
        item_ids = [p[0] for p in stored]
        dup = len(item_ids) - len(set(item_ids))
        expected = [it["id"] for it in (j.spec.get("items") or [])]
        if not expected and j.spec.get("dataset_id"):
            ds = next((d for d in datasets if d.id == j.spec["dataset_id"]), None)
            if ds is not None:
                from workers.data.prep import load_records
                recs = load_records(Path(ds.path), j.spec.get("split", "test"), verify=False)
                expected = [str(r["id"]) for r in recs][:j.spec.get("limit") or None]
        foreign = set(item_ids) - set(expected)
        totals["duplicates"] += dup
        totals["foreign"] += len(foreign)
        problems = []
        if dup:
            problems.append(f"{dup} duplicate rows")
        if foreign:
            problems.append(f"{len(foreign)} rows for items not in its input")
        if j.status == "succeeded":
            lost = set(expected) - set(item_ids)
            totals["lost"] += len(lost)
            totals["stored"] += len(item_ids)
            totals["jobs"] += 1
            res = j.result or {}
            done = [p for p in stored if p[3] is None]
            counts = collections.Counter(p[1] for p in done if p[1] is not None)
            gold = [p for p in done if p[2] is not None]
            acc = sum(p[1] == p[2] for p in gold) / len(gold) if gold else None
            if lost:
                problems.append(f"{len(lost)} items lost")
            if res.get("total") != len(expected) or res.get("classified") != len(done):
                problems.append(f"result total/classified {res.get('total')}/{res.get('classified')} vs "
                                f"{len(expected)} items, {len(done)} stored")
            if {k: v for k, v in (res.get("counts") or {}).items() if v} != dict(counts):
                problems.append(f"result counts {res.get('counts')} vs stored {dict(counts)}")
            if acc is not None and not math.isclose(res.get("accuracy") or -1, acc, abs_tol=1e-9):
                problems.append(f"result accuracy {res.get('accuracy')} vs stored {acc}")
            if (res.get("n_gold") or 0) != len(gold):
                problems.append(f"result n_gold {res.get('n_gold')} vs stored {len(gold)}")
        if problems:
            bad_results.append({"job": j.id, "status": j.status, "problems": problems})
    inv("classify: every item stored once, none lost, result = stored rows", not bad_results,
        f"{totals['jobs']} succeeded classify jobs, {totals['stored']} items stored, duplicates "
        f"{totals['duplicates']}, lost {totals['lost']}, foreign {totals['foreign']}", bad_results)

    # 3b. every other succeeded job's result names the one row it registered
    registered_by_job = collections.defaultdict(list)
    for kind, row_id, job_id in ([("dataset_id", d.id, d.job_id) for d in datasets]
                                 + [("adapter_id" if a.kind == "adapter" else "export_id", a.id, a.job_id)
                                    for a in artifacts]
                                 + [("evaluation_id", e.id, e.job_id) for e in evaluations]):
        registered_by_job[job_id].append((kind, row_id))
    wants = {"prep": "dataset_id", "train": "adapter_id", "export": "export_id", "evaluate": "evaluation_id"}
    mismatched = []
    for j in jobs.values():
        if j.status == "succeeded" and j.kind in wants:
            rows_of_job = registered_by_job.get(j.id, [])
            if rows_of_job != [(wants[j.kind], (j.result or {}).get(wants[j.kind]))]:
                mismatched.append({"job": j.id, "kind": j.kind, "result": (j.result or {}).get(wants[j.kind]),
                                   "registered": rows_of_job})
    inv("each succeeded prep, train, export and evaluate registered exactly the row its result names",
        not mismatched, f"{sum(j.status == 'succeeded' and j.kind in wants for j in jobs.values())} jobs",
        mismatched)

    # 4. cancelled jobs stopped, and their children too
    not_stopped = []
    for j in jobs.values():
        if j.status != "cancelled":
            continue
        end = next((e for e in events[j.id] if (e.metrics or {}).get("status") == "cancelled"), None)
        after = [e.message for e in events[j.id] if end is not None and e.id > end.id]
        open_kids = [k.id for k in kids[j.id] if k.status not in TERMINAL]
        late_kids = [k.id for k in kids[j.id] if end is not None and k.started_at and k.started_at > end.time]
        if after or open_kids or late_kids:
            not_stopped.append({"job": j.id, "events_after_cancel": after[:5], "children_open": open_kids,
                                "children_started_after": late_kids})
    cancel_asked = {c["job_id"] for c in h.cancels if c["accepted"]}
    outcome = collections.Counter(jobs[i].status for i in cancel_asked if i in jobs)
    inv("cancelled jobs stopped, children too", not not_stopped,
        f"{sum(j.status == 'cancelled' for j in jobs.values())} cancelled; cancels accepted {len(cancel_asked)} "
        f"-> {dict(outcome)}", not_stopped)

    # 5. failed jobs failed for a reason the faults explain (a full disk), saying so and naming the folder
    unexplained = [{"job": j.id, "kind": j.kind, "error": (j.error or "")[:300]} for j in jobs.values()
                   if j.status == "failed" and not _is_disk_full_message(j.error, home)]
    disk_failed = sum(j.status == "failed" and _is_disk_full_message(j.error, home) for j in jobs.values())
    inv("every failed job failed on a full disk, saying so and naming the folder", not unexplained,
        f"{disk_failed} failed on the full disk, {len(unexplained)} otherwise", unexplained)

    # 6. after the disk was freed, the next job succeeded
    probes = []
    for p in h.probes:
        j = jobs.get(p["job_id"])
        if j is None or j.status != "succeeded":
            probes.append({**p, "status": j.status if j else "missing", "error": (j.error or "")[:200] if j else ""})
    inv("the first job after the disk is freed succeeds", not probes and (h.probes or soak.stack.disk is None),
        f"{len(h.probes)} probes", probes)

    # 7. every registered artifact loads (no half-written folder)
    not_loading = []
    for kind, path, row in ([("dataset", d.path, d.id) for d in datasets]
                            + [(a.kind, a.path, a.id) for a in artifacts]
                            + [("report", e.report_path, e.id) for e in evaluations if e.report_path]):
        why = _loads(kind, path)
        if why:
            not_loading.append({"kind": kind, "id": row, "path": path, "why": why})
    inv("every registered dataset, adapter, export and report loads", not not_loading,
        f"{len(datasets)} datasets, {sum(a.kind == 'adapter' for a in artifacts)} adapters, "
        f"{sum(a.kind == 'export' for a in artifacts)} exports, {len(evaluations)} evaluations", not_loading)

    # 8. no orphan rows or folders
    orphans = []
    for kind, row_id, job_id in ([("dataset", d.id, d.job_id) for d in datasets]
                                 + [(a.kind, a.id, a.job_id) for a in artifacts]
                                 + [("evaluation", e.id, e.job_id) for e in evaluations]):
        if job_id is not None and (job_id not in jobs or jobs[job_id].status != "succeeded"):
            orphans.append({"row": f"{kind} {row_id}", "job": job_id,
                            "job_status": jobs[job_id].status if job_id in jobs else "missing"})
    keys = set(h.submissions)
    for j in jobs.values():
        if j.parent_id is None and j.idempotency_key not in keys:
            orphans.append({"row": f"job {j.id}", "why": "a top-level job no client submitted",
                            "key": j.idempotency_key})
    registered = {str(Path(p)) for p in [d.path for d in datasets] + [a.path for a in artifacts]}
    registered |= {str(Path(e.report_path).parent) for e in evaluations if e.report_path}
    for folder, pattern in (("datasets", "job-*"), ("exports", "job-*"), ("adapters", "job-*/adapter"),
                            ("reports", "eval-job-*")):
        for p in sorted((home / folder).glob(pattern)) if (home / folder).is_dir() else []:
            if str(p) not in registered and not (folder == "reports" and not any(p.iterdir())):
                orphans.append({"folder": str(p.relative_to(home)), "why": "no registered row"})
    for p in sorted((home / "jobs").iterdir()) if (home / "jobs").is_dir() else []:
        if p.name.isdigit() and jobs.get(int(p.name)) is not None and jobs[int(p.name)].status in TERMINAL \
                and any(p.iterdir()):
            orphans.append({"folder": str(p.relative_to(home)), "why": "scratch left in a finished job's work folder",
                            "holds": sorted(c.name for c in p.iterdir())[:5]})
    for p in home.rglob(".*"):
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".part"):
            orphans.append({"folder": str(p.relative_to(home)), "why": "a temp file or folder left behind"})
    inv("no orphan rows or folders", not orphans, f"{len(orphans)} found", orphans)

    # 9. the same idempotency key never made two jobs
    two = [{"key": k, "ids": sorted(v["ids"])} for k, v in h.submissions.items() if len(v["ids"]) > 1]
    db_keys = collections.Counter(j.idempotency_key for j in jobs.values() if j.idempotency_key)
    two += [{"key": k, "rows": n} for k, n in db_keys.items() if n > 1]
    resubmits = sum(1 for v in h.violations if v["kind"] == "idempotency_key_made_two_jobs")
    inv("an idempotency key never made two jobs", not two and not resubmits,
        f"{len(h.submissions)} keys", two)

    # 10. no client saw a 500 (or a 503 without Retry-After, or an answer it should not get)
    bad_http = [v for v in h.violations if v["kind"] in ("http_5xx", "503_without_retry_after", "unexpected_status")]
    inv("no client saw a 500 (503s carried Retry-After)", not bad_http,
        ", ".join(f"{k}: {n}" for k, n in sorted(h.http.items())), bad_http)
    others = [v for v in h.violations if v["kind"] not in ("http_5xx", "503_without_retry_after", "unexpected_status",
                                                           "idempotency_key_made_two_jobs")]
    inv("no process exited unasked, no client or fault failed", not others and not h.gave_up,
        f"{len(others)} events, {len(h.gave_up)} requests given up", others + h.gave_up)

    # 11. memory bounded
    over = []
    for name, mb in sampler.max_rss_mb.items():
        bound = cfg.rss_bound_mb["api" if name == "api" else "worker"]
        if mb > bound:
            over.append({"process": name, "max_rss_mb": round(mb), "bound_mb": bound})
    inv("API and worker memory bounded", not over and bool(sampler.max_rss_mb),
        ", ".join(f"{n} {mb:.0f} MiB" for n, mb in sorted(sampler.max_rss_mb.items())), over)

    # 12. every fault type injected often enough
    counts = {f: injector.counts.get(f, 0) for f in FAULTS}
    short = {f: n for f, n in counts.items() if n < cfg.min_faults_per_type}
    why = f" (disk: {soak.stack.mount_error})" if soak.stack.mount_error else ""
    inv(f"each fault type injected >= {cfg.min_faults_per_type} times", not short,
        ", ".join(f"{f} {n}" for f, n in counts.items()) + why, [short] if short else [])

    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for j in jobs.values():
        label = j.kind + (" (shard)" if (j.spec or {}).get("shard") else "") + (" (child)" if j.parent_id and not
                                                                                 (j.spec or {}).get("shard") else "")
        by_kind[label][j.status] += 1
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "ok": all(r["ok"] for r in rows),
        "invariants": rows,
        "jobs": {k: dict(v) for k, v in sorted(by_kind.items())},
        "faults": counts,
        "items": {"stored": totals["stored"], "duplicates": totals["duplicates"], "lost": totals["lost"]},
        "http": dict(h.http),
        "max_rss_mb": {n: round(v, 1) for n, v in sorted(sampler.max_rss_mb.items())},
        "max_rss_group_mb": {n: round(v, 1) for n, v in sorted(sampler.max_group_mb.items())},
        "fault_log": h.faults,
        "violations": h.violations,
        "cancels": len(h.cancels),
        "submissions": len(h.submissions),
    }


# ================================================================ the table

def format_report(report: dict[str, Any]) -> str:
    """The invariants, jobs by kind and outcome, faults, items, HTTP answers and memory, as Markdown tables."""
    out = ["| invariant | holds | detail |", "|---|---|---|"]
    for r in report["invariants"]:
        out.append(f"| {r['invariant']} | {'yes' if r['ok'] else '**NO**'} | {r['detail']} |")
    statuses = ["succeeded", "failed", "cancelled", "queued", "running"]
    out += ["", "| jobs by kind | " + " | ".join(statuses) + " |", "|---|" + "---|" * len(statuses)]
    for kind, c in report["jobs"].items():
        out.append(f"| {kind} | " + " | ".join(str(c.get(s, 0)) for s in statuses) + " |")
    out += ["", "| fault | injected |", "|---|---|"] + [f"| {f} | {n} |" for f, n in report["faults"].items()]
    it = report["items"]
    out += ["", "| classify items stored | duplicates | lost | 500s seen |", "|---|---|---|---|",
            f"| {it['stored']} | {it['duplicates']} | {it['lost']} | "
            f"{sum(n for k, n in report['http'].items() if k.endswith(' 500'))} |"]
    out += ["", "| process | max RSS (MiB, one process) | max RSS (MiB, with its pool child) |", "|---|---|---|"]
    out += [f"| {n} | {mb:.0f} | {report['max_rss_group_mb'].get(n, 0):.0f} |" for n, mb in report["max_rss_mb"].items()]
    failed = [r for r in report["invariants"] if not r["ok"]]
    for r in failed:
        out += ["", f"**{r['invariant']}**: " + json.dumps(r["examples"], default=str)[:3000]]
    return "\n".join(out)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run the soak; write OUT/soak.json and OUT/faults.jsonl; return the report."""
    report = Soak(cfg).run()
    (cfg.out / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    (cfg.out / "faults.jsonl").write_text("".join(json.dumps(f) + "\n" for f in report["fault_log"]))
    (cfg.out / "table.md").write_text(format_report(report) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--fault-every", type=float, default=20.0, help="seconds between faults (seeded jitter)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True, help="a folder for logs, data and soak.json")
    ap.add_argument("--drain", type=float, default=600.0, help="seconds every job has to end after the faults stop")
    ap.add_argument("--min-faults", type=int, default=5, help="each fault type at least this many times")
    ap.add_argument("--disk-mb", type=int, default=384, help="the artifact home's tmpfs size")
    ap.add_argument("--model-dir", type=Path, default=None, help="a tiny Llama checkpoint (built when not given)")
    a = ap.parse_args(argv)
    cfg = SoakConfig(out=a.out.resolve(), minutes=a.minutes, clients=a.clients, fault_every=a.fault_every,
                     seed=a.seed, drain_s=a.drain, min_faults_per_type=a.min_faults, disk_mb=a.disk_mb,
                     model_dir=a.model_dir)
    report = run_soak(cfg)
    print(format_report(report))
    print(f"\n[soak] timings {report['timing_s']}; full report: {cfg.out / 'soak.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
