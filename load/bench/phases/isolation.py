"""isolation: small-request latency through the proxy while ~100k-token prompts are in flight, against
the same without them (and the same on the forwarder)."""

from __future__ import annotations

import json
import subprocess
import time

from ..report import diff, maxn, med
from ..runner import Bench
from ..workload import big_prompt_chat, small_chat


def run(bench: Bench) -> None:
    a = bench.args
    st = bench.stack("instant")
    small = bench.write_mix("iso-small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
    big_body = big_prompt_chat(a.big_tokens)
    big_file = bench.tmp / "big-chat.json"
    big_file.write_text(json.dumps(big_body))
    big = bench.write_mix("iso-big", [{"name": "big", "path": "/v1/chat/completions", "body_file": str(big_file)}])
    warm = min(1.0, a.duration / 5)
    runs = []
    targets = bench.proxies() + ["forwarder"]
    for rnd in range(a.rounds):
        for t in bench.order(targets, rnd):
            for loaded in ((False, True) if rnd % 2 == 0 else (True, False)):
                bg = None
                if loaded:
                    bg = bench.loadgen_start(st.url(t), big, concurrency=a.big_concurrency,
                                             duration=a.duration + warm + 1.5, key=st.key(t))
                    time.sleep(1.0)  # the big requests are in flight before the measured window opens
                try:
                    r = bench.measured(st, t, lambda t=t: bench.loadgen(
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
                bench.progress(f"isolation r{rnd} {t:9s} big={'yes' if loaded else 'no ':3s} small p50 "
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
    bench.results["isolation"] = {
        "small_rate_rps": a.iso_rate, "big_concurrency": a.big_concurrency, "big_prompt_tokens": a.big_tokens,
        "big_body_bytes": len(json.dumps(big_body)), "duration_s": a.duration, "rounds": a.rounds,
        "runs": runs, "summary": summary,
    }
