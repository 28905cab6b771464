"""The command line: every flag, and the run (stacks up, phases in order, ledger checks, report, JSON)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .phases import PHASES, PROFILE
from .processes import ROOT
from .report import report
from .runner import Bench


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
    p.add_argument("--redis", metavar="URL",
                   help="also benchmark this tree with admission.backend redis on URL (target 'proxy+redis', "
                        "under its own key prefix): the shared admission against the in-memory default, in one run")
    p.add_argument("--ledger-rows", metavar="N", type=int, default=0,
                   help="start each proxy (and candidate) on a ledger that already holds N settled rows of "
                        "another user, written with that tree's own request ids (a ledger after months of use)")
    p.add_argument("--workers-ceiling", metavar="N", type=int, default=0,
                   help="throughput: also N proxy processes sharing the port without coordination (load.ceiling: "
                        "limits not shared, so the most N workers could give) and N forwarders")
    p.add_argument("--postgres", metavar="DSN",
                   help="throughput: also the proxy on a PostgreSQL ledger (database.backend postgres; a database "
                        "of its own, created on DSN's server and dropped after), target 'proxy-pg', against the "
                        "embedded default ('proxy')")
    p.add_argument("--pg-workers", metavar="N", type=int, default=0,
                   help="with --postgres: also 'app.py --workers N' on that database, target 'proxy-pg-xN' "
                        "(needs --admission-url: N > 1 workers refuse the in-memory admission)")
    p.add_argument("--admission-url", metavar="URL",
                   help="with --postgres: the PostgreSQL targets use admission.backend redis at URL")
    p.add_argument("--profile", metavar="PATH",
                   help="after the throughput phase, one more proxy run under py-spy: collapsed stacks to PATH, "
                        "top functions into the results")
    p.add_argument("--profile-mode", choices=("all", "gil"), default="all",
                   help="py-spy: samples of every thread not seen idle (default; counts C code that releases the "
                        "GIL, such as tiktoken and sqlite), or only of the thread holding the GIL")
    p.add_argument("--upstreams", metavar="N", type=int, default=1,
                   help="also this tree's proxy routing across N healthy upstreams (one emulator behind them all), "
                        "target 'proxy-<N>up': throughput and calls compare it with the one-upstream proxy (the "
                        "router's cost per request; issue #15)")
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
    if not 1 <= a.upstreams <= 16:
        p.error("--upstreams in [1, 16]")
    if not 1 <= a.rounds <= 50 or not 1 <= a.concurrency <= 2000:
        p.error("--rounds in [1, 50], --concurrency in [1, 2000]")
    if (a.pg_workers or a.admission_url) and not a.postgres:
        p.error("--pg-workers and --admission-url go with --postgres")
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
                PHASES[phase](bench)
            if phase == "throughput" and args.profile:
                bench.progress("-- profile (py-spy)")
                PROFILE(bench)
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
