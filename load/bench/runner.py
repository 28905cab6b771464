"""The bench's shared state and tools, used by every phase: the stacks of servers, the load generators
(wrk when installed, else load.loadgen in its own process), the CPU accounting around a measured run,
the idle wait and the ledger checks at the end."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .processes import ADMIN_TOKEN, PY, ROOT, Stack, children_cpu, die_with_parent, http, machine_cpu, pid_cpu
from .report import TARGETS


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


def pg_admin(dsn: str, sql: str) -> None:
    """One statement on --postgres's server (CREATE/DROP DATABASE), in a process of its own: the bench
    itself imports no database driver."""
    code = ("import asyncio, sys, asyncpg\n"
            "async def run():\n"
            "    c = await asyncpg.connect(sys.argv[1], timeout=10)\n"
            "    try:\n        await c.execute(sys.argv[2])\n"
            "    finally:\n        await c.close()\n"
            "asyncio.run(run())\n")
    subprocess.run([PY, "-c", code, dsn, sql], check=True, timeout=60)


class Bench:
    """One run: its arguments, temp directory, stacks of servers, the load generator and the results
    the phases fill in."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="proxyd-bench-"))
        self.stacks: dict[str, Stack] = {}
        self.pg_databases: list[str] = []  # --postgres: created for the run, dropped at close
        self.candidates = {f"cand:{Path(d).resolve().name}": Path(d).resolve() for d in args.candidate}
        for root in self.candidates.values():
            if not (root / "app.py").exists():
                raise SystemExit(f"--candidate {root}: no app.py there")
        # Variants of this tree's proxy under another config (same code): --upstreams N.
        self.variants: dict[str, int] = {f"proxy-{args.upstreams}up": args.upstreams} if args.upstreams > 1 else {}
        # Config a candidate runs with on top of the proxy's (--redis: this tree, limits counted in Redis).
        self.candidate_config: dict[str, dict[str, Any]] = {}
        if args.redis:
            self.candidates["proxy+redis"] = ROOT
            self.candidate_config["proxy+redis"] = {"admission": {
                "backend": "redis", "url": args.redis, "key_prefix": f"proxyd-bench:{os.getpid()}:"}}
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
        for name in self.pg_databases:
            pg_admin(self.args.postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def pg_database(self, label: str) -> str:
        """A new database on --postgres's server for one stack's PostgreSQL targets; its DSN."""
        name = f"proxyd_bench_{label}_{os.getpid()}"
        pg_admin(self.args.postgres, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        pg_admin(self.args.postgres, f"CREATE DATABASE {name}")
        self.pg_databases.append(name)
        return urlsplit(self.args.postgres)._replace(path="/" + name).geturl()

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
                           preexec_fn=die_with_parent)
        if r.returncode != 0:
            raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(r.stdout.decode().strip().splitlines()[-1])

    def loadgen_start(self, url: str, mix: Path, *, concurrency: int, duration: float, key: str | None,
                      timeout: float = 60.0) -> subprocess.Popen:
        cmd = [PY, "-m", "load.loadgen", "--url", url, "--mix", str(mix), "--concurrency", str(concurrency),
               "--duration", str(duration), "--warmup", "0", "--timeout", str(timeout)]
        if key:
            cmd += ["--header", f"Authorization: Bearer {key}"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads here

    def wrk_run(self, url: str, body_file: Path, key: str | None, concurrency: int, duration: float) -> dict[str, Any]:
        script = self.tmp / "post.lua"
        if not script.exists():
            script.write_text(WRK_LUA)
        env = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_AUTH": f"Bearer {key}" if key else ""}
        secs = max(1, round(duration))
        cmd = [self.wrk, "-t1", f"-c{concurrency}", f"-d{secs}s", "--timeout", "30s", "-s", str(script),
               url + "/v1/chat/completions"]
        r = subprocess.run(cmd, capture_output=True, check=False, env=env, timeout=secs + 60, preexec_fn=die_with_parent)
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
        return ["proxy"] + list(self.variants) + list(self.candidates)

    @staticmethod
    def variant_config(doc: dict[str, Any], emu_url: str, upstreams: int) -> dict[str, Any]:
        """The proxy's config routing across ``upstreams`` healthy upstreams, all the one emulator."""
        return {**doc, "upstreams": [{"name": f"u{i}", "url": emu_url, "kind": "ollama"} for i in range(upstreams)]}

    def order(self, targets: list[str], rnd: int) -> list[str]:
        k = rnd % len(targets)
        return targets[k:] + targets[:k]

    # -- phases ---------------------------------------------------------------------------------
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
