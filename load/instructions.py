"""CPU instructions per request of the proxy process, counted by valgrind's callgrind: one upstream
against N healthy ones (issue #15: routing adds no more than ~3% CPU per request).

    python -m load.instructions                          # legacy upstream.url, upstreams: [one], [three]
    python -m load.instructions --upstreams 3 --requests 400 --concurrency 8 --repeat 2
    python -m load.instructions --keep /tmp/cg            # keep the callgrind files for callgrind_annotate

CPU time per request on this 2-core shared machine moves by several percent from one run to the next;
an instruction count does not depend on what else the machine does. Each variant's proxyd runs under
``valgrind --tool=callgrind --instr-atstart=no`` (start-up at valgrind's un-instrumented speed), with
the bench's own config (load.bench.processes.proxy_config, the routing variants of
load.bench.runner.Bench.variant_config) in front of one Ollama emulator (not under valgrind; all N
upstreams are that one process). Then, with ``callgrind_control``: instrumentation on, ``--warmup``
requests (connection pools filled, caches warm), counters zeroed, ``--requests`` non-stream chats at
``--concurrency`` connections (load.loadgen's raw client, a fixed number per connection), a dump: the
instructions of exactly those requests, in every thread of the process, divided by their number.

What this counts and what it does not:
- user-space instructions of the proxy process only: the kernel's work for its syscalls (more sockets
  with more pools, epoll) is not counted, nor are cache misses or stalls: an instruction is not a cycle.
- the health probes are kept out of the measured window (``upstream.probe_interval_s`` raised): under
  valgrind a request takes ~50 times longer, so a probe every 2 s would fall on ~50 times fewer
  requests than at full speed. ``--idle S`` measures them apart: a second start of each variant with the
  default interval, left idle S seconds; its instructions per second divided by a full-speed request
  rate (``--rps``, the bench's) is what the probes add per request.
- an event loop that wakes more or less often as the timing changes (group commits of the ledger, reads
  coalesced on a socket) moves the count a little: ``--repeat`` shows by how much.
"""

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
from pathlib import Path
from typing import Any

from .bench.processes import ADMIN_TOKEN, PY, ROOT, Proc, free_port, http, proxy_config, wait_ready
from .bench.runner import Bench, ledger_counters
from .bench.workload import GENEROUS, small_chat

SUMMARY = re.compile(rb"^summary:\s+(\d+)", re.MULTILINE)
FUNCTION = re.compile(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+(.+?)(?:\s+\[[^\]]*\])?$")


