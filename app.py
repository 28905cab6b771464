"""proxyd: a metering OpenAI-compatible proxy in front of Ollama.

    python app.py                      # serve on :8000 in front of http://127.0.0.1:11434
    python app.py --demo               # no Ollama? serve in front of the bundled Ollama emulator
    python app.py --print-settings     # every config key with its type, default and help
    python app.py --check-ledger       # aggregates == sum of request rows? (exit 1 if not)
    python app.py --workers 4          # 4 processes on one port (needs PostgreSQL and Redis: see README)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import secrets
import signal
import sys
import time
from urllib.parse import urlsplit

from proxyd.config import ConfigError, describe, load_config
from proxyd.connections import ADMIN_MAX_CONNECTIONS, ProxydHTTPServer, connection_cap, raise_open_file_limit
from proxyd.errors import ServiceUnavailable
from proxyd.server import build_context, check_structures, make_app
from proxyd.storage import StorageError

log = logging.getLogger("proxyd")

DEMO_SNIPPET = """
================================================================================
proxyd demo is up: http://{host}:{port}  (upstream: Ollama emulator at {upstream})
Admin token for this run: {admin}
Demo ledger: {ledger} (apart from the configured one; answers are emulated, not a model's)

Try it with the openai SDK (pip install openai):

from openai import OpenAI
client = OpenAI(base_url="http://{host}:{port}", api_key="{key}")
r = client.chat.completions.create(model="llama3.2:1b",
        messages=[{{"role": "user", "content": "What is 2+2?"}}], max_tokens=20)
print(r.choices[0].message.content, r.usage)
for chunk in client.chat.completions.create(model="llama3.2:1b", stream=True,
        messages=[{{"role": "user", "content": "Tell me a story"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)

Your usage:  curl -s http://{host}:{port}/v1/usage -H "Authorization: Bearer {key}"
================================================================================
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="proxyd: metering OpenAI-compatible proxy for Ollama")
    p.add_argument("--config", help="config.yaml path (env PROXYD_CONFIG; default ./config.yaml if present)")
    p.add_argument("--port", type=int, help="listen port (overrides server.port / PROXYD_PORT)")
    p.add_argument("--demo", action="store_true", help="run against the bundled Ollama emulator")
    p.add_argument("--print-settings", action="store_true", help="list every config key and exit")
    p.add_argument("--check-ledger", action="store_true", help="check ledger consistency and exit")
    p.add_argument("--workers", type=int, default=1,
                   help="processes serving one port (SO_REUSEPORT); more than 1 needs database.backend postgres "
                        "and admission.backend redis")
    return p.parse_args(argv)


class StartupError(Exception):
    """A start that cannot go on (ledger cannot be opened, port taken): one line on stderr, exit 1."""


def ledger_name(config) -> str:
    """Where the ledger is, for messages: the SQLite path, or PostgreSQL's host and database (no password)."""
    if config["database.backend"] == "postgres":
        dsn = urlsplit(config["database.dsn"] or "")
        return f"postgresql://{dsn.hostname or 'localhost'}:{dsn.port or 5432}{dsn.path}"
    return config["database.path"]


async def serve(config, *, demo: bool = False, reuse_port: bool = False) -> int:
    loop = asyncio.get_running_loop()
    _, open_files = raise_open_file_limit()
    emulator_server = None
    if demo:
        from ollama_emulator import start_emulator  # a test double, not part of proxyd: imported only here

        emulator_server, emu_port, _state = await start_emulator(port=0, token_delay_s=0.03)
        config["upstream.url"] = f"http://127.0.0.1:{emu_port}"
        if not config["admin.token"]:
            config["admin.token"] = "adm-" + secrets.token_urlsafe(16)
        # A ledger of its own, beside the configured one: emulated usage and the demo user's keys must
        # never land in the real ledger (where the keys would work in front of the real Ollama).
        config["database.path"] = os.path.join(os.path.dirname(config["database.path"]) or ".", "proxyd-demo.db")
        config["database.backend"] = "sqlite"

    try:
        ctx = build_context(config)
    except (StorageError, OSError) as exc:
        if emulator_server is not None:
            emulator_server.stop()
        if config["database.backend"] == "postgres":
            raise StartupError(f"cannot open the ledger at {ledger_name(config)}: {exc} (is PostgreSQL up and "
                               "database.dsn / PROXYD_DATABASE_DSN right?)") from None
        path = config["database.path"]
        raise StartupError(f"cannot open the ledger at {path}: {exc} (does its directory exist and is it writable? "
                           "set database.path or PROXYD_DB)") from None
    if demo:
        ctx.upstream_kind = "emulator"
    ctx.ledger.bind_loop(loop)
    # Load the tokenizers now (~0.2 s for the Llama 3 ranks), not in the first client's request.
    for model in config["models"]:
        ctx.tokens.for_model(model)
    # The cyclic GC, tuned for a server (measured: it took ~8% of the CPU and paused the loop for
    # ~26 ms per full collection at 1,500 requests/s). Everything built so far (modules, config,
    # accounts, the tokenizer) lives as long as the process: frozen, full collections skip it. And a
    # young collection every 10,000 net new objects instead of 700: 50 requests in flight hold
    # thousands of objects, so at 700 it ran ~70 times a second and promoted live request objects
    # into the older generations, making those collections slower too. Cyclic garbage waits a
    # little longer for collection; everything else is freed by reference counting as before.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    servers = []
    main_app = make_app(ctx, admin_api=config["admin.port"] is None)
    server_kw = dict(
        max_body_size=config["server.max_body_bytes"] * 2,
        body_timeout=config["server.body_timeout_s"],
        idle_connection_timeout=config["server.idle_connection_timeout_s"],
        header_timeout_s=config["server.header_timeout_s"],
    )
    # The client connection cap fits the open-file limit (proxyd/connections.py): an idle flood must
    # not take the descriptors that served requests, the ledger and the upstream need.
    separate_admin = config["admin.port"] is not None
    cap = connection_cap(config["server.max_connections"], open_files, ADMIN_MAX_CONNECTIONS if separate_admin else 0)
    log.info("client connections capped at %d (server.max_connections %d, open files %s)",
             cap, config["server.max_connections"], open_files)
    listening = [(ProxydHTTPServer(main_app, max_connections=cap, **server_kw),
                  config["server.port"], config["server.address"], "server.port, PROXYD_PORT or --port")]
    if separate_admin:
        admin_cap = connection_cap(ADMIN_MAX_CONNECTIONS, open_files)
        listening.append((ProxydHTTPServer(make_app(ctx, api=False), max_connections=admin_cap, **server_kw),
                          config["admin.port"], config["admin.address"] or "127.0.0.1", "admin.port"))
    for server, port, address, key in listening:
        try:
            server.listen(port, address=address, reuse_port=reuse_port)
        except OSError as exc:
            for s in servers:
                s.stop()
            await _close(ctx, emulator_server)
            raise StartupError(f"cannot listen on {address}:{port}: {exc.strerror or exc} "
                               f"(another process there? set {key})") from None
        servers.append(server)
    if separate_admin:
        log.info("admin API on http://%s:%d", config["admin.address"] or "127.0.0.1", config["admin.port"])

    log.info("proxyd listening on http://%s:%d, upstream %s, ledger %s", config["server.address"], config["server.port"],
             ", ".join(u["name"] for u in config["upstreams"]) or config["upstream.url"], ledger_name(config))
    if not config["admin.token"]:
        log.warning("no admin token set (PROXYD_ADMIN_TOKEN or admin.token): the admin API answers 401 to everyone")
    await ctx.router.start()  # model lists (several upstreams), then the health probes in the background
    if config["upstreams"]:
        for backend in ctx.router.backends:  # each probed once by start(); /healthz probes them all again
            s = backend.state
            log.info("upstream %s (%s, %s): %s, models: %s", s.name, s.kind, s.url, s.state,
                     "not known yet" if s.models is None else ", ".join(sorted(s.models)) or "none")
    else:
        ok, detail = await ctx.upstream.health()
        if ok:
            log.info("upstream %s is answering", config["upstream.url"])
        else:
            log.warning(
                "upstream %s is NOT answering (%s). proxyd is serving anyway: model requests get 502 until Ollama is "
                "up (see /healthz). No Ollama here? Try: python app.py --demo", config["upstream.url"], detail)

    if demo:
        user = ctx.accounts.users.get("demo")
        if user is None:
            _, key, _ = await ctx.accounts.create_user("demo", {}, None)
        else:
            key, _ = await ctx.accounts.add_key("demo")
        host = "localhost" if config["server.address"] in ("127.0.0.1", "0.0.0.0") else config["server.address"]
        print(DEMO_SNIPPET.format(host=host, port=config["server.port"], upstream=config["upstream.url"],
                                  admin=config["admin.token"], key=key, ledger=config["database.path"]), flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    # Graceful shutdown: stop accepting, let in-flight requests (streams too) finish up to the grace
    # deadline, then flush the ledger writer. HTTPServer.close_all_connections() would abort streams.
    log.info("shutting down: draining %d in-flight requests (up to %ss)", ctx.in_flight, config["server.shutdown_grace_s"])
    ctx.shutting_down = True
    for s in servers:
        s.stop()
    deadline = loop.time() + config["server.shutdown_grace_s"]
    while ctx.in_flight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if ctx.in_flight:
        # Each request still running ends with an error event (or a 503 before its first byte) and a
        # proper end of its response, billed for what it relayed; the access log says status 503 with
        # cut_off "shutdown". Closing the connections instead would leave broken transfers, logged as
        # clients gone. A moment to write those ends; then whatever is left is closed.
        told = ctx.cut_off(lambda: ServiceUnavailable("proxyd is shutting down; the response was cut off."),
                           "shutdown")
        log.warning("%d requests still running at the deadline; ending %d of them with an error", ctx.in_flight, told)
        end = loop.time() + 2.0
        while ctx.in_flight > 0 and loop.time() < end:
            await asyncio.sleep(0.01)
    for s in servers:
        await s.close_all_connections()
    await asyncio.sleep(0)  # let aborted handlers reach their settle/void
    await _close(ctx, emulator_server)
    log.info("stopped cleanly; %d reservations left pending", ctx.meter.admission.pending)
    return 0


async def _close(ctx, emulator_server) -> None:
    """Closes what serve() opened: at the end, and after a start that failed to bind its port."""
    await ctx.router.close()  # every upstream's pool, the probes
    await ctx.images.close()
    await ctx.ledger.close()
    if hasattr(ctx.meter.admission, "close"):  # a shared admission: its connection and lease renewal
        await ctx.meter.admission.close()
    ctx.tokens.close()
    if emulator_server is not None:
        emulator_server.stop()


def check_ledger(config) -> int:
    from proxyd.storage.sqlite import check_file

    path = ledger_name(config)
    try:  # read-only: a mistyped path must not leave an empty database behind
        if config["database.backend"] == "postgres":
            from proxyd.storage.postgres import check_dsn

            result = check_dsn(config["database.dsn"])
        else:
            result = check_file(path)
    except StorageError as exc:
        print(f"proxyd: cannot check the ledger at {path}: {exc} (is database.path / PROXYD_DB right?)", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


def workers_refusal(config, workers: int, demo: bool = False) -> str | None:
    """Why ``--workers N`` cannot run with this config, or None. Each process keeps its own in-memory state
    unless it lives in a shared service, so N > 1 needs both shared backends."""
    if workers <= 1:
        return None
    if demo:
        return "--demo runs one process (its ledger is a SQLite file of its own); drop --workers"
    if config["database.backend"] != "postgres":
        return ("--workers N > 1 needs database.backend: postgres. The embedded SQLite ledger is one file written "
                "by one process, and each process would hold its own copy of the users and keys (a key revoked "
                "through one would still work on the others). Run one process, or see README 'Several instances'.")
    if config["admission.backend"] != "redis":
        return ("--workers N > 1 needs admission.backend: redis. With the in-memory admission each process counts "
                "limits on its own, so every limit (per minute, concurrency, day, month, total) would let through "
                "up to N times its value. See README 'Several instances'.")
    if not config["server.port"]:
        return "--workers N > 1 needs a fixed server.port (with port 0 each process would get a port of its own)"
    return None


def run_workers(config, workers: int) -> int:
    """N processes on one port (SO_REUSEPORT: the kernel spreads connections over them), each with its own
    loop, ledger writer task and LISTEN connection. The parent only supervises: it forwards SIGTERM/SIGINT,
    restarts a worker killed by a signal (kill -9, the OOM killer), and stops everything when one fails to
    start (exit code > 0: a second try would fail the same way)."""
    children: dict[int, int] = {}  # pid -> worker number
    stopping = False

    def spawn(n: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: nothing of the parent's runs here (no loop was made before the fork)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                log.info("worker %d (pid %d) starting", n, os.getpid())
                code = asyncio.run(serve(config, reuse_port=True))
            except StartupError as exc:
                print(f"proxyd worker {n}: {exc}", file=sys.stderr)
            except BaseException:
                log.exception("worker %d failed", n)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = n

    def forward(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for n in range(workers):
        spawn(n)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("supervising %d workers on port %d", workers, config["server.port"])
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        n = children.pop(pid, None)
        if n is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            worst = max(worst, code if code > 0 else 0)
        elif code < 0:
            log.error("worker %d (pid %d) killed by signal %d; starting a new one", n, pid, -code)
            time.sleep(0.2)
            spawn(n)
        else:
            log.error("worker %d (pid %d) exited with %d; stopping the others", n, pid, code)
            worst = max(worst, code or 1)
            forward(signal.SIGTERM, None)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_settings:
        print(describe())
        return 0
    # INFO until the config is read; then logging.level (validated there) applies.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = args.config or os.environ.get("PROXYD_CONFIG") or ("config.yaml" if os.path.exists("config.yaml") else None)
    overrides = {"server.port": args.port} if args.port else {}
    try:
        config = load_config(path, overrides)
        check_structures(config)  # limits and pricing are validated before anything starts
    except ConfigError as exc:
        print(f"proxyd: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config["logging.level"].upper())
    if args.check_ledger:
        return check_ledger(config)
    refusal = workers_refusal(config, args.workers, args.demo)
    if refusal:
        print(f"proxyd: {refusal}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return run_workers(config, args.workers)
    try:
        return asyncio.run(serve(config, demo=args.demo))
    except StartupError as exc:
        print(f"proxyd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
