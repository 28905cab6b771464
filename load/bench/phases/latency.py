"""latency: the small chat at a fixed rate (open loop) below saturation."""

from __future__ import annotations

from ..report import diff, maxn, run_summary
from ..runner import Bench
from ..workload import small_chat


def run(bench: Bench) -> None:
    """The same small chat at a fixed rate (open loop) that neither server is near saturating: the
    latency a request pays for passing through the proxy, not the queueing of a saturated server
    (which is what p99 at 50 closed-loop connections mostly measures)."""
    a = bench.args
    st = bench.stack("instant")
    small = bench.write_mix("lat-small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
    warm = min(1.0, a.duration / 5)
    targets = bench.proxies() + ["forwarder"]
    runs = []
    for rnd in range(a.rounds):
        for t in bench.order(targets, rnd):
            r = bench.measured(st, t, lambda t=t: bench.loadgen(
                st.url(t), small, concurrency=64, rate=a.latency_rate, duration=a.duration, warmup=warm,
                key=st.key(t), engine="aiohttp"))
            r.update(target=t, round=rnd)
            runs.append(r)
            bench.progress(f"latency r{rnd} {t:9s} {r['rps']:.0f} rps  p50 {r['latency_ms']['p50']} "
                           f"p99 {r['latency_ms']['p99']}  errors {r['errors']}")
    summary = {}
    for t in targets:
        rs = [r for r in runs if r["target"] == t]
        summary[t] = {
            **run_summary(rs),
            "max_ms": maxn(r["latency_ms"]["max"] for r in rs),
        }
    bench.results["latency"] = {
        "rate_rps": a.latency_rate, "duration_s": a.duration, "rounds": a.rounds, "runs": runs, "summary": summary,
        "p50_delta_ms": diff(summary["proxy"]["p50_ms"], summary["forwarder"]["p50_ms"]),
        "p99_delta_ms": diff(summary["proxy"]["p99_ms"], summary["forwarder"]["p99_ms"]),
    }
