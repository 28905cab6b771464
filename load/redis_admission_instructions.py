"""Instructions Redis executes per reserve and per settle of the admission script: a count, not a time.

    python -m load.redis_admission_instructions [-n 300] [--script OTHER.lua ...]

Timing the script on a 2-core machine that also runs the proxy, the load generator and the emulator
measures the neighbours as much as the script. Callgrind counts instructions instead (the same count
whatever else runs): a private redis-server (a free port, nothing kept on disk) runs under
``valgrind --tool=callgrind --toggle-collect=evalShaCommand``, so only script calls are counted, and
three runs of different lengths are differenced (50 warm-up pairs; + n pairs; + n more reserves). The
user has every limit set, as in load.redis_admission_rtt and load.bench. ``--script`` adds another
version of the script to compare, e.g. ``git show REV:proxyd/redis_admission.lua > /tmp/old.lua``.
Needs valgrind and redis-server; takes about a minute per script.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

import redis

from load.redis_admission_rtt import LIMITS
from proxyd.limitspec import parse_limits
from proxyd.redis_admission import RedisAdmission

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "proxyd", "redis_admission.lua")


def _packed_limits(script: str) -> bytes | str:
    """The bench user's limits as `script` takes them: packed since 2026-11-30, one text before."""
    user = parse_limits(LIMITS, "limits")
    model = parse_limits({"tokens_per_day": 10**12, "total_cost_usd": 10**7}, "limits")
    specs, packed = RedisAdmission._limit_args(types.SimpleNamespace(_packed={}), user, model)
    if "gmatch(ARGV[16]" in open(script, encoding="utf-8").read():
        return "".join(f"{flag} {int(metric)} {window} {value} " for flag, _, value, metric, window in specs)
    return packed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, pairs: int, extra_reserves: int, limits: bytes | str) -> int:
    """Instructions inside EVALSHA for 50 warm-up pairs + `pairs` + `extra_reserves` reserves."""
    d = tempfile.mkdtemp(prefix="proxyd-cg-")
    out, port = os.path.join(d, "callgrind.out"), _free_port()
    srv = subprocess.Popen(["valgrind", "--tool=callgrind", "--toggle-collect=evalShaCommand",
                            f"--callgrind-out-file={out}", "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", d],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port)
        for _ in range(600):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        sha = r.script_load(open(script, encoding="utf-8").read())
        prefix = "cg:"
        r.hset(prefix + "ready", mapping={"epoch": "e0", "at": 0, "layout": 2})

        def reserve(rid: str) -> None:
            x = r.evalsha(sha, 0, "reserve", prefix, rid, "inst", 15_000_000, "bench", "llama3.2:1b", 30, 32, 0, 16,
                          0, 20_000, 0, 50_000, limits)
            ok = x[0] == 1 if isinstance(x, list) else x.startswith(b"1 ")  # older scripts answered one string
            assert ok, x

        def settle(rid: str) -> None:
            assert r.evalsha(sha, 0, "settle", prefix, rid, "e0", 1, 62, 4_100_000, "bench", "llama3.2:1b", "",
                             "") == 1

        for i in range(50 + pairs):
            reserve(f"p{i}")
            settle(f"p{i}")
        for i in range(extra_reserves):
            reserve(f"x{i}")
        try:
            r.shutdown(nosave=True)
        except redis.ConnectionError:
            pass
        srv.wait(120)
        text = open(out, encoding="utf-8").read()
        return int(re.search(r"^(?:summary|totals):\s+(\d+)", text, re.M).group(1))
    finally:
        if srv.poll() is None:
            srv.kill()
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=300, help="pairs (and extra reserves) per difference")
    p.add_argument("--script", action="append", default=[], help="another version of the script (repeatable)")
    a = p.parse_args(argv)
    for tool in ("valgrind", "redis-server"):
        if not shutil.which(tool):
            print(f"{tool} not found", file=sys.stderr)
            return 2
    for script in [SCRIPT, *a.script]:
        limits = _packed_limits(script)
        base = _run(script, 0, 0, limits)
        pairs = _run(script, a.n, 0, limits)
        more = _run(script, a.n, a.n, limits)
        pair, reserve = (pairs - base) / a.n, (more - pairs) / a.n
        print(f"{os.path.relpath(script)}: {pair:,.0f} instructions per reserve + settle "
              f"(reserve {reserve:,.0f}, settle {pair - reserve:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