def variants(n: int) -> dict[str, int]:
    """name -> upstreams: 0 is the old single ``upstream.url`` (the bench's 'proxy', the router's fast
    path), 1 the same upstream as an ``upstreams`` list of one (the routing path with one candidate)."""
    out = {"proxy": 0, "proxy-1up": 1}
    if n > 1:
        out[f"proxy-{n}up"] = n
    return out


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="proxyd-instr-"))
        self.out_dir = Path(args.keep) if args.keep else self.tmp
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tree = Path(args.tree).resolve() if args.tree else ROOT
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
        # A fixed hash seed: set and dict orders (and so the work done on them) the same in every run.
        self.env.update(PROXYD_ADMIN_TOKEN=ADMIN_TOKEN, PYTHONUNBUFFERED="1", PYTHONHASHSEED="0")
        self.emu_port = free_port()
        self.emulator = Proc("emulator", [PY, "-m", "ollama_emulator", "--port", str(self.emu_port), "--token-delay", "0",
                                          "--log-level", "WARNING"], self.tmp, self.env)
        self.mix = self.tmp / "mix.json"
        self.mix.write_text(json.dumps([{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}]))

    @property
    def emu_url(self) -> str:
        return f"http://127.0.0.1:{self.emu_port}"

    def progress(self, line: str) -> None:
        print("  " + line, file=sys.stderr, flush=True)

    def config(self, name: str, upstreams: int, port: int, probes: bool) -> Path:
        doc = proxy_config(port, self.emu_url, self.tmp / f"{name}-{port}.db")
        if upstreams:
            doc = Bench.variant_config(doc, self.emu_url, upstreams)
        if not probes:
            doc["upstream"] = {**doc["upstream"], "probe_interval_s": 1e6}
        path = self.tmp / f"{name}-{port}.yaml"
        path.write_text(json.dumps(doc, indent=1))
        return path

    def start(self, name: str, upstreams: int, probes: bool) -> tuple[Proc, int, str]:
        port = free_port()
        cfg = self.config(name, upstreams, port, probes)
        out = self.out_dir / f"callgrind.{name}.{'idle' if probes else 'requests'}.%p"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               PY, str(self.tree / "app.py"), "--config", str(cfg)]
        proc = Proc(f"{name}-{port}", cmd, self.tmp, self.env, cwd=self.tree)
        wait_ready(proc, f"http://127.0.0.1:{port}/healthz", timeout=600)
        return proc, port, str(out).replace("%p", str(proc.pid))

    def control(self, proc: Proc, *what: str) -> None:
        r = subprocess.run(["callgrind_control", *what, str(proc.pid)], capture_output=True, timeout=120, check=False)
        if r.returncode != 0 or b"OK" not in r.stdout:
            raise RuntimeError(f"callgrind_control {' '.join(what)}: {r.stdout.decode()} {r.stderr.decode()}")

    def dumped(self, base: str, tag: str) -> Path:
        """The file of the last dump (callgrind_control waits for the command, not for the file)."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            files = sorted(Path(base).parent.glob(Path(base).name + ".*"), key=lambda p: int(p.suffix[1:]))
            for f in reversed(files):
                text = f.read_bytes()
                if f"Trigger: dump {tag}".encode() in text and SUMMARY.search(text):
                    return f
            time.sleep(0.2)
        raise RuntimeError(f"no callgrind dump '{tag}' for {base}")

    def load(self, port: int, key: str, total: int) -> dict[str, Any]:
        c = self.args.concurrency
        cmd = [PY, "-m", "load.loadgen", "--url", f"http://127.0.0.1:{port}", "--mix", str(self.mix), "--concurrency",
               str(c), "--max-requests", str(total // c), "--duration", "3600", "--warmup", "0", "--timeout", "300",
               "--header", f"Authorization: Bearer {key}"]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"loadgen failed: {r.stderr.decode(errors='replace')[-2000:]}")
        res = json.loads(r.stdout.decode().strip().splitlines()[-1])
        if res["errors"] or res["ok"] != (total // c) * c:
            raise RuntimeError(f"loadgen: {res['ok']} ok of {total // c * c}, errors {res['errors_by_kind']} "
                               f"{res['status']}")
        return res

    def requests(self, name: str, upstreams: int) -> dict[str, Any]:
        a = self.args
        t0 = time.monotonic()
        proc, port, base = self.start(name, upstreams, probes=False)
        try:
            status, doc = http("POST", f"http://127.0.0.1:{port}/admin/users", {"user_id": "bench", "limits": GENEROUS},
                               token=ADMIN_TOKEN, timeout=120)
            if status != 201:
                raise RuntimeError(f"creating the user: HTTP {status} {doc}")
            key = doc["api_key"]
            started = time.monotonic() - t0
            for _ in range(a.prime):  # the old upstream.url passes GET /v1/models through: one upstream GET each
                http("GET", f"http://127.0.0.1:{port}/v1/models", token=key, timeout=120)
            self.control(proc, "--instr=on")
            self.load(port, key, a.warmup)
            l0 = ledger_counters(f"http://127.0.0.1:{port}")  # read outside the counted window
            self.control(proc, "--zero")
            w0 = time.monotonic()
            res = self.load(port, key, a.requests)
            wall = time.monotonic() - w0
            self.control(proc, "--dump=measured")
            f = self.dumped(base, "measured")
            l1 = ledger_counters(f"http://127.0.0.1:{port}")
        finally:
            proc.stop(grace=120)
        ir = int(SUMMARY.search(f.read_bytes()).group(1))
        # The ledger's group commits follow the timing (more rows per commit when the writer thread gets
        # the CPU later): the part of the count that moves most between runs, so shown with each.
        per_commit = round((l1[1] - l0[1]) / (l1[0] - l0[0]), 2) if l0 and l1 and l1[0] > l0[0] else None
        return {"requests": res["ok"], "instructions": ir, "per_request": ir / res["ok"], "file": str(f),
                "wall_s": round(wall, 1), "startup_s": round(started, 1), "writes_per_commit": per_commit}

    def idle(self, name: str, upstreams: int) -> dict[str, Any]:
        proc, _, base = self.start(name, upstreams, probes=True)
        try:
            self.control(proc, "--instr=on")
            time.sleep(2.0)  # the first probe round instrumented (code translated) before counting
            self.control(proc, "--zero")
            w0 = time.monotonic()
            time.sleep(self.args.idle)
            self.control(proc, "--dump=idle")
            wall = time.monotonic() - w0
            f = self.dumped(base, "idle")
        finally:
            proc.stop(grace=120)
        ir = int(SUMMARY.search(f.read_bytes()).group(1))
        return {"seconds": round(wall, 2), "instructions": ir, "per_second": ir / wall, "file": str(f)}

    def close(self) -> None:
        self.emulator.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# The router alone, in one process: pick, acquire and release for ``n`` requests, 8 of them in flight
# (as at 8 connections), upstream.url's fast path (0) or an upstreams list of that many.
ROUTER_LOOP = r"""
import sys
from proxyd.backends.ollama import OllamaBackend
from proxyd.backends.router import Router
from proxyd.upstream import Upstream
upstreams, n = int(sys.argv[1]), int(sys.argv[2])
model = "llama3.2:1b"
count = max(1, upstreams)
backends = [OllamaBackend(Upstream("http://127.0.0.1:9"), None, f"u{i}") for i in range(count)]
specs = [{"name": f"u{i}", "kind": "ollama", "url": "http://127.0.0.1:9"} for i in range(count)]
router = Router(backends, specs, legacy=upstreams == 0)
for b in backends:  # as after the first model list and /api/ps: the model served and loaded everywhere
    b.state.models, b.state.loaded = {model}, {model}
