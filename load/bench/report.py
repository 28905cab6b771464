"""The figures: summaries the phases compute over their rounds, py-spy's collapsed stacks summarised, and
the report printed at the end (tables, and the targets met or missed)."""

from __future__ import annotations

import json
import statistics
from typing import Any

# Project targets on a 2-core machine (reported, not enforced).
TARGETS = {"ratio_min": 0.8, "p99_delta_max_ms": 5.0, "ttfb_overhead_max_ms": 2.0, "isolation_rise_max_ms": 10.0}


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
        for name, g in (t.get("postgres") or {}).items():
            out.append(f"{name}: rps vs the embedded default x{fmt(g['rps_vs_proxy'], 3)} (target >= 0.8 for one "
                       f"instance), p50 {fmt(g['p50_delta_ms'])} ms more, proxy CPU per request "
                       f"x{fmt(g['cpu_ratio_proxy'], 3)} (PostgreSQL's own CPU counts as foreign cores)")
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
