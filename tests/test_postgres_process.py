"""proxyd processes on one PostgreSQL (issue #16): kill -9 of one instance under load loses no answered request
and its pending rows are expired by the other; ``--workers N`` refuses what cannot be exact and runs N
processes on one port when it can."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.test_postgres import fetch
from tests.test_process import ADMIN, ROOT, emulator, free_port, new_key, wait_http  # noqa: F401 - emulator: a fixture

MSG = [{"role": "user", "content": "[[emu:reply_tokens=3]] hi"}]


def config_file(tmp_path, dsn: str, name: str = "config.yaml") -> str:
    cfg = tmp_path / name
    # pending_row_after_s 0: every request gets its pending row, so a crash leaves some for the others to expire
    cfg.write_text("logging:\n  access_log: false\nserver:\n  shutdown_grace_s: 10\n"
                   f"database:\n  backend: postgres\n  dsn: {dsn}\n  pending_row_after_s: 0\n  instance_stale_s: 1.5\n")
    return str(cfg)


def start(tmp_path, dsn: str, upstream: str, port: int, *args: str, code: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PROXYD_PORT": str(port), "PROXYD_UPSTREAM": upstream, "PROXYD_ADMIN_TOKEN": ADMIN,
           "PROXYD_CONFIG": config_file(tmp_path, dsn)}
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "app.py", *args]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


def load(bases: list[str], key: str, answered: list[str], stop: threading.Event, threads: int = 12) -> list:
    def worker(i: int) -> None:
        base = bases[i % len(bases)]
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                body = {"model": "llama3.2:1b", "messages": MSG, "stream": i % 2 == 0}
                try:
                    r = client.post(base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                    if r.status_code == 200 and (not body["stream"] or r.text.rstrip().endswith("data: [DONE]")):
                        answered.append(r.headers["x-request-id"])
                except httpx.HTTPError:
                    pass

    running = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in running:
        t.start()
    return running


def kill_under_load(bases: list[str], key: str, victim: subprocess.Popen, pg_dsn: str, **kw) -> float:
    """Load on every base, kill -9 of `victim` 2 s in, the load stopped 0.5 s later: every request a client
    was answered is settled in the ledger. Returns when the kill happened (time.monotonic())."""
    answered: list[str] = []
    stop = threading.Event()
    threads = load(bases, key, answered, stop, **kw)
    time.sleep(2.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    killed = time.monotonic()
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(15)
    assert len(answered) > 20
    status = dict(fetch(pg_dsn, "SELECT id, status FROM requests"))
    missing = [rid for rid in answered if status.get(rid) != "settled"]
    assert not missing, f"{len(missing)} answered requests not settled in the ledger: {missing[:5]}"
    return killed


def test_kill_9_of_one_instance_under_load_loses_no_answered_request(tmp_path, emulator, pg_dsn):  # noqa: F811
    pa, pb = free_port(), free_port()
    a = start(tmp_path, pg_dsn, emulator, pa)
    b = start(tmp_path, pg_dsn, emulator, pb)
    try:
        key = new_key(f"http://127.0.0.1:{pa}", "alice")
        time.sleep(0.3)  # b hears of the key (LISTEN/NOTIFY)
        kill_under_load([f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"], key, a, pg_dsn)
        # a's pending rows (requests it was running when killed) are expired by b once a's heartbeat is stale.
        deadline = time.time() + 15
        while fetch(pg_dsn, "SELECT 1 FROM requests WHERE status = 'pending'"):
            assert time.time() < deadline, "the killed instance's pending rows were not expired"
            time.sleep(0.2)
        out = subprocess.run([sys.executable, "app.py", "--check-ledger"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PROXYD_CONFIG": config_file(tmp_path, pg_dsn)})
        check = json.loads(out.stdout)
        assert out.returncode == 0 and check["ok"], check
        # usage read from the survivor agrees with the ledger's settled rows
        usage = httpx.get(f"http://127.0.0.1:{pb}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
        assert usage["totals"]["requests"] == check["requests_by_status"]["settled"]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.terminate()
                p.wait(15)


def run_app(tmp_path, *args: str, config: str = "") -> subprocess.CompletedProcess:
    cfg = tmp_path / "refuse.yaml"
    cfg.write_text(config or "logging:\n  access_log: false\n")
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PROXYD_CONFIG": str(cfg), "PROXYD_DB": str(tmp_path / "x.db")})


def test_workers_refuse_the_embedded_ledger_and_the_in_memory_admission(tmp_path):
    out = run_app(tmp_path, "--workers", "2")
    assert out.returncode == 2 and "needs database.backend: postgres" in out.stderr
    assert "SQLite" in out.stderr
    out = run_app(tmp_path, "--workers", "2", config="database:\n  backend: postgres\n  dsn: postgresql://h/db\n")
    assert out.returncode == 2 and "needs admission.backend: redis" in out.stderr
    assert "N times" in out.stderr
    assert not os.path.exists(tmp_path / "x.db")  # refused before anything was opened


# The supervisor and SO_REUSEPORT, apart from the refusal (which needs the Redis admission to pass): the test
# lifts the refusal for itself. With the in-memory admission the limits are per process, which this test
# does not look at.
WORKERS = "import sys, app; app.workers_refusal = lambda *a: None; sys.exit(app.main(sys.argv[1:]))"


def test_workers_share_one_port_and_a_killed_one_is_replaced(tmp_path, emulator, pg_dsn):  # noqa: F811
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(tmp_path, pg_dsn, emulator, port, "--workers", "2", code=WORKERS)
    try:
        key = new_key(base, "alice")
        time.sleep(0.3)
        instances: set[str] = set()
        deadline = time.time() + 20  # the second worker may still be starting when the first answers
        while len(instances) < 2:
            assert time.time() < deadline, f"requests reached only {instances}"
            for _ in range(10):  # a new connection each: the kernel spreads them over both sockets
                r = httpx.post(base + "/v1/chat/completions", json={"model": "llama3.2:1b", "messages": MSG},
                               headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == 200, r.text  # either worker knows the key (LISTEN/NOTIFY)
            instances = {i for (i,) in fetch(pg_dsn, "SELECT DISTINCT instance_id FROM requests")}
        assert len(instances) == 2, instances
        pids = {int(i.split("-")[-2]) for i in instances}
        os.kill(pids.pop(), signal.SIGKILL)
        time.sleep(1.0)  # the supervisor starts a new worker
        live = {i for (i,) in fetch(pg_dsn, "SELECT instance_id FROM proxyd_instances"
                                            " WHERE heartbeat_at > now() - interval '1 second'")}
        deadline = time.time() + 15
        while len(live) < 2:
            assert time.time() < deadline, f"no replacement worker: {live}"
            time.sleep(0.2)
            live = {i for (i,) in fetch(pg_dsn, "SELECT instance_id FROM proxyd_instances"
                                                " WHERE heartbeat_at > now() - interval '1 second'")}
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
