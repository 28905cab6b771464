"""Round trip of the Redis admission alone: N reserve + settle pairs from one process, one at a time.

    python -m load.redis_admission_rtt --url redis://127.0.0.1:6379/0 -n 2000 [--profile]

Every limit is configured (both scopes), as in load.bench's workload, so the script does all of its work.
Prints the mean and percentiles of one reserve and one settle (each one script call, one round trip), and
with --profile the Python calls per pair (what the event loop pays for the admission).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
import uuid

from proxyd.limitspec import parse_limits
from proxyd.redis_admission import RedisAdmission
from proxyd.storage import PeriodUsage

LIMITS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "requests_per_day": 10**9,
          "tokens_per_day": 10**12, "tokens_per_month": 10**12, "cost_per_day_usd": 10**6,
          "cost_per_month_usd": 10**6, "total_tokens": 10**13, "total_cost_usd": 10**7,
          "max_concurrent_requests": 10**6}


class _NoLedger:
    def period_usage(self, day, month):
        return PeriodUsage([], [], [])

    def recent_requests(self, since):
        return []


async def run(url: str, n: int, profile: bool) -> None:
    prefix = f"proxyd-rtt:{uuid.uuid4().hex[:8]}:"
    adm = RedisAdmission(url, ledger=_NoLedger(), connections_per_key=1, key_prefix=prefix, settle_grace_s=0)
    await adm.redis.hset(prefix + "ready", mapping={"epoch": "e0", "at": 0, "layout": 2})
    user = parse_limits(LIMITS, "limits")
    model = parse_limits({"tokens_per_day": 10**12, "total_cost_usd": 10**7}, "limits")
    kw = dict(user_id="bench", model="llama3.2:1b", user_limits=user, model_limits=model, prompt_tokens=30,
              completion_tokens=32, completion_is_default=False, min_completion_tokens=16, price=(20_000, 50_000))
    for _ in range(50):  # warm: connection, script cached
        await adm.settle(await adm.reserve(**kw), 30, 32, 4)
    res, sets = [], []
    before = await _server_cpu(adm.redis)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    for _ in range(n):
        t0 = time.perf_counter()
        hold = await adm.reserve(**kw)
        t1 = time.perf_counter()
        await adm.settle(hold, 30, 32, 4)
        t2 = time.perf_counter()
        res.append(t1 - t0)
        sets.append(t2 - t1)
    after = await _server_cpu(adm.redis)
    if prof:
        prof.disable()
        calls = sum(v[1] for v in pstats.Stats(prof).stats.values())
        print(f"python calls per reserve+settle pair: {calls / n:.0f}")
    for name, xs in (("reserve", res), ("settle", sets)):
        xs.sort()
        print(f"{name:8s} mean {statistics.mean(xs) * 1e3:.3f} ms  p50 {xs[len(xs) // 2] * 1e3:.3f}  "
              f"p99 {xs[int(len(xs) * 0.99)] * 1e3:.3f}")
    # Redis's own CPU is what several instances share on one Redis (and what competes with the proxy on one
    # machine): the process's user + system time, and the time its scripts ran (commandstats, inner calls included).
    print(f"redis CPU per pair: {(after[0] - before[0]) / n * 1e6:.0f} us (process), "
          f"{(after[1] - before[1]) / n:.0f} us in EVALSHA (commandstats)")
    keys = [k async for k in adm.redis.scan_iter(prefix + "*")]
    if keys:
        await adm.redis.delete(*keys)
    await adm.close()


async def _server_cpu(redis) -> tuple[float, float]:
    cpu, stats = await redis.info("cpu"), await redis.info("commandstats")
    return (cpu["used_cpu_user"] + cpu["used_cpu_sys"],
            stats.get("cmdstat_evalsha", {}).get("usec", 0))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    asyncio.run(run(a.url, a.n, a.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
