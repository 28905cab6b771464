"""profile (--profile PATH): one more throughput run on the proxy with py-spy attached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from ..processes import PY, die_with_parent
from ..report import summarize_collapsed
from ..runner import WRK_LUA, Bench
from ..workload import small_chat


def run(bench: Bench) -> None:
    """One more throughput run on the proxy with py-spy attached (not part of the figures above:
    sampling slows the target a little)."""
    a = bench.args
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.path.exists(spy):
        bench.results["profile"] = {"error": "py-spy not installed (pip install py-spy)"}
        bench.progress("profile: py-spy not installed (pip install py-spy); skipped")
        return
    st = bench.stack("instant")
    body = bench.tmp / "small-chat.json"
    body.write_text(json.dumps(small_chat()))
    mix = bench.write_mix("small", [{"name": "chat", "path": "/v1/chat/completions", "body": small_chat()}])
    seconds = max(3, int(a.duration))
    record = [spy, "record", "--pid", str(st.proxy.pid), "--duration", str(seconds), "--rate", "200",
              "--format", "raw", "--threads", "--output", a.profile]
    if a.profile_mode == "gil":
        record.append("--gil")
    if bench.wrk:
        script = bench.tmp / "post.lua"
        script.write_text(WRK_LUA)
        env = {**os.environ, "BENCH_BODY_FILE": str(body), "BENCH_AUTH": f"Bearer {st.key('proxy')}"}
        gen = subprocess.Popen([bench.wrk, "-t1", f"-c{a.concurrency}", f"-d{seconds + 3}s", "--timeout", "30s",
                                "-s", str(script), st.url("proxy") + "/v1/chat/completions"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads here
    else:
        gen = bench.loadgen_start(st.url("proxy"), mix, concurrency=a.concurrency, duration=seconds + 3,
                                  key=st.key("proxy"))
    try:
        time.sleep(1.5)
        r = subprocess.run(record, capture_output=True, check=False, timeout=seconds + 60)
    finally:
        try:
            gen.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            gen.kill()
            gen.communicate()
    if r.returncode != 0 or not os.path.exists(a.profile):
        bench.results["profile"] = {"error": (r.stderr or r.stdout).decode(errors="replace")[-1000:]}
        bench.progress(f"profile failed: {bench.results['profile']['error']}")
        return
    bench.results["profile"] = {"mode": a.profile_mode, "path": a.profile, **summarize_collapsed(a.profile)}
    bench.progress(f"profile: {bench.results['profile']['samples']} samples -> {a.profile}")
