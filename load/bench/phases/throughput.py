"""throughput: non-stream chat at fixed concurrency (closed loop), alternating the targets round by
round: rps, p50/p99, errors, CPU per request; the proxy/forwarder ratio; candidates and the N-process
ceiling against the proxy."""

from __future__ import annotations

import json
import statistics
from typing import Any

from ..processes import ROOT
from ..report import diff, run_summary
from ..runner import Bench
from ..workload import small_chat


def run(bench: Bench) -> None:
    a = bench.args
    st = bench.stack("instant")
    body = bench.tmp / "small-chat.json"
    body.write_text(json.dumps(small_chat()))
    mix = bench.write_mix("small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
    targets = bench.proxies() + ["forwarder", "emulator"] + list(st.workers) + list(st.shared)

    def one(target: str, duration: float, conc: int) -> dict[str, Any]:
        if bench.wrk:
            return bench.wrk_run(st.url(target), body, st.key(target), conc, duration)
        return bench.loadgen(st.url(target), mix, concurrency=conc, duration=duration, warmup=min(1.0, duration / 5),
                             key=st.key(target))

    for t in targets:  # warm-up, not recorded: pools, lazy imports, tokenizer caches
        one(t, 1.0, a.concurrency)
    runs = []
    for rnd in range(a.rounds):
        for t in bench.order(targets, rnd):
            r = bench.measured(st, t, lambda t=t: one(t, a.duration, a.concurrency))
            r.update(target=t, round=rnd)
            runs.append(r)
            bench.progress(f"throughput r{rnd} {t:9s} {r['rps']:8.1f} rps  p50 {r['latency_ms']['p50']:.2f} ms  "
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
    bench.results["throughput"] = {
        "concurrency": a.concurrency, "duration_s": a.duration, "rounds": a.rounds,
        "request": "POST /v1/chat/completions, non-stream, llama3.2:1b, 2 messages, max_tokens 32",
        "runs": runs, "summary": summary,
        "ratio_proxy_forwarder": round(summary["proxy"]["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
        "ratio_by_round": by_round,
        "p99_delta_ms": diff(summary["proxy"]["p99_ms"], fwd["p99_ms"]),
        "cpu_ratio_proxy_forwarder": round(summary["proxy"]["server_cpu_ms_per_req"] / fwd["server_cpu_ms_per_req"], 2)
        if fwd["server_cpu_ms_per_req"] else None,
    }
    for name in [*bench.variants, *bench.candidates]:
        c = summary[name]
        bench.results["throughput"].setdefault("candidates", {})[name] = {
            "root": str(bench.candidates.get(name, ROOT)),
            "ratio_forwarder": round(c["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
            "ratio_proxy": round(c["rps"] / summary["proxy"]["rps"], 3) if summary["proxy"]["rps"] else None,
            "ratio_proxy_by_round": [
                round(next(r["rps"] for r in runs if r["round"] == k and r["target"] == name)
                      / next(r["rps"] for r in runs if r["round"] == k and r["target"] == "proxy"), 3)
                for k in range(a.rounds)],
            "cpu_ratio_proxy": round(c["server_cpu_ms_per_req"] / summary["proxy"]["server_cpu_ms_per_req"], 3)
            if summary["proxy"]["server_cpu_ms_per_req"] else None,
            # The latency it adds to the proxy's (proxy+redis: the admission's round trips, reserve and settle).
            "p50_delta_ms_vs_proxy": diff(c["p50_ms"], summary["proxy"]["p50_ms"]),
            "p99_delta_ms_vs_proxy": diff(c["p99_ms"], summary["proxy"]["p99_ms"]),
        }

    if st.shared:  # --postgres: the shared-ledger proxy (and its N workers) against the embedded default
        one = summary["proxy"]
        bench.results["throughput"]["postgres"] = {
            name: {"rps_vs_proxy": round(summary[name]["rps"] / one["rps"], 3) if one["rps"] else None,
                   "p50_delta_ms": diff(summary[name]["p50_ms"], one["p50_ms"]),
                   "cpu_ratio_proxy": round(summary[name]["server_cpu_ms_per_req"] / one["server_cpu_ms_per_req"], 3)
                   if one["server_cpu_ms_per_req"] else None}
            for name in st.shared}
    if st.workers:
        n = a.workers_ceiling
        px, fx = summary[f"proxy-x{n}-unshared"], summary[f"forwarder-x{n}"]
        bench.results["throughput"]["workers_ceiling"] = {
            "workers": n,
            "note": "N uncoordinated proxy processes (limits not shared: a ceiling, not a product mode) and N forwarders",
            "proxy_rps_vs_one": round(px["rps"] / summary["proxy"]["rps"], 3) if summary["proxy"]["rps"] else None,
            "forwarder_rps_vs_one": round(fx["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
            "ratio_proxy_forwarder": round(px["rps"] / fx["rps"], 3) if fx["rps"] else None,
            "ratio_proxy_vs_one_forwarder": round(px["rps"] / fwd["rps"], 3) if fwd["rps"] else None,
        }
