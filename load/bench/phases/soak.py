"""soak (--soak S): a steady mix with injected upstream faults for S seconds: RSS, open files, WAL size,
errors by kind, then the ledger check."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from ..processes import ADMIN_TOKEN, PY, ROOT, die_with_parent, http
from ..runner import Bench
from ..workload import GENEROUS, embeddings, small_chat, stream_chat, vision_chat


def run(bench: Bench) -> None:
    a = bench.args
    st = bench.stack("stream")  # streams take their time (token delay): a realistic in-flight mix
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
    mix = bench.write_mix("soak", kinds)
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
    out_path, err_path = bench.tmp / "soak-loadgen.out", bench.tmp / "soak-loadgen.err"
    with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:  # files: a long run never fills a pipe
        gen = subprocess.Popen(cmd, cwd=ROOT, stdout=out_f, stderr=err_f, preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads here
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
    idle = bench.wait_idle(st)
    samples.append(sample("end"))
    status, check = http("GET", st.url("proxy") + "/admin/ledger/check", token=ADMIN_TOKEN, timeout=60)
    unexpected = {k: v for k, v in res.get("errors_by_kind", {}).items()}
    bench.results["soak"] = {
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
    bench.progress(f"soak {a.soak}s: {res['requests']} requests, {res['ok']} ok, {res['expected_non_200']} expected "
                   f"non-200, {res['errors']} unexpected errors; RSS {samples[0]['rss_kb']} -> {samples[-1]['rss_kb']} kB; "
                   f"ledger ok={check.get('ok') if isinstance(check, dict) else check}")
