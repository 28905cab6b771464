"""The proxy benchmark: proxyd (accounting and ledger on) against a bare forwarder and the emulator.

    python -m load.bench                       # 3 rounds x 10 s per target and phase (about 6 minutes)
    python -m load.bench --quick               # a few seconds per phase (the smoke test)
    python -m load.bench --soak 600            # the phases, then a 10-minute mixed soak with faults
    python -m load.bench --phases throughput --rounds 5 --duration 20 --json /tmp/r.json
    python -m load.bench --phases throughput,latency --ledger-rows 3000000   # on a ledger of months

Everything runs on loopback in subprocesses on free ports: the Ollama emulator with instant answers
(and a second one with a per-token delay, for streams), proxyd (temp database, temp config with
generous but *all* limits configured, metrics on, access log off) and ``load.forwarder`` (the bare
yardstick: same Tornado + aiohttp pool, nothing else), each in front of each emulator. Then, in one
run, alternating between the targets round by round (the order rotates every round) so that machine
noise spreads evenly:

throughput  non-stream chat at fixed concurrency (closed loop): rps, p50/p99, errors, CPU per request
            of the serving process; proxy/forwarder ratio (of the means, and per round).
            Load generator: ``wrk`` when installed (C, cheapest), else load.loadgen's raw HTTP/1.1
            client; either runs in its own process.
calls       Python function calls per request (cProfile): the proxy (and candidates) and the forwarder
            each started under the profiler, once idle and once under the throughput load, the idle
            run's calls subtracted; total and by package. A count, so it hardly varies between runs:
            it shows a change of a few percent that rps cannot tell from noise.
stream      streamed chat (20 tokens, 5 ms apart) at concurrency 1 and N: time to first byte and
            total time; the proxy's overhead over the forwarder in TTFB and per relayed chunk.
isolation   small-request latency (open loop, fixed rate) through the proxy while a few ~100k-token
            prompts are in flight, against the same without them (and the same on the forwarder).
soak        (--soak S) a steady mix (chat, streams, vision, embeddings, a user over a 5/minute limit,
            injected upstream faults) for S seconds: RSS, open files, WAL size at start/end, errors by
            kind, then GET /admin/ledger/check.

Every generator run is bounded by its duration and every subprocess is stopped at the end (SIGTERM,
then SIGKILL). Results: a table on stdout and JSON (``--json PATH``, default
load/results/bench-<timestamp>.json; load/results/ is git-ignored).

The proxy is one process (no --workers yet): all figures are for N=1.

The package, by concern:

  processes.py  the servers under test: emulator, proxy, forwarder, candidates, ceilings (Proc, Stack)
  runner.py     the bench's shared state and tools: load generators (wrk, load.loadgen), CPU accounting
  workload.py   the request bodies and the limits every proxy user gets
  phases/       one module per phase: throughput (+ profile), calls, latency, stream, isolation, soak
  report.py     the figures' summaries, the tables on stdout
  cli.py        the flags, and the order the phases run in (``python -m load.bench`` = __main__.py)
"""
