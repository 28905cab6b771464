"""``python -m ollama_emulator --port 11434 --token-delay 0.02``: an emulated Ollama on its own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from .server import start_emulator

log = logging.getLogger("ollama_emulator")


def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ollama_emulator", description="Ollama /v1 emulator")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--token-delay", type=float, default=0.0, help="seconds between streamed tokens")
    p.add_argument("--first-byte-delay", type=float, default=0.0, help="seconds before the first byte")
    p.add_argument("--stream-format", choices=("old", "new"), default="old")
    p.add_argument("--no-usage", action="store_true", help="never report usage in streams")
    p.add_argument("--prompt-token-skew", type=int, default=0)
    p.add_argument("--no-host-check", action="store_true")
    p.add_argument("--fault", default=None, help="a fault every request takes (busy503, slow_first_byte:0.2, ...)")
    p.add_argument("--models", default=None, help="comma-separated models installed (default: the built-in three)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    server, port, state = await start_emulator(
        port=args.port,
        address=args.address,
        token_delay_s=args.token_delay,
        first_byte_delay_s=args.first_byte_delay,
        stream_format=args.stream_format,
        send_usage=not args.no_usage,
        prompt_token_skew=args.prompt_token_skew,
        check_host=not args.no_host_check,
        fault=args.fault,
        **({"models": tuple(args.models.split(","))} if args.models else {}),
    )
    shown = f"[{args.address}]" if ":" in args.address else args.address
    log.info("ollama emulator listening on http://%s:%d", shown, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), 2.0)
    except TimeoutError:
        pass
    state.tokens.close()
    log.info("ollama emulator stopped")


def main(argv: list | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
