"""The proxy benchmark: proxyd (accounting and ledger on) against a bare forwarder and the emulator.

    python -m load.bench                       # 3 rounds x 10 s per target and phase (about 6 minutes)
    python -m load.bench --quick               # a few seconds per phase (the smoke test)
    python -m load.bench --soak 600            # the phases, then a 10-minute mixed soak with faults
    python -m load.bench --phases throughput --rounds 5 --duration 20 --json /tmp/r.json
    python -m load.bench --phases throughput,latency --ledger-rows 3000000   # on a ledger of months

Everything runs on loopback in subprocesses on free ports: the Ollama emulator with instant answers
(and a second one with a per-token delay, for streams), proxyd (temp database, temp config with
generous but *all* limits configured, metrics on, access log off) and ``load.forwarder`` (the bare
yardstick: same Tornado + aiohttp pool, nothing else), each in front of each emulator. Then, in one
run, alternating between the targets round by round (the order rotates every round) so that machine
noise spreads evenly:

throughput  non-stream chat at fixed concurrency (closed loop): rps, p50/p99, errors, CPU per request
            of the serving process; proxy/forwarder ratio (of the means, and per round).
            Load generator: ``wrk`` when installed (C, cheapest), else load.loadgen's raw HTTP/1.1
            client; either runs in its own process.
calls       Python function calls per request (cProfile): the proxy (and candidates) and the forwarder
            each started under the profiler, once idle and once under the throughput load, the idle
            run's calls subtracted; total and by package. A count, so it hardly varies between runs:
            it shows a change of a few percent that rps cannot tell from noise.
stream      streamed chat (20 tokens, 5 ms apart) at concurrency 1 and N: time to first byte and
            total time; the proxy's overhead over the forwarder in TTFB and per relayed chunk.
isolation   small-request latency (open loop, fixed rate) through the proxy while a few ~100k-token
            prompts are in flight, against the same without them (and the same on the forwarder).
soak        (--soak S) a steady mix (chat, streams, vision, embeddings, a user over a 5/minute limit,
            injected upstream faults) for S seconds: RSS, open files, WAL size at start/end, errors by
            kind, then GET /admin/ledger/check.

Every generator run is bounded by its duration and every subprocess is stopped at the end (SIGTERM,
then SIGKILL). Results: a table on stdout and JSON (``--json PATH``, default
load/results/bench-<timestamp>.json; load/results/ is git-ignored).

The proxy is one process (no --workers yet): all figures are for N=1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ADMIN_TOKEN = os.environ.get("PROXYD_ADMIN_TOKEN") or "bench-admin-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "llama3.2:1b"

# Project targets on a 2-core machine (reported, not enforced).
TARGETS = {"ratio_min": 0.8, "p99_delta_max_ms": 5.0, "ttfb_overhead_max_ms": 2.0, "isolation_rise_max_ms": 10.0}

# Every limit configured (so every check runs on every request), none of them reachable by the bench.
GENEROUS = {
    "requests_per_minute": 1_000_000_000,
    "tokens_per_minute": 10**15,
    "requests_per_day": 10**12,
    "tokens_per_day": 10**15,
    "tokens_per_month": 10**15,
    "cost_per_day_usd": 10**9,
    "cost_per_month_usd": 10**9,
    "total_tokens": 10**15,
    "total_cost_usd": 10**9,
    "max_concurrent_requests": 100_000,
}


# -- request bodies ------------------------------------------------------------------------------


def small_chat() -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 32, "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"}]}


def stream_chat(tokens: int, directive: str = "") -> dict[str, Any]:
    return {"model": MODEL, "stream": True, "max_tokens": 256, "messages": [
        {"role": "user", "content": f"Tell me a story. [[emu:reply_tokens={tokens}]]{directive}"}]}


def big_prompt_chat(tokens: int) -> dict[str, Any]:
    # The emulator's vocabulary words are one Llama 3 token each, with or without the leading space:
    # ``tokens`` words are exactly that many tokens (plus the template), ~5.7 bytes per token.
    words = ("alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "sigma", "omega")
    rng = random.Random(7)
    text = " ".join(rng.choice(words) for _ in range(tokens))
    # slow_first_byte: the upstream takes 0.5 s before answering, as a model evaluating a long prompt
    # would, so these requests stay in flight while the small ones are measured.
    return {"model": MODEL, "max_tokens": 8, "messages": [
        {"role": "user", "content": "[[emu:fault=slow_first_byte:0.5]] Summarise: " + text}]}


def tiny_png_data_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def vision_chat() -> dict[str, Any]:
    return {"model": "moondream", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": tiny_png_data_url()}},
        {"type": "text", "text": "Describe this image."}]}]}


def embeddings() -> dict[str, Any]:
    return {"model": "nomic-embed-text", "input": ["hello world", "the quick brown fox"]}


# -- processes -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
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


def med(xs, nd: int = 3) -> float | None:
    """Median of the figures that exist (a run with no successful request has no latency)."""
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), nd) if vals else None


def maxn(xs) -> float | None:
    vals = [x for x in xs if x is not None]
    return max(vals) if vals else None


def diff(a: float | None, b: float | None, nd: int = 3) -> float | None:
    return None if a is None or b is None else round(a - b, nd)


def run_summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """What every closed- or open-loop phase reports per target over its rounds."""
    return {
        "rps": round(statistics.mean(r["rps"] for r in rs), 1),
        "p50_ms": med(r["latency_ms"]["p50"] for r in rs),
        "p99_ms": med(r["latency_ms"]["p99"] for r in rs),
        "errors": sum(r["errors"] for r in rs),
        "server_cpu_ms_per_req": med((r["cpu"]["server_ms_per_req"] for r in rs), 4),
    }


def ledger_counters(url: str) -> tuple[float, float] | None:
    """(commits, writes) of a proxy's ledger from its /metrics, or None (no such metric: an older tree)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    found = dict(re.findall(r"^proxyd_ledger_(commits|writes)_total ([0-9.e+]+)$", text, re.MULTILINE))
    if len(found) != 2:
        return None
    return float(found["commits"]), float(found["writes"])


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
priced = "input_price_nusd_per_mtok" in {r[1] for r in conn.execute("PRAGMA table_info(usage_daily)")}  # m004
conn.execute("INSERT INTO usage_daily (user_id, model, day, requests, prompt_tokens, completion_tokens, cost_nusd"
             + (", input_price_nusd_per_mtok, output_price_nusd_per_mtok) VALUES (?, ?, ?, ?, ?, ?, ?, 20000, 50000)"
                if priced else ") VALUES (?, ?, ?, ?, ?, ?, ?)"),
             ("history", "llama3.2:1b", "2026-01-01", n, 26 * n, 13 * n, 1170 * n))
