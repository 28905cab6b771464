"""calls: Python function calls per request (cProfile), proxy (and candidates) vs forwarder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..processes import ADMIN_TOKEN, PY, ROOT, Proc, free_port, http, wait_ready
from ..runner import Bench
from ..workload import GENEROUS, small_chat


def run(bench: Bench) -> None:
    """Python function calls per request, proxy (and candidates) vs forwarder: each started anew under
    cProfile twice, once left idle and once under the throughput load; the idle run's calls (start-up,
    shutdown) are subtracted. Unlike rps or CPU time this count barely moves between runs on a noisy
    machine, and it says where a proxy's extra work is: by package and by function."""
    import pstats

    a = bench.args
    st = bench.stack("instant")
    body = bench.tmp / "small-chat.json"
    body.write_text(json.dumps(small_chat()))
    mix = bench.write_mix("small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
    base_cfg = json.loads((bench.tmp / "proxy-instant.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
    env["PROXYD_ADMIN_TOKEN"] = ADMIN_TOKEN
    seconds = max(1.0, min(a.duration, 5.0))
    roots = {"proxy": ROOT, **{name: ROOT for name in bench.variants}, **bench.candidates, "forwarder": None}

    def profiled(name: str, root: Path | None, loaded: bool) -> tuple[dict, int]:
        port, out = free_port(), bench.tmp / f"calls-{name.replace(':', '_')}-{int(loaded)}.prof"
        if root is None:
            cmd = ["-m", "load.forwarder", "--port", str(port), "--upstream", st.emu_url, "--log-level", "WARNING"]
            ready = "/"
        else:
            doc = {**base_cfg, "server": {**base_cfg["server"], "port": port},
                   "database": {"path": str(out.with_suffix(".db"))}, **bench.candidate_config.get(name, {})}
            if name in bench.variants:
                doc = bench.variant_config(doc, st.emu_url, bench.variants[name])
            if "admission" in doc:
                doc["admission"] = {**doc["admission"], "key_prefix": f"{doc['admission']['key_prefix']}calls{int(loaded)}:"}
            cfg = out.with_suffix(".yaml")
            cfg.write_text(json.dumps(doc))
            cmd, ready = [str(root / "app.py"), "--config", str(cfg)], "/healthz"
        proc = Proc(out.stem, [PY, "-m", "cProfile", "-o", str(out), *cmd], bench.tmp, env, cwd=root or ROOT)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}{ready}")
            requests, key = 0, None
            if root is not None:
                status, doc = http("POST", f"http://127.0.0.1:{port}/admin/users",
                                   {"user_id": "bench", "limits": GENEROUS}, token=ADMIN_TOKEN)
                key = doc["api_key"]
            if loaded:
                url = f"http://127.0.0.1:{port}"
                r = (bench.wrk_run(url, body, key, a.concurrency, seconds) if bench.wrk else
                     bench.loadgen(url, mix, concurrency=a.concurrency, duration=seconds, warmup=0, key=key))
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
        bench.progress(f"calls {name:9s} {results[name]['calls_per_req']:8.1f} Python calls/request ({n} requests)")
    fwd = results["forwarder"]["calls_per_req"]
    bench.results["calls"] = {"seconds": seconds, "concurrency": a.concurrency, "targets": results,
                              "proxy_minus_forwarder": round(results["proxy"]["calls_per_req"] - fwd, 1)}
