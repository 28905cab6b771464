"""The phases, in the order they run; each is ``run(bench)`` and writes its part of bench.results."""

from . import calls, isolation, latency, profile, soak, stream, throughput

PHASES = {
    "throughput": throughput.run,
    "calls": calls.run,
    "latency": latency.run,
    "stream": stream.run,
    "isolation": isolation.run,
    "soak": soak.run,
}
PROFILE = profile.run