conn.execute("COMMIT")
conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
conn.close()
"""


def prefill_ledger(root: Path, db: Path, rows: int) -> None:
    """--ledger-rows: a ledger that already holds many rows, as after months of use."""
    subprocess.run([PY, "-c", PREFILL, str(db), str(rows)], cwd=root, check=True, timeout=1800)


class Proc:
    def __init__(self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the process's lifetime, closed in stop()
        self.p = subprocess.Popen(cmd, cwd=cwd or ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                  stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads here

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


# -- the bench -----------------------------------------------------------------------------------


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
        cfg.write_text(json.dumps({  # JSON is YAML
            "server": {"address": "127.0.0.1", "port": self.proxy_port},
            "upstream": {"url": self.emu_url},
            "database": {"path": str(self.db)},
            "logging": {"access_log": False, "level": "WARNING"},
            "limits": {"default": GENEROUS},
            "pricing": {
                MODEL: {"input_per_million_usd": 0.02, "output_per_million_usd": 0.05},
                "moondream": {"input_per_million_usd": 0.05, "output_per_million_usd": 0.10},
                "default": {"input_per_million_usd": 0.10, "output_per_million_usd": 0.20},
            },
        }, indent=1))
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
            cfg2.write_text(json.dumps(doc, indent=1))
            if bench.args.ledger_rows:
                prefill_ledger(root, Path(doc["database"]["path"]), bench.args.ledger_rows)
            self.candidates[name] = Proc(f"{name}-{label}", [PY, str(root / "app.py"), "--config", str(cfg2)], d, env,
                                         cwd=root)
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
                **self.workers}[target]

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

    def create_user(self, user_id: str, limits: dict[str, Any], target: str = "proxy") -> str:
        status, doc = http("POST", self.url(target) + "/admin/users", {"user_id": user_id, "limits": limits},
                           token=ADMIN_TOKEN)
        if status != 201:
            raise RuntimeError(f"creating user {user_id}: HTTP {status} {doc}")
        return doc["api_key"]

    def procs(self) -> list[Proc]:
        return [self.emulator, self.proxy, self.forwarder] + list(self.candidates.values()) + list(self.workers.values())


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="proxyd-bench-"))
        self.stacks: dict[str, Stack] = {}
        self.candidates = {f"cand:{Path(d).resolve().name}": Path(d).resolve() for d in args.candidate}
        for root in self.candidates.values():
            if not (root / "app.py").exists():
                raise SystemExit(f"--candidate {root}: no app.py there")
        self.wrk = shutil.which("wrk") if args.generator in ("auto", "wrk") else None
        if args.generator == "wrk" and not self.wrk:
            raise SystemExit("--generator wrk: wrk is not installed (apt-get install -y wrk)")
        self.results: dict[str, Any] = {
            "meta": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "loadavg_start": os.getloadavg(),
                "generator": "wrk" if self.wrk else "load.loadgen (raw HTTP/1.1 client)",
                "args": {k: v for k, v in vars(args).items()},
                "proxy": "one process (N=1); accounting, limits (all configured) and the SQLite ledger on; "
                         "metrics on; access log off",
            },
            "targets": TARGETS,
        }

    # -- helpers ------------------------------------------------------------------------------

    def stack(self, label: str) -> Stack:
        return self.stacks[label]

    def start(self, labels: list[str]) -> None:
        delays = {"instant": 0.0, "stream": self.args.token_delay_ms / 1000.0}
        for label in labels:
            if label not in self.stacks:
                self.stacks[label] = Stack(self, label, delays[label])
        for label in labels:
            self.stacks[label].ready()

    def close(self) -> None:
        for st in self.stacks.values():
            for p in st.procs()[::-1]:
                p.stop()

    def write_mix(self, name: str, kinds: list[dict[str, Any]]) -> Path:
        path = self.tmp / f"mix-{name}.json"
        path.write_text(json.dumps(kinds))
        return path

    def loadgen(self, url: str, mix: Path, *, concurrency: int, duration: float, warmup: float,
                rate: float | None = None, key: str | None = None, timeout: float = 60.0,
                engine: str = "auto") -> dict[str, Any]:
        cmd = [PY, "-m", "load.loadgen", "--url", url, "--mix", str(mix), "--concurrency", str(concurrency),
               "--duration", str(duration), "--warmup", str(warmup), "--timeout", str(timeout), "--engine", engine]
        if rate is not None:
            cmd += ["--rate", str(rate)]
        if key:
            cmd += ["--header", f"Authorization: Bearer {key}"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False, timeout=duration + warmup + timeout + 30,
                           preexec_fn=_die_with_parent)
        if r.returncode != 0:
            raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(r.stdout.decode().strip().splitlines()[-1])

    def loadgen_start(self, url: str, mix: Path, *, concurrency: int, duration: float, key: str | None,
                      timeout: float = 60.0) -> subprocess.Popen:
        cmd = [PY, "-m", "load.loadgen", "--url", url, "--mix", str(mix), "--concurrency", str(concurrency),
               "--duration", str(duration), "--warmup", "0", "--timeout", str(timeout)]
        if key:
            cmd += ["--header", f"Authorization: Bearer {key}"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads here

    def wrk_run(self, url: str, body_file: Path, key: str | None, concurrency: int, duration: float) -> dict[str, Any]:
        script = self.tmp / "post.lua"
        if not script.exists():
            script.write_text(WRK_LUA)
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_AUTH": f"Bearer {key}" if key else ""}
        secs = max(1, round(duration))
        cmd = [self.wrk, "-t1", f"-c{concurrency}", f"-d{secs}s", "--timeout", "30s", "-s", str(script),
               url + "/v1/chat/completions"]
        r = subprocess.run(cmd, capture_output=True, check=False, env=env, timeout=secs + 60, preexec_fn=_die_with_parent)
        lines = [ln for ln in r.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({r.returncode}): {r.stdout.decode()[-1000:]} {r.stderr.decode()[-1000:]}")
        w = json.loads(lines[-1])
        seconds = w["duration_us"] / 1e6
        errors = {k: w[k] for k in ("connect", "read", "write", "status", "timeout") if w[k]}
        ok = w["requests"] - w["status"]
        return {
            "engine": "wrk", "mode": "closed", "concurrency": concurrency, "seconds": round(seconds, 3),
            "requests": w["requests"], "ok": ok, "errors": sum(errors.values()),
            "errors_by_kind": {("http_4xx_5xx" if k == "status" else k): v for k, v in errors.items()},
            "rps": round(ok / seconds, 2),
            "latency_ms": {"p50": w["p50_us"] / 1000, "p90": w["p90_us"] / 1000, "p99": w["p99_us"] / 1000,
                           "max": w["max_us"] / 1000, "mean": round(w["mean_us"] / 1000, 3)},
        }

    def measured(self, stack: Stack, target: str, fn, also: list[int] | None = None) -> dict[str, Any]:
        """Runs fn() and adds CPU figures: the serving process's and the emulator's CPU per answered
        request, the machine's busy cores, and the CPU of processes that are not part of the bench
        (``also``: pids of bench processes still running, e.g. a background generator)."""
        served, emu = stack.process(target), stack.emulator
        ours = [p for st in self.stacks.values() for p in st.procs()]
        l0 = ledger_counters(stack.url(target)) if target in self.proxies() else None
        c0 = {p.name: p.cpu_s() for p in ours}
        x0 = sum(pid_cpu(pid) for pid in also or [])
        g0, (b0, _), w0 = children_cpu(), machine_cpu(), time.monotonic()
        res = fn()
        g1, (b1, _), w1 = children_cpu(), machine_cpu(), time.monotonic()
        c1 = {p.name: p.cpu_s() for p in ours}
        x1 = sum(pid_cpu(pid) for pid in also or [])
        wall = w1 - w0
        ours_cpu = sum(c1[n] - c0[n] for n in c0) + (g1 - g0) + (x1 - x0)
        done = max(1, res.get("requests") or 0)
        res["cpu"] = {
            "server_ms_per_req": round((c1[served.name] - c0[served.name]) * 1000 / done, 4),
            "server_cores": round((c1[served.name] - c0[served.name]) / wall, 3),
            "emulator_ms_per_req": round((c1[emu.name] - c0[emu.name]) * 1000 / done, 4) if target != "emulator" else None,
            "generator_cores": round((g1 - g0) / wall, 3),
            "machine_busy_cores": round((b1 - b0) / wall, 3),
            "foreign_cores": round(max(0.0, (b1 - b0) - ours_cpu) / wall, 3),
        }
        l1 = ledger_counters(stack.url(target)) if l0 else None
        if l0 and l1 and l1[0] > l0[0]:
            # Group commits: how many writes each carried (fewer, fuller commits cost less per row).
            res["ledger"] = {"commits_per_s": round((l1[0] - l0[0]) / wall, 1),
                             "writes_per_commit": round((l1[1] - l0[1]) / (l1[0] - l0[0]), 2)}
        return res

    def proxies(self) -> list[str]:
        return ["proxy"] + list(self.candidates)

    def order(self, targets: list[str], rnd: int) -> list[str]:
        k = rnd % len(targets)
        return targets[k:] + targets[:k]

    # -- phases ---------------------------------------------------------------------------------

    def throughput(self) -> None:
        a = self.args
        st = self.stack("instant")
        body = self.tmp / "small-chat.json"
        body.write_text(json.dumps(small_chat()))
        mix = self.write_mix("small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
        targets = self.proxies() + ["forwarder", "emulator"] + list(st.workers)

        def run(target: str, duration: float, conc: int) -> dict[str, Any]:
            if self.wrk:
                return self.wrk_run(st.url(target), body, st.key(target), conc, duration)
            return self.loadgen(st.url(target), mix, concurrency=conc, duration=duration, warmup=min(1.0, duration / 5),
                                key=st.key(target))

        for t in targets:  # warm-up, not recorded: pools, lazy imports, tokenizer caches
            run(t, 1.0, a.concurrency)
        runs = []
        for rnd in range(a.rounds):
            for t in self.order(targets, rnd):
                r = self.measured(st, t, lambda t=t: run(t, a.duration, a.concurrency))
                r.update(target=t, round=rnd)
                runs.append(r)
                self.progress(f"throughput r{rnd} {t:9s} {r['rps']:8.1f} rps  p50 {r['latency_ms']['p50']:.2f} ms  "
                              f"p99 {r['latency_ms']['p99']:.2f} ms  errors {r['errors']}  "
                              f"cpu/req {r['cpu']['server_ms_per_req']:.3f} ms  foreign {r['cpu']['foreign_cores']}"
                              + (f"  writes/commit {r['ledger']['writes_per_commit']}" if "ledger" in r else ""))
        summary = {}
        for t in targets:
            rs = [r for r in runs if r["target"] == t]
            summary[t] = {
                **run_summary(rs),
                "rps_min": min(r["rps"] for r in rs), "rps_max": max(r["rps"] for r in rs),
                "foreign_cores_mean": round(statistics.mean(r["cpu"]["foreign_cores"] for r in rs), 3),
            }
        by_round = []
        for rnd in range(a.rounds):
            p = next(r for r in runs if r["round"] == rnd and r["target"] == "proxy")
            f = next(r for r in runs if r["round"] == rnd and r["target"] == "forwarder")
            by_round.append(round(p["rps"] / f["rps"], 3) if f["rps"] else None)
        fwd = summary["forwarder"]
        self.results["throughput"] = {
            "concurrency": a.concurrency, "duration_s": a.duration, "rounds": a.rounds,
            "request": "POST /v1/chat/completions, non-stream, llama3.2:1b, 2 messages, max_tokens 32",
            "runs": runs, "summary": summary,
            "ratio_proxy_forwarder": round(summary["proxy"]["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
            "ratio_by_round": by_round,
            "p99_delta_ms": diff(summary["proxy"]["p99_ms"], fwd["p99_ms"]),
            "cpu_ratio_proxy_forwarder": round(summary["proxy"]["server_cpu_ms_per_req"] / fwd["server_cpu_ms_per_req"], 2)
            if fwd["server_cpu_ms_per_req"] else None,
        }
        for name in self.candidates:
            c = summary[name]
            self.results["throughput"].setdefault("candidates", {})[name] = {
                "root": str(self.candidates[name]),
                "ratio_forwarder": round(c["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
                "ratio_proxy": round(c["rps"] / summary["proxy"]["rps"], 3) if summary["proxy"]["rps"] else None,
                "ratio_proxy_by_round": [
                    round(next(r["rps"] for r in runs if r["round"] == k and r["target"] == name)
                          / next(r["rps"] for r in runs if r["round"] == k and r["target"] == "proxy"), 3)
                    for k in range(a.rounds)],
                "cpu_ratio_proxy": round(c["server_cpu_ms_per_req"] / summary["proxy"]["server_cpu_ms_per_req"], 3)
                if summary["proxy"]["server_cpu_ms_per_req"] else None,
            }

        if st.workers:
            n = a.workers_ceiling
            px, fx = summary[f"proxy-x{n}-unshared"], summary[f"forwarder-x{n}"]
            self.results["throughput"]["workers_ceiling"] = {
                "workers": n,
                "note": "N uncoordinated proxy processes (limits not shared: a ceiling, not a product mode) and N forwarders",
                "proxy_rps_vs_one": round(px["rps"] / summary["proxy"]["rps"], 3) if summary["proxy"]["rps"] else None,
                "forwarder_rps_vs_one": round(fx["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
                "ratio_proxy_forwarder": round(px["rps"] / fx["rps"], 3) if fx["rps"] else None,
                "ratio_proxy_vs_one_forwarder": round(px["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
            }

    def profile(self) -> None:
        """One more throughput run on the proxy with py-spy attached (not part of the figures above:
        sampling slows the target a little)."""
        a = self.args
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not os.path.exists(spy):
            self.results["profile"] = {"error": "py-spy not installed (pip install py-spy)"}
            self.progress("profile: py-spy not installed (pip install py-spy); skipped")
            return
        st = self.stack("instant")
        body = self.tmp / "small-chat.json"
        body.write_text(json.dumps(small_chat()))
        mix = self.write_mix("small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
        seconds = max(3, int(a.duration))
        record = [spy, "record", "--pid", str(st.proxy.pid), "--duration", str(seconds), "--rate", "200",
                  "--format", "raw", "--threads", "--output", a.profile]
        if a.profile_mode == "gil":
            record.append("--gil")
        if self.wrk:
            script = self.tmp / "post.lua"
            script.write_text(WRK_LUA)
            env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_AUTH": f"Bearer {st.key('proxy')}"}
            gen = subprocess.Popen([self.wrk, "-t1", f"-c{a.concurrency}", f"-d{seconds + 3}s", "--timeout", "30s",
                                    "-s", str(script), st.url("proxy") + "/v1/chat/completions"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads here
        else:
            gen = self.loadgen_start(st.url("proxy"), mix, concurrency=a.concurrency, duration=seconds + 3,
                                     key=st.key("proxy"))
        try:
            time.sleep(1.5)
            r = subprocess.run(record, capture_output=True, check=False, timeout=seconds + 60)
        finally:
            try:
                gen.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                gen.kill()
                gen.communicate()
        if r.returncode != 0 or not os.path.exists(a.profile):
            self.results["profile"] = {"error": (r.stderr or r.stdout).decode(errors="replace")[-1000:]}
            self.progress(f"profile failed: {self.results['profile']['error']}")
            return
        self.results["profile"] = {"mode": a.profile_mode, "path": a.profile, **summarize_collapsed(a.profile)}
        self.progress(f"profile: {self.results['profile']['samples']} samples -> {a.profile}")

    def calls(self) -> None:
        """Python function calls per request, proxy (and candidates) vs forwarder: each started anew under
        cProfile twice, once left idle and once under the throughput load; the idle run's calls (start-up,
        shutdown) are subtracted. Unlike rps or CPU time this count barely moves between runs on a noisy
        machine, and it says where a proxy's extra work is: by package and by function."""
        import pstats

        a = self.args
        st = self.stack("instant")
        body = self.tmp / "small-chat.json"
        body.write_text(json.dumps(small_chat()))
        mix = self.write_mix("small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
        base_cfg = json.loads((self.tmp / "proxy-instant.yaml").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
        env["PROXYD_ADMIN_TOKEN"] = ADMIN_TOKEN
        seconds = max(1.0, min(a.duration, 5.0))
        roots = {"proxy": ROOT, **self.candidates, "forwarder": None}

        def profiled(name: str, root: Path | None, loaded: bool) -> tuple[dict, int]:
            port, out = free_port(), self.tmp / f"calls-{name.replace(':', '_')}-{int(loaded)}.prof"
            if root is None:
                cmd = ["-m", "load.forwarder", "--port", str(port), "--upstream", st.emu_url, "--log-level", "WARNING"]
                ready = "/"
            else:
                doc = {**base_cfg, "server": {**base_cfg["server"], "port": port},
                       "database": {"path": str(out.with_suffix(".db"))}}
                cfg = out.with_suffix(".yaml")
                cfg.write_text(json.dumps(doc))
                cmd, ready = [str(root / "app.py"), "--config", str(cfg)], "/healthz"
            proc = Proc(out.stem, [PY, "-m", "cProfile", "-o", str(out), *cmd], self.tmp, env, cwd=root or ROOT)
            try:
                wait_ready(proc, f"http://127.0.0.1:{port}{ready}")
                requests, key = 0, None
                if root is not None:
                    status, doc = http("POST", f"http://127.0.0.1:{port}/admin/users",
                                       {"user_id": "bench", "limits": GENEROUS}, token=ADMIN_TOKEN)
                    key = doc["api_key"]
                if loaded:
                    url = f"http://127.0.0.1:{port}"
                    r = (self.wrk_run(url, body, key, a.concurrency, seconds) if self.wrk else
                         self.loadgen(url, mix, concurrency=a.concurrency, duration=seconds, warmup=0, key=key))
                    requests = r["ok"]
            finally:
                proc.stop()
            return {k: v[1] for k, v in pstats.Stats(str(out)).stats.items()}, requests

        def package(key: tuple) -> str:
            path = key[0]
            if path == "~":
                return "builtins (C)"
            if "site-packages/" in path:
                return path.split("site-packages/")[1].split("/")[0].removesuffix(".py")
            for root in [r for r in roots.values() if r is not None]:
                if path.startswith(str(root) + "/"):
                    return path[len(str(root)) + 1:].split("/")[0]
            return "stdlib:" + Path(path).parent.name if "/lib/python3" in path else path

        results: dict[str, Any] = {}
        for name, root in roots.items():
            idle, _ = profiled(name, root, False)
            loaded, n = profiled(name, root, True)
            per = {k: (v - idle.get(k, 0)) / max(1, n) for k, v in loaded.items()}
            by_pkg: dict[str, float] = {}
            for k, v in per.items():
                by_pkg[package(k)] = by_pkg.get(package(k), 0.0) + v
            top = sorted(per.items(), key=lambda kv: -kv[1])[:25]
            results[name] = {
                "requests": n, "calls_per_req": round(sum(per.values()), 1),
                "by_package": {k: round(v, 1) for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1]) if v >= 0.5},
                "top": [[k[2] if k[0] == "~" else f"{k[2]} ({Path(k[0]).name}:{k[1]})", round(v, 2)] for k, v in top],
            }
            self.progress(f"calls {name:9s} {results[name]['calls_per_req']:8.1f} Python calls/request ({n} requests)")
        fwd = results["forwarder"]["calls_per_req"]
        self.results["calls"] = {"seconds": seconds, "concurrency": a.concurrency, "targets": results,
                                 "proxy_minus_forwarder": round(results["proxy"]["calls_per_req"] - fwd, 1)}

    def stream(self) -> None:
        a = self.args
        st = self.stack("stream")
        mix = self.write_mix("stream", [{"name": "stream", "path": "/v1/chat/completions", "stream": True,
                                         "body": stream_chat(a.stream_tokens)}])
        targets = self.proxies() + ["forwarder", "emulator"]
        levels = a.stream_concurrency
        for t in targets:
            self.loadgen(st.url(t), mix, concurrency=4, duration=0.5, warmup=0.2, key=st.key(t))
        runs = []
        for rnd in range(a.rounds):
            for conc in levels:
                for t in self.order(targets, rnd):
                    r = self.measured(st, t, lambda t=t, conc=conc: self.loadgen(
                        st.url(t), mix, concurrency=conc, duration=a.duration, warmup=min(1.0, a.duration / 5),
                        key=st.key(t)))
                    r.update(target=t, round=rnd, level=conc)
                    runs.append(r)
                    tt = r.get("ttfb_ms") or {}
                    self.progress(f"stream r{rnd} c={conc:<3d} {t:9s} ttfb p50 {tt.get('p50')} p99 {tt.get('p99')}  "
                                  f"total p50 {r['latency_ms']['p50']}  n {r['ok']}  errors {r['errors']}")
        summary: dict[str, Any] = {}
        overhead: dict[str, Any] = {}
        for conc in levels:
            s = summary[str(conc)] = {}
            for t in targets:
                rs = [r for r in runs if r["target"] == t and r["level"] == conc and r.get("ttfb_ms")]
                if not rs:
                    s[t] = {"ok": 0, "errors": sum(r["errors"] for r in runs if r["target"] == t and r["level"] == conc)}
                    continue
                s[t] = {
                    "ttfb_p50_ms": med(r["ttfb_ms"]["p50"] for r in rs),
                    "ttfb_p99_ms": med(r["ttfb_ms"]["p99"] for r in rs),
                    "total_p50_ms": med(r["latency_ms"]["p50"] for r in rs),
                    "total_p99_ms": med(r["latency_ms"]["p99"] for r in rs),
                    "events": rs[0].get("events_mean"),
                    "streams_per_s": round(statistics.mean(r["rps"] for r in rs), 1),
                    "ok": sum(r["ok"] for r in rs),
                    "errors": sum(r["errors"] for r in runs if r["target"] == t and r["level"] == conc),
                    "server_cpu_ms_per_stream": round(statistics.median(r["cpu"]["server_ms_per_req"] for r in rs), 4),
                }
            p, f = s.get("proxy", {}), s.get("forwarder", {})
            if all(x.get(k) is not None for x in (p, f) for k in ("ttfb_p50_ms", "ttfb_p99_ms", "total_p50_ms")):
                d_ttfb = p["ttfb_p50_ms"] - f["ttfb_p50_ms"]
                d_total = p["total_p50_ms"] - f["total_p50_ms"]
                chunks = max(1.0, (p["events"] or 2) - 1)
                overhead[str(conc)] = {
                    "ttfb_p50_ms": round(d_ttfb, 3),
                    "ttfb_p99_ms": round(p["ttfb_p99_ms"] - f["ttfb_p99_ms"], 3),
                    "total_p50_ms": round(d_total, 3),
                    "per_chunk_ms": round((d_total - d_ttfb) / chunks, 4),
                }
        self.results["stream"] = {
            "token_delay_ms": a.token_delay_ms, "tokens": a.stream_tokens, "levels": levels,
            "duration_s": a.duration, "rounds": a.rounds, "runs": runs, "summary": summary,
            "overhead_proxy_minus_forwarder": overhead,
        }

    def latency(self) -> None:
        """The same small chat at a fixed rate (open loop) that neither server is near saturating: the
        latency a request pays for passing through the proxy, not the queueing of a saturated server
        (which is what p99 at 50 closed-loop connections mostly measures)."""
        a = self.args
        st = self.stack("instant")
        small = self.write_mix("lat-small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
        warm = min(1.0, a.duration / 5)
        targets = self.proxies() + ["forwarder"]
        runs = []
        for rnd in range(a.rounds):
            for t in self.order(targets, rnd):
                r = self.measured(st, t, lambda t=t: self.loadgen(
                    st.url(t), small, concurrency=64, rate=a.latency_rate, duration=a.duration, warmup=warm,
                    key=st.key(t), engine="aiohttp"))
                r.update(target=t, round=rnd)
                runs.append(r)
                self.progress(f"latency r{rnd} {t:9s} {r['rps']:.0f} rps  p50 {r['latency_ms']['p50']} "
                              f"p99 {r['latency_ms']['p99']}  errors {r['errors']}")
        summary = {}
        for t in targets:
            rs = [r for r in runs if r["target"] == t]
            summary[t] = {
                **run_summary(rs),
                "max_ms": maxn(r["latency_ms"]["max"] for r in rs),
            }
        self.results["latency"] = {
            "rate_rps": a.latency_rate, "duration_s": a.duration, "rounds": a.rounds, "runs": runs, "summary": summary,
            "p50_delta_ms": diff(summary["proxy"]["p50_ms"], summary["forwarder"]["p50_ms"]),
            "p99_delta_ms": diff(summary["proxy"]["p99_ms"], summary["forwarder"]["p99_ms"]),
        }

    def isolation(self) -> None:
        a = self.args
        st = self.stack("instant")
        small = self.write_mix("iso-small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
        big_body = big_prompt_chat(a.big_tokens)
        big_file = self.tmp / "big-chat.json"
        big_file.write_text(json.dumps(big_body))
        big = self.write_mix("iso-big", [{"name": "big", "path": "/v1/chat/completions", "body_file": str(big_file)}])
        warm = min(1.0, a.duration / 5)
        runs = []
        targets = self.proxies() + ["forwarder"]
        for rnd in range(a.rounds):
            for t in self.order(targets, rnd):
                for loaded in ((False, True) if rnd % 2 == 0 else (True, False)):
                    bg = None
                    if loaded:
                        bg = self.loadgen_start(st.url(t), big, concurrency=a.big_concurrency,
                                                duration=a.duration + warm + 1.5, key=st.key(t))
                        time.sleep(1.0)  # the big requests are in flight before the measured window opens
                    try:
                        r = self.measured(st, t, lambda t=t: self.loadgen(
                            st.url(t), small, concurrency=16, rate=a.iso_rate, duration=a.duration, warmup=warm,
                            key=st.key(t), engine="aiohttp"), also=[bg.pid] if bg is not None else None)
                    finally:
                        bg_res = None
                        if bg is not None:
                            try:
                                out, _ = bg.communicate(timeout=a.duration + 120)
                                bg_res = json.loads(out.decode().strip().splitlines()[-1])
                            except (subprocess.TimeoutExpired, ValueError, IndexError):
                                bg.kill()
                                bg.communicate()
                    r.update(target=t, round=rnd, big_in_flight=loaded)
                    if bg_res is not None:
                        r["big"] = {k: bg_res.get(k) for k in ("ok", "errors", "errors_by_kind", "rps", "latency_ms")}
                    runs.append(r)
                    self.progress(f"isolation r{rnd} {t:9s} big={'yes' if loaded else 'no ':3s} small p50 "
                                  f"{r['latency_ms']['p50']} p99 {r['latency_ms']['p99']} max {r['latency_ms']['max']}  "
                                  f"errors {r['errors']}" + (f"  big ok {bg_res.get('ok')} err {bg_res.get('errors')}"
                                                             if bg_res else ""))
        summary = {}
        for t in targets:
            base = [r for r in runs if r["target"] == t and not r["big_in_flight"]]
            load = [r for r in runs if r["target"] == t and r["big_in_flight"]]
            p99_0 = med(r["latency_ms"]["p99"] for r in base)
            p99_1 = med(r["latency_ms"]["p99"] for r in load)
            summary[t] = {
                "p50_without_ms": med(r["latency_ms"]["p50"] for r in base),
                "p50_with_ms": med(r["latency_ms"]["p50"] for r in load),
                "p99_without_ms": round(p99_0, 3), "p99_with_ms": round(p99_1, 3),
                "p99_rise_ms": diff(p99_1, p99_0),
                "max_with_ms": maxn(r["latency_ms"]["max"] for r in load),
                "errors": sum(r["errors"] for r in runs if r["target"] == t),
                "big_ok": sum((r.get("big") or {}).get("ok") or 0 for r in load),
                "big_errors": sum((r.get("big") or {}).get("errors") or 0 for r in load),
            }
        self.results["isolation"] = {
            "small_rate_rps": a.iso_rate, "big_concurrency": a.big_concurrency, "big_prompt_tokens": a.big_tokens,
            "big_body_bytes": len(json.dumps(big_body)), "duration_s": a.duration, "rounds": a.rounds,
            "runs": runs, "summary": summary,
        }

    def soak(self) -> None:
        a = self.args
        st = self.stack("stream")  # streams take their time (token delay): a realistic in-flight mix
        users = [st.create_user(f"soak-{i}", GENEROUS) for i in range(a.soak_users)]
        tight = st.create_user("soak-tight", {"requests_per_minute": 5})
        chat = "/v1/chat/completions"
        kinds = [
            {"name": "chat", "path": chat, "body": small_chat(), "weight": 35, "auth_keys": users},
            {"name": "chat_stream", "path": chat, "body": stream_chat(20), "stream": True, "weight": 25, "auth_keys": users},
            {"name": "embeddings", "path": "/v1/embeddings", "body": embeddings(), "weight": 15, "auth_keys": users},
            {"name": "vision", "path": chat, "body": vision_chat(), "weight": 8, "auth_keys": users},
            {"name": "tight_user_429", "path": chat, "body": small_chat(), "weight": 5, "auth_keys": [tight],
             "expect": [200, 429]},
        ]
        if not a.no_faults:
            kinds += [
                {"name": "fault_error500", "path": chat, "weight": 2, "auth_keys": users, "expect": [500],
                 "body": {**small_chat(), "messages": [{"role": "user", "content": "hi [[emu:fault=error500]]"}]}},
                {"name": "fault_busy503", "path": chat, "weight": 2, "auth_keys": users, "expect": [503],
                 "body": {**small_chat(), "messages": [{"role": "user", "content": "hi [[emu:fault=busy503]]"}]}},
                {"name": "fault_cut_stream", "path": chat, "stream": True, "weight": 2, "auth_keys": users,
                 "expect": ["stream_error"], "body": stream_chat(20, "[[emu:fault=cut_after:3]]")},
                {"name": "fault_no_usage_stream", "path": chat, "stream": True, "weight": 2, "auth_keys": users,
                 "body": stream_chat(20, "[[emu:fault=no_usage]]")},
            ]
        mix = self.write_mix("soak", kinds)
        proxy = st.proxy
        wal = Path(str(st.db) + "-wal")

        def sample(label: str) -> dict[str, Any]:
            return {"at": label, "t": round(time.monotonic() - t0, 1), "rss_kb": proxy.rss_kb(),
                    "open_files": proxy.open_files(), "threads": proxy.threads(),
                    "wal_bytes": wal.stat().st_size if wal.exists() else 0, "cpu_s": round(proxy.cpu_s(), 2)}

        t0 = time.monotonic()
        samples = [sample("start")]
        warm = min(2.0, a.soak / 10)
        cmd = [PY, "-m", "load.loadgen", "--url", st.url("proxy"), "--mix", str(mix), "--concurrency",
               str(a.soak_concurrency), "--duration", str(a.soak), "--warmup", str(warm), "--timeout", "60"]
        out_path, err_path = self.tmp / "soak-loadgen.out", self.tmp / "soak-loadgen.err"
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:  # files: a long run never fills a pipe
            gen = subprocess.Popen(cmd, cwd=ROOT, stdout=out_f, stderr=err_f, preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads here
        every = max(1.0, min(30.0, a.soak / 10))
        hard_stop = time.monotonic() + a.soak + warm + 120
        next_sample = time.monotonic() + every
        while gen.poll() is None and time.monotonic() < hard_stop:
            time.sleep(0.2)
            if time.monotonic() >= next_sample and gen.poll() is None:
                samples.append(sample("during"))
                next_sample += every
        if gen.poll() is None:
            gen.kill()
        gen.wait()
        try:
            res = json.loads(out_path.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"soak generator failed: {err_path.read_text(errors='replace')[-2000:]}")
        idle = self.wait_idle(st)
        samples.append(sample("end"))
        status, check = http("GET", st.url("proxy") + "/admin/ledger/check", token=ADMIN_TOKEN, timeout=60)
        unexpected = {k: v for k, v in res.get("errors_by_kind", {}).items()}
        self.results["soak"] = {
            "seconds": a.soak, "concurrency": a.soak_concurrency, "users": a.soak_users + 1,
            "faults": not a.no_faults, "token_delay_ms": a.token_delay_ms,
            "requests": res["requests"], "ok": res["ok"], "expected_non_200": res["expected_non_200"],
            "unexpected_errors": res["errors"], "unexpected_errors_by_kind": unexpected,
            "status": res["status"], "rps": res["rps"], "latency_ms": res["latency_ms"],
            "by_kind": {k: {f: v.get(f) for f in ("requests", "ok", "expected_non_200", "errors", "errors_by_kind",
                                                  "status", "latency_ms")}
                        for k, v in (res.get("by_kind") or {}).items()},
            "samples": samples, "start": samples[0], "end": samples[-1], "idle_after": idle,
            "ledger_check": {"http_status": status, **(check if isinstance(check, dict) else {"body": check})},
        }
        self.progress(f"soak {a.soak}s: {res['requests']} requests, {res['ok']} ok, {res['expected_non_200']} expected "
                      f"non-200, {res['errors']} unexpected errors; RSS {samples[0]['rss_kb']} -> {samples[-1]['rss_kb']} kB; "
                      f"ledger ok={check.get('ok') if isinstance(check, dict) else check}")

    def wait_idle(self, st: Stack, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        doc: Any = None
        while time.monotonic() < deadline:
            _, doc = http("GET", st.url("proxy") + "/healthz", token=ADMIN_TOKEN)  # the queues are for admins
            if isinstance(doc, dict) and not doc.get("reservations_in_flight") and not doc.get("ledger_queue_depth"):
                break
            time.sleep(0.2)
        return {k: doc.get(k) for k in ("reservations_in_flight", "ledger_queue_depth")} if isinstance(doc, dict) else {}

    def ledger_checks(self) -> None:
        out = {}
        for label, st in self.stacks.items():
            idle = self.wait_idle(st)
            status, doc = http("GET", st.url("proxy") + "/admin/ledger/check", token=ADMIN_TOKEN, timeout=60)
            out[label] = {"http_status": status, "idle": idle,
                          **({"ok": doc.get("ok"), "requests_by_status": doc.get("requests_by_status"),
                              "reserved_in_flight": doc.get("reserved_in_flight")} if isinstance(doc, dict) else {})}
            out[label]["proxy_rss_kb"] = st.proxy.rss_kb()
        self.results["ledger_check"] = out

    def progress(self, line: str) -> None:
        if not self.args.quiet:
            print("  " + line, file=sys.stderr, flush=True)


WRK_LUA = r"""
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"duration_us":%d,"requests":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


# -- report ----------------------------------------------------------------------------------------


def summarize_collapsed(path: str, top: int = 25) -> dict[str, Any]:
    """py-spy raw (collapsed) stacks -> share of samples per thread, and per function (self and
    inclusive) and per file (self) for all threads and for the event loop's thread (MainThread) alone.
    Line numbers are dropped so a function counts once. Percentages are of all samples."""
    import collections
    import re

    def counters() -> dict[str, collections.Counter]:
        return {"self": collections.Counter(), "inclusive": collections.Counter(), "self_by_file": collections.Counter()}

    every, main = counters(), counters()
    threads: collections.Counter = collections.Counter()
    waiting: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if not stack or not n.isdigit():
                continue
            count = int(n)
            frames = stack.split(";")
            thread = "?"
            if frames[0].startswith("thread ("):
                thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
                frames = frames[1:]
            threads[thread] += count
            if frames and any(frames[-1].startswith(w) for w in WAITING_FRAMES):
                # py-spy's idle detection misses some blocking waits (a thread blocked in queue.get, a
                # pool worker waiting for work, the selector): counted apart, not as work.
                waiting[thread + ": " + re.sub(r":\d+\)$", ")", frames[-1])] += count
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in frames]
            total += count
            for c in (every, main) if thread == "MainThread" else (every,):
                if frames:
                    c["self"][frames[-1]] += count
                    m = re.search(r"\(([^()]*)\)$", frames[-1])
                    c["self_by_file"][m.group(1) if m else frames[-1]] += count
                for fr in set(frames):
                    c["inclusive"][fr] += count

    def pct(c: collections.Counter) -> list[list[Any]]:
        return [[name, round(100.0 * n / total, 1)] for name, n in c.most_common(top)] if total else []

    main_total = threads.get("MainThread", 0)
    # Frames on every sample of the loop thread (run, main, run_forever...) say nothing: left out.
    main["inclusive"] = collections.Counter({k: v for k, v in main["inclusive"].items() if v < 0.98 * main_total})
    for c in (every["self"], main["self"]):
        for key in list(c):
            if any(key.startswith(w) for w in WAITING_FRAMES):
                del c[key]
    return {"samples": total, "threads": pct(threads), "waiting": pct(waiting),
            **{k: pct(v) for k, v in every.items()},
            "main_thread": {k: pct(v) for k, v in main.items()}}


# Leaf frames that are blocking waits: the ledger writer's queue.get, idle pool workers, the selector.
WAITING_FRAMES = ("Store._write_loop (", "_worker (concurrent/futures/thread.py", "EpollSelector.select (")


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("meets" if ok else "MISSES")


def report(res: dict[str, Any]) -> str:
    out = []
    m = res["meta"]
    out.append(f"proxyd bench  {m['started']}  cpus={m['cpus']}  python {m['python']}  generator: {m['generator']}")
    out.append(f"load average start {tuple(round(x, 2) for x in m['loadavg_start'])} end "
               f"{tuple(round(x, 2) for x in m.get('loadavg_end', (0, 0, 0)))}")
    if "throughput" in res:
        t = res["throughput"]
        out.append(f"\n[throughput] non-stream chat, {t['concurrency']} connections, {t['rounds']} rounds x {t['duration_s']} s")
        rows = [[name, s["rps"], f"{s['rps_min']:.0f}-{s['rps_max']:.0f}", s["p50_ms"], s["p99_ms"], s["errors"],
                 s["server_cpu_ms_per_req"], s["foreign_cores_mean"]] for name, s in t["summary"].items()]
        out.append(table(rows, ["target", "rps", "rps range", "p50 ms", "p99 ms", "errors", "cpu ms/req", "foreign cores"]))
        out.append(f"proxy/forwarder rps ratio {fmt(t['ratio_proxy_forwarder'], 3)} (per round {t['ratio_by_round']}; "
                   f"target >= {TARGETS['ratio_min']}: {verdict(t['ratio_proxy_forwarder'] is not None and t['ratio_proxy_forwarder'] >= TARGETS['ratio_min'])})")
        for name, c in (t.get("candidates") or {}).items():
            out.append(f"{name}: rps vs proxy {fmt(c['ratio_proxy'], 3)} (per round {c['ratio_proxy_by_round']}), "
                       f"vs forwarder {fmt(c['ratio_forwarder'], 3)}, CPU per request vs proxy {fmt(c['cpu_ratio_proxy'], 3)}")
            rounds = [r for r in c["ratio_proxy_by_round"] if r is not None]
            if rounds and min(rounds) < 1 < max(rounds):
                # Seen here: 4 rounds showing +8% for a change that 8 rounds put at -4% (docs/DESIGN.md).
                out.append(f"  rounds disagree on the sign ({min(rounds)} .. {max(rounds)}): not a measured difference"
                           + (" yet; run 8 rounds or more" if len(rounds) < 8 else ""))
        if t.get("workers_ceiling"):
            w = t["workers_ceiling"]
            out.append(f"N={w['workers']} (uncoordinated ceiling): proxy rps x{fmt(w['proxy_rps_vs_one'], 2)} of N=1, "
                       f"forwarder x{fmt(w['forwarder_rps_vs_one'], 2)}; proxy/forwarder at N={w['workers']} "
                       f"{fmt(w['ratio_proxy_forwarder'], 3)}, vs the one-process forwarder {fmt(w['ratio_proxy_vs_one_forwarder'], 3)}")
        out.append(f"p99 proxy - forwarder {fmt(t['p99_delta_ms'])} ms (target <= {TARGETS['p99_delta_max_ms']}: "
                   f"{verdict(None if t['p99_delta_ms'] is None else t['p99_delta_ms'] <= TARGETS['p99_delta_max_ms'])}); CPU per request proxy/forwarder "
                   f"{fmt(t['cpu_ratio_proxy_forwarder'])}x")
    if "calls" in res:
        c = res["calls"]
        names = list(c["targets"])
        packages = list(dict.fromkeys(k for v in c["targets"].values() for k in v["by_package"]))
        rows = [["all", *(c["targets"][n]["calls_per_req"] for n in names)]]
        rows += [[pkg, *(c["targets"][n]["by_package"].get(pkg, 0) for n in names)] for pkg in packages[:14]]
        out.append(f"\n[calls] Python function calls per request (cProfile, {c['concurrency']} connections, "
                   f"{c['seconds']} s; an idle run's calls subtracted): proxy - forwarder {fmt(c['proxy_minus_forwarder'], 1)}")
        out.append(table(rows, ["package", *names]))
    if "stream" in res:
        s = res["stream"]
        out.append(f"\n[stream] {s['tokens']} tokens, {s['token_delay_ms']} ms apart, {s['rounds']} rounds x {s['duration_s']} s")
        rows = []
        for lvl, per in s["summary"].items():
            for name, v in per.items():
                rows.append([f"c={lvl} {name}", v.get("ttfb_p50_ms"), v.get("ttfb_p99_ms"), v.get("total_p50_ms"),
                             v.get("total_p99_ms"), v.get("streams_per_s"), v.get("errors"), v.get("server_cpu_ms_per_stream")])
        out.append(table(rows, ["target", "ttfb p50", "ttfb p99", "total p50", "total p99", "streams/s", "errors", "cpu ms/stream"]))
        for lvl, o in s["overhead_proxy_minus_forwarder"].items():
            out.append(f"c={lvl}: proxy - forwarder: TTFB p50 {fmt(o['ttfb_p50_ms'])} ms (target <= "
                       f"{TARGETS['ttfb_overhead_max_ms']}: {verdict(o['ttfb_p50_ms'] <= TARGETS['ttfb_overhead_max_ms'])}), "
                       f"TTFB p99 {fmt(o['ttfb_p99_ms'])} ms, total p50 {fmt(o['total_p50_ms'])} ms, "
                       f"per chunk {fmt(o['per_chunk_ms'], 3)} ms")
    if "latency" in res:
        lat = res["latency"]
        out.append(f"\n[latency] the small chat at a fixed {lat['rate_rps']}/s (open loop, below saturation), "
                   f"{lat['rounds']} rounds x {lat['duration_s']} s")
        rows = [[name, v["rps"], v["p50_ms"], v["p99_ms"], v["max_ms"], v["errors"], v["server_cpu_ms_per_req"]]
                for name, v in lat["summary"].items()]
        out.append(table(rows, ["target", "rps", "p50 ms", "p99 ms", "max ms", "errors", "cpu ms/req"]))
        out.append(f"proxy - forwarder at this rate: p50 {fmt(lat['p50_delta_ms'])} ms, p99 {fmt(lat['p99_delta_ms'])} ms "
                   f"(the 5 ms p99 target is stated for 50 connections: see [throughput])")
    if "isolation" in res:
        i = res["isolation"]
        out.append(f"\n[isolation] small chats at {i['small_rate_rps']}/s (open loop) with/without {i['big_concurrency']} "
                   f"concurrent {i['big_prompt_tokens']}-token prompts ({i['big_body_bytes'] // 1024} KB), "
                   f"{i['rounds']} rounds x {i['duration_s']} s")
        rows = [[name, v["p50_without_ms"], v["p50_with_ms"], v["p99_without_ms"], v["p99_with_ms"], v["p99_rise_ms"],
                 v["max_with_ms"], v["errors"], f"{v['big_ok']}/{v['big_errors']}"] for name, v in i["summary"].items()]
        out.append(table(rows, ["target", "p50 w/o", "p50 with", "p99 w/o", "p99 with", "p99 rise", "max with", "errors",
                                "big ok/err"]))
        rise = i["summary"].get("proxy", {}).get("p99_rise_ms")
        if rise is not None:
            out.append(f"proxy p99 rise {fmt(rise)} ms (target < {TARGETS['isolation_rise_max_ms']}: "
                       f"{verdict(rise < TARGETS['isolation_rise_max_ms'])})")
    if "soak" in res:
        s = res["soak"]
        st, en = s["start"], s["end"]
        out.append(f"\n[soak] {s['seconds']} s, {s['concurrency']} connections, {s['users']} users, faults={s['faults']}: "
                   f"{s['requests']} requests ({s['rps']} ok/s), ok {s['ok']}, expected non-200 {s['expected_non_200']}, "
                   f"unexpected errors {s['unexpected_errors']} {s['unexpected_errors_by_kind']}")
        out.append(table([["start", st["rss_kb"], st["open_files"], st["threads"], st["wal_bytes"]],
                          ["end", en["rss_kb"], en["open_files"], en["threads"], en["wal_bytes"]]],
                         ["proxy", "RSS kB", "open files", "threads", "WAL bytes"]))
        rows = [[k, v["requests"], v["ok"], v["expected_non_200"], v["errors"], json.dumps(v["status"]),
                 json.dumps(v["errors_by_kind"])] for k, v in s["by_kind"].items()]
        out.append(table(rows, ["kind", "requests", "ok", "expected", "errors", "status", "errors by kind"]))
        out.append(f"ledger check: {s['ledger_check'].get('ok')}  idle after: {s['idle_after']}")
    if "profile" in res and "self" in res["profile"]:
        pr = res["profile"]
        out.append(f"\n[profile] py-spy ({pr['mode']}), {pr['samples']} samples of the proxy under the throughput load; "
                   f"threads: {pr['threads']}; waiting (not work): {pr.get('waiting')}")
        out.append(table([[n, v] for n, v in pr["self"][:20]], ["self, all threads (function)", "% of samples"]))
        out.append(table([[n, v] for n, v in pr["main_thread"]["inclusive"][:35]],
                         ["inclusive, event loop thread (function)", "% of samples"]))
    if "ledger_check" in res:
        out.append("\n[ledger] " + "; ".join(f"{k}: ok={v.get('ok')} {v.get('requests_by_status')} idle={v.get('idle')}"
                                           for k, v in res["ledger_check"].items()))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load.bench", description="proxyd vs a bare forwarder vs the emulator",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    p.add_argument("--concurrency", type=int, default=50, help="throughput: connections (default 50)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds over the targets (default 3)")
    p.add_argument("--quick", action="store_true", help="a few seconds per phase, 1 round (smoke test)")
    p.add_argument("--json", help="write results here (default load/results/bench-<timestamp>.json)")
    p.add_argument("--phases", default="throughput,calls,latency,stream,isolation",
                   help="comma list of throughput,calls,latency,stream,isolation,soak (default: all but soak)")
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="also run the soak phase this long")
    p.add_argument("--soak-concurrency", type=int, default=20)
    p.add_argument("--soak-users", type=int, default=8, help="users with generous limits (plus one at 5/minute)")
    p.add_argument("--no-faults", action="store_true", help="soak without injected upstream faults")
    p.add_argument("--stream-concurrency", default="1,20", help="stream: concurrency levels (default 1,20)")
    p.add_argument("--stream-tokens", type=int, default=20)
    p.add_argument("--token-delay-ms", type=float, default=5.0, help="stream emulator: ms between tokens")
    p.add_argument("--latency-rate", type=float, default=500.0, help="latency: small requests per second (open loop)")
    p.add_argument("--iso-rate", type=float, default=100.0, help="isolation: small requests per second")
    p.add_argument("--big-concurrency", type=int, default=3, help="isolation: big prompts in flight")
    p.add_argument("--big-tokens", type=int, default=100_000, help="isolation: tokens per big prompt")
    p.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                   help="throughput load generator: wrk if installed (auto), or load.loadgen")
    p.add_argument("--candidate", metavar="DIR", action="append", default=[],
                   help="another proxyd tree (e.g. a patched copy) benchmarked alongside the proxy, as target "
                        "'cand:<dir name>' (repeatable)")
    p.add_argument("--ledger-rows", metavar="N", type=int, default=0,
                   help="start each proxy (and candidate) on a ledger that already holds N settled rows of "
                        "another user, written with that tree's own request ids (a ledger after months of use)")
    p.add_argument("--workers-ceiling", metavar="N", type=int, default=0,
                   help="throughput: also N proxy processes sharing the port without coordination (load.ceiling: "
                        "limits not shared, so the most N workers could give) and N forwarders")
    p.add_argument("--profile", metavar="PATH",
                   help="after the throughput phase, one more proxy run under py-spy: collapsed stacks to PATH, "
                        "top functions into the results")
    p.add_argument("--profile-mode", choices=("all", "gil"), default="all",
                   help="py-spy: samples of every thread not seen idle (default; counts C code that releases the "
                        "GIL, such as tiktoken and sqlite), or only of the thread holding the GIL")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = p.parse_args(argv)
    phases = [x.strip() for x in a.phases.split(",") if x.strip()]
    unknown = set(phases) - {"throughput", "calls", "latency", "stream", "isolation", "soak"}
    if unknown:
        p.error(f"unknown phase {min(unknown)}")
    if a.soak and "soak" not in phases:
        phases.append("soak")
    if "soak" in phases and not a.soak:
        a.soak = 60.0
    if a.quick:
        a.duration, a.rounds, a.stream_concurrency = 1.5, 1, "4"
        a.big_tokens, a.big_concurrency, a.iso_rate = min(a.big_tokens, 20_000), 2, 50.0
        a.latency_rate = min(a.latency_rate, 200.0)
        if a.soak:
            a.soak = min(a.soak, 5.0)
    a.stream_concurrency = [int(x) for x in str(a.stream_concurrency).split(",") if x.strip()]
    for name, lo, hi in (("duration", 0.5, 3600), ("soak", 0, 24 * 3600)):
        v = getattr(a, name)
        if v and not lo <= v <= hi:
            p.error(f"--{name} must be in [{lo}, {hi}]")
    if not 1 <= a.rounds <= 50 or not 1 <= a.concurrency <= 2000:
        p.error("--rounds in [1, 50], --concurrency in [1, 2000]")
    a.phase_list = phases
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    stop = {"sig": None}

    def on_signal(signum, _frame):
        stop["sig"] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    phases = args.phase_list
    ok = False
    try:
        labels = []
        if {"throughput", "calls", "latency", "isolation"} & set(phases) or args.profile:
            labels.append("instant")
        if {"stream", "soak"} & set(phases):
            labels.append("stream")
        bench.start(labels)
        if bench.wrk is None and "throughput" in phases and args.generator == "auto":
            print("  (wrk not found: the Python generator is used; it takes more CPU from the servers on a small "
                  "machine. apt-get install -y wrk)", file=sys.stderr)
        for phase in ("throughput", "calls", "latency", "stream", "isolation", "soak"):
            if phase in phases:
                bench.progress(f"-- {phase}")
                getattr(bench, phase)()
            if phase == "throughput" and args.profile:
                bench.progress("-- profile (py-spy)")
                bench.profile()
        bench.ledger_checks()
        ok = True
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.results["meta"]["loadavg_end"] = os.getloadavg()
        for st in bench.stacks.values():
            for p in st.procs():
                if not p.alive():
                    bench.results.setdefault("process_exits", {})[p.name] = p.p.returncode
        bench.close()
        if ok:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        else:
            print(f"logs and databases kept in {bench.tmp}", file=sys.stderr)
    text = report(bench.results)
    print(text)
    path = Path(args.json) if args.json else ROOT / "load" / "results" / time.strftime("bench-%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(bench.results, indent=1, default=str))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
