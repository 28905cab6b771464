"""N uncoordinated proxyd processes on one port: what N worker processes could add, at most, on this machine.

    python -m load.ceiling --workers 2 --config CFG --seed-user bench --key-file KEY [--limits JSON]

FOR THE BENCHMARK ONLY, NOT A WAY TO RUN PROXYD. Each process keeps its own in-memory limits, so
limits are NOT shared: a user could spend N times a limit, and the processes share one SQLite file
without knowing of each other (a process starting up would expire the others' pending rows). What it
measures is the ceiling: N full proxies (auth, token counting, limits, the durable ledger) sharing the
port through SO_REUSEPORT, with no coordination cost at all. A design that keeps limits exact across
processes (docs/DESIGN.md, "One process") would pay for coordination on top, so it can only be slower
than this; if the ceiling is not much above one process, building that design is not worth it on this
hardware.

The API key is created before the workers start (they load accounts at start-up and would not see a
user created later through another worker's admin API) and written to ``--key-file``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from load.forwarder import run_workers

ROOT = Path(__file__).resolve().parent.parent


def seed_user(config_path: str, user_id: str, limits: dict, key_file: str) -> None:
    sys.path.insert(0, str(ROOT))
    from proxyd.config import load_config
    from proxyd.limitspec import parse_limits
    from proxyd.server import build_context

    async def run() -> str:
        ctx = build_context(load_config(config_path))
        ctx.ledger.bind_loop(asyncio.get_running_loop())
        _user, key, _key_id = await ctx.accounts.create_user(user_id, parse_limits(limits, "limits"), limits)
        await ctx.ledger.close()
        return key

    Path(key_file).write_text(asyncio.run(run()))


def worker(config_path: str) -> int:
    sys.path.insert(0, str(ROOT))
    from tornado.tcpserver import TCPServer

    listen = TCPServer.listen

    def listen_shared(self, port, address=None, **kw):  # every worker binds the same port
        kw["reuse_port"] = True
        return listen(self, port, address, **kw)

    TCPServer.listen = listen_shared
    os.chdir(ROOT)
    import app

    return app.main(["--config", config_path])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--config", required=True)
    p.add_argument("--seed-user", default="bench")
    p.add_argument("--limits", default="{}", help="JSON limits of the seeded user")
    p.add_argument("--key-file", required=True)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.config)
    seed_user(args.config, args.seed_user, json.loads(args.limits), args.key_file)
    return run_workers(args.workers, [sys.executable, "-m", "load.ceiling", "--worker", "--config", args.config,
                                      "--key-file", args.key_file])


if __name__ == "__main__":
    sys.exit(main())
