"""stream: streamed chat at concurrency 1 and N: time to first byte, total time, the proxy's overhead
over the forwarder per stream and per relayed chunk."""

from __future__ import annotations

import statistics
from typing import Any

from ..report import med
from ..runner import Bench
from ..workload import stream_chat


def run(bench: Bench) -> None:
    a = bench.args
    st = bench.stack("stream")
    mix = bench.write_mix("stream", [{"name": "stream", "path": "/v1/chat/completions", "stream": True,
                                      "body": stream_chat(a.stream_tokens)}])
    targets = bench.proxies() + ["forwarder", "emulator"]
    levels = a.stream_concurrency
    for t in targets:
        bench.loadgen(st.url(t), mix, concurrency=4, duration=0.5, warmup=0.2, key=st.key(t))
    runs = []
    for rnd in range(a.rounds):
        for conc in levels:
            for t in bench.order(targets, rnd):
                r = bench.measured(st, t, lambda t=t, conc=conc: bench.loadgen(
                    st.url(t), mix, concurrency=conc, duration=a.duration, warmup=min(1.0, a.duration / 5),
                    key=st.key(t)))
                r.update(target=t, round=rnd, level=conc)
                runs.append(r)
                tt = r.get("ttfb_ms") or {}
                bench.progress(f"stream r{rnd} c={conc:<3d} {t:9s} ttfb p50 {tt.get('p50')} p99 {tt.get('p99')}  "
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
    bench.results["stream"] = {
        "token_delay_ms": a.token_delay_ms, "tokens": a.stream_tokens, "levels": levels,
        "duration_s": a.duration, "rounds": a.rounds, "runs": runs, "summary": summary,
        "overhead_proxy_minus_forwarder": overhead,
    }
