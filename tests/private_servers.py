"""Private Redis and PostgreSQL servers that a test may crash and start again (issue #16's "restarted mid-run").

The shared servers of tests/services.py must never be restarted (other tests and other workers use them),
so a test that needs a real restart starts a server of its own: its own port, its own directory under a
temporary one, stopped whatever happens to the test. Where a binary is missing the test skips locally and
fails under CI (PROXYD_CI_REQUIRE_SERVICES=1), the rule of tests/services.py.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.services import required


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str, *candidates: str) -> str:
    """The path of ``name`` (PATH first, then the given globs); skips, or under CI fails, when there is none."""
    found = shutil.which(name)
    for pattern in candidates:
        if found:
            break
        found = next(iter(sorted(glob.glob(pattern), reverse=True)), None)
    if found:
        return found
    reason = f"{name} is not installed: the private-server restart tests need it"
    if required():
        pytest.fail(reason + " -- PROXYD_CI_REQUIRE_SERVICES=1 makes this a failure, not a skip")
    pytest.skip(reason)


def _wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not listening on {port} within {timeout}s") from None
            time.sleep(0.02)


class PrivateRedis:
    """A redis-server of the test's own, without persistence: ``kill()`` is a kill -9, ``start()`` after it
    brings an empty Redis back on the same port (what an empty restart of a real deployment's Redis is)."""

    def __init__(self, directory: str) -> None:
        self.binary = _binary("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
        self.dir = directory
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        # No snapshot, no AOF: it comes back empty, as the deployment advice in DESIGN ("Redis admission") has it.
        with open(os.path.join(self.dir, f"redis-{self.starts}.log"), "w") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", self.dir, "--daemonize", "no", "--maxmemory-policy", "noeviction", "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        _wait_port(self.port, self.proc, "redis-server")

    def kill(self) -> None:
        """kill -9: no shutdown, nothing saved; every connection to it drops."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()


class PrivatePostgres:
    """A PostgreSQL cluster of the test's own: initdb into a temporary directory, trust authentication, TCP on
    127.0.0.1 at a free port and the unix socket in that directory. ``crash()`` is ``pg_ctl stop -m immediate``
    (every server process quits at once, no checkpoint: the next start runs crash recovery), ``start()`` starts
    it again on the same port. PostgreSQL refuses to run as root: run as root, its commands run as the
    ``postgres`` OS user (runuser), which owns the directory."""

    def __init__(self) -> None:
        bins = "/usr/lib/postgresql/*/bin/"
        self.initdb = _binary("initdb", bins + "initdb")
        self.pg_ctl = _binary("pg_ctl", bins + "pg_ctl")
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                _binary("runuser")  # skips or fails with the reason
            self.as_user = ["runuser", "-u", "postgres", "--"]
        else:
            self.as_user = []
        # Not pytest's tmp_path: its parents are root's and closed to the postgres user.
        self.dir = tempfile.mkdtemp(prefix="proxyd-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.port = _free_port()
        self.running = False
        if self.as_user:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        try:
            self._run([self.initdb, "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale",
                       "--no-sync", "--no-instructions"], timeout=60)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str], timeout: float = 30) -> None:
        r = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            tail = ""
            if os.path.exists(self.log):
                with open(self.log, encoding="utf-8", errors="replace") as fh:
                    tail = fh.read()[-2000:]
            raise RuntimeError(f"{' '.join(argv[:2])} failed ({r.returncode}): {r.stdout}{r.stderr}{tail}")

    def start(self) -> None:
        # fsync off: the crash here is of the server processes, not of the machine, so what was committed is
        # in the OS's page cache and crash recovery replays it all the same; it saves the shared disk.
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
                   " -c max_connections=60 -c shared_buffers=16MB")
        self._run([self.pg_ctl, "-D", self.data, "-l", self.log, "-w", "-t", "30", "-o", options, "start"], timeout=40)
        self.running = True
        _wait_port(self.port, None, "postgres")

    def crash(self) -> None:
        """pg_ctl stop -m immediate: the postmaster and every backend quit at once, connections drop."""
        self._run([self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop"])
        self.running = False

    def close(self) -> None:
        try:
            if self.running or os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run([self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "stop"])
        finally:
            self.running = False
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis(tmp_path):
    """A started PrivateRedis; killed at the end whatever happened."""
    d = tmp_path / "redis"
    d.mkdir()
    server = PrivateRedis(str(d))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def private_postgres():
    """A started PrivatePostgres; stopped and its directory removed at the end whatever happened."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()