held = []
for _ in range(n):
    router.pick(model, "chat")
    held.append(router.acquire(model, None, "chat"))
    if len(held) == 8:
        router.release(held.pop(0), False, 0.01)
"""


def router_instructions(upstreams: int, tree: Path, out_dir: Path, env: dict[str, str], n: int = 20_000) -> float:
    """Instructions of Router.pick + acquire + release per request (and of the loop around them): two
    runs of the loop, n requests apart, under callgrind; their difference cancels start-up."""
    counts = []
    for loops in (1_000, 1_000 + n):
        out = out_dir / f"callgrind.router-{upstreams}.{loops}"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", PY, "-c", ROUTER_LOOP,
                        str(upstreams), str(loops)], cwd=tree, env=env, capture_output=True, check=True, timeout=600)
        counts.append(int(SUMMARY.search(out.read_bytes()).group(1)))
    return (counts[1] - counts[0]) / n


def functions(path: str) -> dict[str, int]:
    """Self instructions by C function (callgrind_annotate's table), for the difference between variants."""
    r = subprocess.run(["callgrind_annotate", "--threshold=100", path], capture_output=True, text=True, check=True)
    out: dict[str, int] = {}
    for line in r.stdout.splitlines():
        m = FUNCTION.match(line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            name = re.sub(r"^/tmp/python-build[^/]*/Python-[^/]*/", "", m.group(2))
            out[name] = out.get(name, 0) + int(m.group(1).replace(",", ""))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load.instructions", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstreams", type=int, default=3, help="N healthy upstreams against one (default 3)")
    p.add_argument("--requests", type=int, default=400, help="measured non-stream chats per variant (default 400)")
    p.add_argument("--warmup", type=int, default=100, help="chats before the counters are zeroed (default 100)")
    p.add_argument("--concurrency", type=int, default=8, help="connections (default 8)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each variant, alternating (default 1)")
    p.add_argument("--idle", type=float, default=0.0, metavar="S",
                   help="also each variant idle S seconds with the default probe interval (probes per second)")
    p.add_argument("--rps", type=float, default=1500.0,
                   help="with --idle: the full-speed request rate the probe cost is spread over (default 1500, "
                        "the bench's proxy at 50 connections on this machine)")
    p.add_argument("--prime", type=int, default=0, metavar="K",
                   help="K GET /v1/models before the warm-up (with upstream.url, K upstream GETs before the first "
                        "POST, as its probes would be; the routing variants answer them from their lists)")
    p.add_argument("--top", type=int, default=12,
                   help="C functions whose instructions per request differ most, N upstreams vs one (0: none)")
    p.add_argument("--router", action="store_true",
                   help="also the router alone (pick, acquire, release in a loop, no server) per variant")
    p.add_argument("--tree", metavar="DIR", help="the proxyd tree to measure (default this one)")
    p.add_argument("--keep", metavar="DIR", help="keep the callgrind files here (callgrind_annotate FILE)")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    a = p.parse_args(argv)
    if not 2 <= a.upstreams <= 16 or a.concurrency < 1 or a.requests < a.concurrency or a.repeat < 1:
        p.error("--upstreams in [2, 16], --requests >= --concurrency >= 1, --repeat >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install -y valgrind")
    run = Run(a)
    names = variants(a.upstreams)
    results: dict[str, Any] = {"args": vars(a), "tree": str(run.tree), "variants": {n: [] for n in names}, "idle": {}}
    try:
        wait_ready(run.emulator, run.emu_url + "/")
        for rnd in range(a.repeat):
            order = list(names)
            order = order[rnd % len(order):] + order[:rnd % len(order)]
            for name in order:
                r = run.requests(name, names[name])
                results["variants"][name].append(r)
                run.progress(f"{name:10s} {r['per_request']:12,.0f} instructions/request ({r['requests']} requests, "
                             f"{r['writes_per_commit']} ledger writes/commit, {r['wall_s']} s measured, "
                             f"start-up {r['startup_s']} s)")
        if a.idle:
            for name, n in names.items():
                r = results["idle"][name] = run.idle(name, n)
                run.progress(f"{name:10s} idle {r['per_second']:12,.0f} instructions/s")
        if a.router:
            results["router"] = {}
            for name, n in names.items():
                r = results["router"][name] = router_instructions(n, run.tree, run.out_dir, run.env)
                run.progress(f"{name:10s} router alone {r:10,.0f} instructions/request")
    finally:
        run.close()
    print(report(results, a))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def report(results: dict[str, Any], a: argparse.Namespace) -> str:
    v = results["variants"]
    base = min(x["per_request"] for x in v["proxy"])
    lines = [f"instructions per request of the proxy process (callgrind; {a.requests} non-stream chats at "
             f"{a.concurrency} connections after {a.warmup} warm-up, each run"
             + (f"; {a.prime} GET /v1/models first" if a.prime else "") + ")", "",
             "| variant | instructions / request (each run) | vs proxy (one upstream.url) | ledger writes / commit |",
             "|---|---|---|---|"]
    mean = {}
    mean_base = sum(x["per_request"] for x in v["proxy"]) / len(v["proxy"])
    for name, runs in v.items():
        per = [x["per_request"] for x in runs]
        mean[name] = sum(per) / len(per)
        wpc = " / ".join(str(x.get("writes_per_commit")) for x in runs)
        lines.append(f"| {name} | {' / '.join(f'{x:,.0f}' for x in per)} | x{mean[name] / mean_base:.4f} | {wpc} |")
    if results["idle"]:
        lines += ["", f"idle, default probe interval (probes, timers), spread over {a.rps:g} requests/s:", "",
                  "| variant | instructions / s idle | per request at that rate | that, vs proxy's per request |",
                  "|---|---|---|---|"]
        for name, r in results["idle"].items():
            per = r["per_second"] / a.rps
            lines.append(f"| {name} | {r['per_second']:,.0f} | {per:,.0f} | {100 * per / base:.3f}% |")
    if results.get("router"):
        base_router = results["router"]["proxy"]
        lines += ["", "the router alone: pick + acquire + release (and the loop around them), 8 in flight:", "",
                  "| variant | instructions / request | minus proxy's | that, vs proxy's per request |", "|---|---|---|---|"]
        for name, r in results["router"].items():
            lines.append(f"| {name} | {r:,.0f} | {r - base_router:+,.0f} | {100 * (r - base_router) / base:+.3f}% |")
    big = f"proxy-{a.upstreams}up"
    if a.top and big in v:
        one, many = v["proxy"][0], v[big][0]
        f1, fn = functions(one["file"]), functions(many["file"])
        diff = {k: fn.get(k, 0) / many["requests"] - f1.get(k, 0) / one["requests"] for k in set(f1) | set(fn)}
        lines += ["", f"C functions, self instructions per request: {big} minus proxy (first runs), largest first:", ""]
        for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:a.top]:
            lines.append(f"  {d:+10,.0f}  {k}")
        lines.append(f"  {sum(diff.values()):+10,.0f}  in all")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
