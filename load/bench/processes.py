"""The servers under test, each a subprocess on a free loopback port: the Ollama emulator, proxyd (and
candidate trees), the bare forwarder and the N-process ceilings; starting them, waiting until they
answer, reading their CPU, memory and files, stopping them."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .workload import GENEROUS, MODEL

if TYPE_CHECKING:
    from .runner import Bench

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
ADMIN_TOKEN = os.environ.get("PROXYD_ADMIN_TOKEN") or "bench-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """Child side of Popen: SIGTERM when the bench dies, even by SIGKILL (a test's timeout), so no
    server outlives it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001, S110 - not Linux/glibc: the children are still stopped by close()
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_cpu() -> tuple[float, float]:
    """(busy seconds, total seconds) of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    total = sum(v[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pid_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def descendants(pid: int) -> list[int]:
    """The process and its children, recursively (from /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return out


# Run inside a proxyd tree (its own migrations and request ids): settled rows of another user, finished
# long ago (so neither today's limits nor the last-minute windows see them), ids as that tree makes them.
PREFILL = r"""
import os, sqlite3, sys
from sqlite_utils import Database
try:
    from proxyd.storage.sqlite_migrations import migrations
except ImportError:  # trees before proxyd/storage/
    from proxyd.migrations import migrations
try:
    from proxyd.handlers.base import new_request_id
except ImportError:  # trees before time-ordered ids
    def new_request_id():
        return "req_" + os.urandom(12).hex()
path, n = sys.argv[1], int(sys.argv[2])
conn = sqlite3.connect(path, isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
migrations.apply(Database(conn))
sql = ("INSERT INTO requests (id, user_id, key_id, model, endpoint, stream, status, http_status, day, created_at,"
       " finished_at, latency_ms, reserved_prompt, reserved_completion, prompt_tokens, completion_tokens,"
       " usage_source, input_price_nusd_per_mtok, output_price_nusd_per_mtok, cost_nusd)"
       " VALUES (?, 'history', 'key_history', 'llama3.2:1b', 'chat.completions', 0, 'settled', 200, '2026-01-01',"
       " '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.010Z', 10, 26, 32, 26, 13, 'reported', 20000, 50000, 1170)")
conn.execute("BEGIN")
for i in range(0, n, 10000):
    conn.executemany(sql, [(new_request_id(),) for _ in range(min(10000, n - i))])
# ...and their daily aggregate, as the writer keeps it (GET /admin/ledger/check compares the two).
# The aggregate's columns differ by schema version (m004 added the prices, m006 endpoint and upstream), and
# the bench may run a tree of either: fill in what this tree's schema has.
cols = {"user_id": "history", "model": "llama3.2:1b", "day": "2026-01-01", "requests": n, "prompt_tokens": 26 * n,
        "completion_tokens": 13 * n, "cost_nusd": 1170 * n, "input_price_nusd_per_mtok": 20000,
        "output_price_nusd_per_mtok": 50000, "endpoint": "chat.completions", "upstream": "default"}
have = {r[1] for r in conn.execute("PRAGMA table_info(usage_daily)")}
cols = {k: v for k, v in cols.items() if k in have}
conn.execute(f"INSERT INTO usage_daily ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", list(cols.values()))
conn.execute("COMMIT")
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.close()
"""


def prefill_ledger(root: Path, db: Path, rows: int) -> None:
    """--ledger-rows: a ledger that already holds many rows, as after months of use."""
    subprocess.run([PY, "-c", PREFILL, str(db), str(rows)], cwd=root, check=True, timeout=1800)


def proxy_config(port: int, emu_url: str, db: Path) -> dict[str, Any]:
    """The proxy's config in every bench (and in load.instructions): one upstream, the SQLite ledger, every
    limit configured for the bench user, no access log."""
    return {
        "server": {"address": "127.0.0.1", "port": port},
        "upstream": {"url": emu_url},
        "database": {"path": str(db)},
        "logging": {"access_log": False, "level": "WARNING"},
        "limits": {"default": GENEROUS},
        "pricing": {
            MODEL: {"input_per_million_usd": 0.02, "output_per_million_usd": 0.05},
            "moondream": {"input_per_million_usd": 0.05, "output_per_million_usd": 0.10},
            "default": {"input_per_million_usd": 0.10, "output_per_million_usd": 0.20},
        },
    }


class Proc:
    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's lifetime, closed in stop()
        self.p = subprocess.Popen(cmd, cwd=cwd or ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                  stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads here

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process (all its threads) and of its child processes (the
        workers of load.ceiling and of load.forwarder --workers)."""
        return sum(pid_cpu(pid) for pid in descendants(self.pid))

    def rss_kb(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def open_files(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return None

    def threads(self) -> int | None:
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return None

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(grace)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self._log.close()


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def wait_ready(proc: Proc, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout}s:\n{proc.tail()}")


class Stack:
    """One emulator with the proxy and the forwarder in front of it."""

    def __init__(self, bench: Bench, label: str, token_delay: float) -> None:
        self.label = label
        d = bench.tmp
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
        env["PROXYD_ADMIN_TOKEN"] = ADMIN_TOKEN
        env["PYTHONUNBUFFERED"] = "1"
        self.emu_port, self.proxy_port, self.fwd_port = free_port(), free_port(), free_port()
        self.emulator = Proc(f"emulator-{label}", [PY, "-m", "ollama_emulator", "--port", str(self.emu_port),
                                                   "--token-delay", str(token_delay), "--log-level", "WARNING"], d, env)
        self.db = d / f"proxy-{label}.db"
        cfg = d / f"proxy-{label}.yaml"
        cfg.write_text(json.dumps(proxy_config(self.proxy_port, self.emu_url, self.db), indent=1))  # JSON is YAML
        if bench.args.ledger_rows:
            bench.progress(f"pre-filling each proxy's ledger with {bench.args.ledger_rows} rows ({label})")
            prefill_ledger(ROOT, self.db, bench.args.ledger_rows)
        self.proxy = Proc(f"proxy-{label}", [PY, "app.py", "--config", str(cfg)], d, env)
        # Other proxyd trees (e.g. patched copies): same config, each its own port and database.
        self.candidates: dict[str, Proc] = {}
        self.ports = {"proxy": self.proxy_port, "forwarder": self.fwd_port, "emulator": self.emu_port}
        for name, root in bench.candidates.items():
            port = self.ports[name] = free_port()
            cfg2 = d / f"{name}-{label}.yaml"
            doc = json.loads(cfg.read_text())
            doc["server"]["port"] = port
            doc["database"]["path"] = str(d / f"{name}-{label}.db")
            extra = bench.candidate_config.get(name)
            if extra:  # each stack its own key prefix
                doc["admission"] = {**extra["admission"], "key_prefix": f"{extra['admission']['key_prefix']}{label}:"}
            cfg2.write_text(json.dumps(doc, indent=1))
            if bench.args.ledger_rows:
                prefill_ledger(root, Path(doc["database"]["path"]), bench.args.ledger_rows)
            self.candidates[name] = Proc(f"{name}-{label}", [PY, str(root / "app.py"), "--config", str(cfg2)], d, env,
                                         cwd=root)
        for name, n in bench.variants.items():  # this tree under another config: routing across n upstreams
            port = self.ports[name] = free_port()
            doc = bench.variant_config(json.loads(cfg.read_text()), self.emu_url, n)
            doc["server"]["port"] = port
            doc["database"]["path"] = str(d / f"{name}-{label}.db")
            cfg2 = d / f"{name}-{label}.yaml"
            cfg2.write_text(json.dumps(doc, indent=1))
            self.candidates[name] = Proc(f"{name}-{label}", [PY, "app.py", "--config", str(cfg2)], d, env)
        self.forwarder = Proc(f"forwarder-{label}", [PY, "-m", "load.forwarder", "--port", str(self.fwd_port),
                                                     "--upstream", self.emu_url, "--log-level", "WARNING"], d, env)
        self.keys: dict[str, str] = {}
        # --workers-ceiling N: N uncoordinated proxies (load.ceiling) and N forwarders, each on one shared port.
        self.workers: dict[str, Proc] = {}
        n = bench.args.workers_ceiling
        if n > 1:
            name = f"proxy-x{n}-unshared"
            self.ports[name] = free_port()
            doc = json.loads(cfg.read_text())
            doc["server"]["port"] = self.ports[name]
            doc["database"]["path"] = str(d / f"{name}-{label}.db")
            cfg3 = d / f"{name}-{label}.yaml"
            cfg3.write_text(json.dumps(doc, indent=1))
            self.ceiling_key = d / f"{name}-{label}.key"
            self.workers[name] = Proc(f"{name}-{label}", [PY, "-m", "load.ceiling", "--workers", str(n), "--config",
                                                          str(cfg3), "--key-file", str(self.ceiling_key),
                                                          "--limits", json.dumps(GENEROUS)], d, env)
            fname = f"forwarder-x{n}"
            self.ports[fname] = free_port()
            self.workers[fname] = Proc(f"{fname}-{label}", [PY, "-m", "load.forwarder", "--workers", str(n), "--port",
                                                            str(self.ports[fname]), "--upstream", self.emu_url,
                                                            "--log-level", "WARNING"], d, env)

        # --postgres DSN: the same proxy on a PostgreSQL ledger; --pg-workers N: N processes on it (issue #16).
        self.shared: dict[str, Proc] = {}
        if bench.args.postgres and label == "instant":  # the throughput phase's stack
            self.pg_dsn = bench.pg_database(label)
            doc = json.loads(cfg.read_text())
            doc["database"] = {"backend": "postgres", "dsn": self.pg_dsn}
            if bench.args.admission_url:
                # A prefix of this run's own: counters left in Redis by an earlier run (another database) are not read.
                doc["admission"] = {"backend": "redis", "url": bench.args.admission_url,
                                    "key_prefix": f"proxyd-bench:{os.getpid()}:pg:"}
            shared = [("proxy-pg", [])]
            if bench.args.pg_workers > 1:
                shared.append((f"proxy-pg-x{bench.args.pg_workers}", ["--workers", str(bench.args.pg_workers)]))
            for name, extra in shared:
                self.ports[name] = doc["server"]["port"] = free_port()
                cfg4 = d / f"{name}-{label}.yaml"
                cfg4.write_text(json.dumps(doc, indent=1))
                self.shared[name] = Proc(f"{name}-{label}", [PY, "app.py", "--config", str(cfg4), *extra], d, env)

    def key(self, target: str) -> str | None:
        """The bench user's key on a proxy target (the others ignore the header; it is sent all the same)."""
        return self.keys.get(target) or self.keys.get("proxy")

    @property
    def emu_url(self) -> str:
        return f"http://127.0.0.1:{self.emu_port}"

    def url(self, target: str) -> str:
        return f"http://127.0.0.1:{self.ports[target]}"

    def process(self, target: str) -> Proc:
        return {"proxy": self.proxy, "forwarder": self.forwarder, "emulator": self.emulator, **self.candidates,
                **self.workers, **self.shared}[target]

    def ready(self) -> None:
        wait_ready(self.emulator, self.emu_url + "/")
        wait_ready(self.proxy, self.url("proxy") + "/healthz")
        wait_ready(self.forwarder, self.url("forwarder") + "/")
        self.keys["proxy"] = self.create_user("bench", GENEROUS)
        for name, proc in self.candidates.items():
            wait_ready(proc, self.url(name) + "/healthz")
            self.keys[name] = self.create_user("bench", GENEROUS, target=name)
        for name, proc in self.workers.items():
            if name.startswith("proxy-"):
                wait_ready(proc, self.url(name) + "/healthz")
                self.keys[name] = self.ceiling_key.read_text().strip()
            else:
                wait_ready(proc, self.url(name) + "/")
        for name, proc in self.shared.items():  # one database: the first creates the user, all know the key
            wait_ready(proc, self.url(name) + "/healthz")
            if "proxy-pg" not in self.keys:
                self.keys["proxy-pg"] = self.create_user("bench", GENEROUS, target=name)
            self.keys[name] = self.keys["proxy-pg"]

    def create_user(self, user_id: str, limits: dict[str, Any], target: str = "proxy") -> str:
        status, doc = http("POST", self.url(target) + "/admin/users", {"user_id": user_id, "limits": limits},
                           token=ADMIN_TOKEN)
        if status != 201:
            raise RuntimeError(f"creating user {user_id}: HTTP {status} {doc}")
        return doc["api_key"]

    def procs(self) -> list[Proc]:
        return ([self.emulator, self.proxy, self.forwarder] + list(self.candidates.values()) + list(self.workers.values())
                + list(self.shared.values()))
