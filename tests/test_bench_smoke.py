"""Smoke test of the benchmark (load/bench/): it runs end to end and its JSON has the figures.

No timing assertions: this only proves that the emulator, the proxy (accounting on) and the forwarder
start, that every phase runs and that the results are written. The real numbers come from a full run
(``python -m load.bench``) on a quiet machine.

Marked ``bench`` (``pytest -m "not bench"`` leaves these out locally; CI runs them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.bench

# Every phase at its shortest: --quick's settings (one round, 4 streams, 2 big prompts of 20k tokens,
# 50/s and 200/s open loops) with 0.5 s runs instead of its 1.5 s, which --quick would impose.
LIGHT = ["--duration", "0.5", "--rounds", "1", "--stream-concurrency", "4", "--big-tokens", "20000",
         "--big-concurrency", "2", "--iso-rate", "50", "--latency-rate", "200", "--soak", "3"]


def test_bench_runs_every_phase_and_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "load.bench", *LIGHT, "--workers-ceiling", "2", "--ledger-rows", "1000",
         "--quiet", "--json", str(out)],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"bench failed:\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    res = json.loads(out.read_text())

    summary = res["throughput"]["summary"]
    for target in ("proxy", "forwarder", "emulator"):
        assert summary[target]["rps"] > 0, (target, summary[target])
    assert summary["forwarder"]["errors"] == 0, summary["forwarder"]
    assert summary["emulator"]["errors"] == 0, summary["emulator"]
    assert summary["proxy"]["errors"] == 0, summary["proxy"]
    # The proxy's group commits are read from its /metrics around each run.
    for run in res["throughput"]["runs"]:
        if run["target"] == "proxy":
            assert run["ledger"]["writes_per_commit"] >= 1, run

    # N=2 without coordination (load.ceiling) and two forwarders: they start, share their port and answer
    for target in ("proxy-x2-unshared", "forwarder-x2"):
        assert summary[target]["rps"] > 0 and summary[target]["errors"] == 0, (target, summary[target])
    assert res["throughput"]["workers_ceiling"]["workers"] == 2

    # Calls per request: every target served under cProfile, and proxyd's own functions show up in the
    # proxy's count only (the forwarder has none: the subtraction and the package split work).
    calls = res["calls"]["targets"]
    for target in ("proxy", "forwarder"):
        assert calls[target]["requests"] > 0 and calls[target]["calls_per_req"] > 100, (target, calls[target])
    assert calls["proxy"]["by_package"]["proxyd"] > 10, calls["proxy"]["by_package"]
    assert "proxyd" not in calls["forwarder"]["by_package"], calls["forwarder"]["by_package"]
    assert res["calls"]["proxy_minus_forwarder"] > 0

    lat = res["latency"]["summary"]
    for target in ("proxy", "forwarder"):
        assert lat[target]["rps"] > 0 and lat[target]["errors"] == 0, (target, lat[target])

    stream = res["stream"]["summary"]
    for per_level in stream.values():
        for target in ("proxy", "forwarder"):
            assert per_level[target]["ok"] > 0 and per_level[target]["errors"] == 0, (target, per_level[target])

    iso = res["isolation"]["summary"]
    assert iso["proxy"]["errors"] == 0 and iso["forwarder"]["errors"] == 0, iso

    soak = res["soak"]
    assert soak["ok"] > 0 and soak["unexpected_errors"] == 0, soak["unexpected_errors_by_kind"]
    assert soak["ledger_check"]["ok"] is True, soak["ledger_check"]
    assert soak["start"]["rss_kb"] and soak["end"]["rss_kb"]

    for label, check in res["ledger_check"].items():
        assert check["ok"] is True, (label, check)


def test_ledger_bench_runs_and_prints_both_id_kinds():
    proc = subprocess.run(
        [sys.executable, "-m", "load.ledger_bench", "--prefill", "0,2000", "--batch", "4", "--rows", "400"],
        cwd=ROOT, check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert sorted((r[0], r[1]) for r in rows) == [("ordered", "0"), ("ordered", "2000"), ("random", "0"), ("random", "2000")]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows), proc.stdout
