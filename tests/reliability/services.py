"""Throwaway Redis and PostgreSQL servers on free ports, owned by the reliability tests.

The fault tests stop and restart these; the machine's shared services on 6379/5432 are never touched.
PostgreSQL runs as the `postgres` user (initdb refuses root) in a temp folder that user owns, with
password authentication on TCP so the tests can check that the password never leaks.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN = Path(os.environ.get("NEWSLORA_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, *, up: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} still {'closed' if up else 'open'} after {timeout} s")


class RedisServer:
    """`redis-server` on a free port with append-only persistence (as docker-compose.yml runs it)."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                                      "--appendonly", "yes", "--save", "", "--protected-mode", "no"],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, 20)
        return self

    def stop(self) -> None:
        """Graceful shutdown (the append-only file is flushed, as `docker compose restart` does)."""
        if self.proc is None:
            return
        import redis
        try:
            redis.Redis(port=self.port).shutdown(nosave=False)
        except Exception:  # noqa: BLE001 - shutdown closes the connection under the client
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        _wait_port(self.port, 10, up=False)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush (what the last second of writes under appendfsync everysec risks)."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        _wait_port(self.port, 10, up=False)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self):
        import redis
        return redis.Redis(port=self.port)


class PostgresCluster:
    """A PostgreSQL 15 cluster of its own: initdb, pg_ctl start/stop/restart, one password role."""

    USER = "newslora"

    def __init__(self, password: str):
        self.password = password
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="newslora-pg-"))
        self.data = self.root / "data"
        os.chmod(self.root, 0o755)
        shutil.chown(self.root, "postgres", "postgres")

    def _as_postgres(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=check, capture_output=True,
                              text=True, cwd=self.root)

    def init(self) -> "PostgresCluster":
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL binaries not found in {PG_BIN} (set NEWSLORA_TEST_PG_BIN)")
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                          "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        with (self.data / "postgresql.conf").open("a") as f:
            f.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.root}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")
        self.start()
        self.psql(f"CREATE ROLE {self.USER} LOGIN SUPERUSER PASSWORD '{self.password}'")
        return self

    def psql(self, sql: str) -> str:
        r = self._as_postgres(str(PG_BIN / "psql"), "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                              "-v", "ON_ERROR_STOP=1", "-Atc", sql)
        return r.stdout

    def start(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "pg.log"), "-w",
                          "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop",
                          check=False)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}" OWNER {self.USER}')
        return self.url(name)

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.USER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class SmallDisk:
    """A tmpfs of `size_mb` MiB mounted at `path`: a disk a test fills up (`fill`) and frees (`free`).

    Mounting needs root (or CAP_SYS_ADMIN); `mount` says so when it cannot. Nothing else lives on it, so
    filling it fills nothing of the machine's.
    """

    FILLER = ".filler"

    def __init__(self, path: Path, size_mb: int):
        self.path = Path(path)
        self.size_mb = size_mb
        self.mounted = False

    def mount(self) -> "SmallDisk":
        """Raises: RuntimeError naming what `mount` said (not root, no tmpfs)."""
        self.path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"could not mount a {self.size_mb} MiB tmpfs at {self.path} (it needs root or "
                               f"CAP_SYS_ADMIN): {(r.stderr or r.stdout).strip() or f'mount exited {r.returncode}'}")
        self.mounted = True
        return self

    def fill(self) -> int:
        """Write a filler file until the disk says ENOSPC, down to its last byte. Returns the bytes written."""
        import errno
        written = 0
        fd = os.open(self.path / self.FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096, 1):  # big writes, then the last partial block
                chunk = b"\0" * size
                while True:
                    try:
                        written += os.write(fd, chunk)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        for f in self.path.glob(f"{self.FILLER}*"):
            f.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)
            self.mounted = False

    def __enter__(self) -> "SmallDisk":
        return self.mount()

    def __exit__(self, *exc) -> None:
        self.unmount()
