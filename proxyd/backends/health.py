"""One upstream's routing state: its health (a small state machine) and its counters.

    up ──(failures_to_eject failures in a row: connect errors, resets, timeouts, 5xx; probes too)──▶ down
    down ──(cooldown_s passed)──▶ trial: exactly one request (or the next probe) is let through
    trial ──success──▶ up          trial ──failure──▶ down (another cool-down)

Failures come from requests (passive: ``Router.release``) and from the active probe every
``probe_interval_s``; successes reset the count. A success while still cooling down (a request sent
before the upstream was taken out) does not end the cool-down: only the trial does. Plain attributes
with __slots__: the router reads and writes them on every request, so no method call is spent where an
attribute will do.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("proxyd.upstreams")

UP, DOWN, TRIAL = "up", "down", "trial"


class UpstreamState:
    __slots__ = ("name", "kind", "url", "weight", "max_in_flight", "state", "failures", "until", "trial_busy",
                 "in_flight", "requests", "errors", "latency_s", "answered", "detail", "models", "listed",
                 "loaded", "fixed_models", "pricing")

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["name"]
        self.kind: str = spec["kind"]
        self.url: str = spec["url"]
        self.weight: float = spec.get("weight", 1.0)
        self.max_in_flight: int | None = spec.get("max_in_flight")
        self.state = UP  # optimistic at start: the first probe or request says otherwise
        self.failures = 0  # in a row
        self.until = 0.0  # monotonic end of the cool-down
        self.trial_busy = False
        self.in_flight = 0
        self.requests = 0  # attempts sent to it
        self.errors = 0
        self.latency_s = 0.0  # sum of the times to the first byte (headers), for the mean
        self.answered = 0
        self.detail = ""  # the last failure, for the admin's /healthz
        self.models: set[str] | None = None  # keys it serves; None = not known (serves anything asked)
        self.listed: list[str] = []  # the ids as it lists them, for /v1/models
        self.loaded: set[str] | None = None  # Ollama: models in memory (/api/ps); None = not known
        self.fixed_models = spec.get("models") is not None  # configured: never discovered
        self.pricing = spec.get("pricing") or {}

    def available(self, now: float) -> bool:
        """May a request go here now? Moves a finished cool-down to its trial."""
        if self.state is UP:
            return True
        if self.state is DOWN:
            if now < self.until:
                return False
            self.state, self.trial_busy = TRIAL, False
        return not self.trial_busy

    def failed(self, now: float, failures_to_eject: int, cooldown_s: float, detail: str = "") -> None:
        self.failures += 1
        if detail:
            self.detail = detail
        if self.state is TRIAL or (self.state is UP and self.failures >= failures_to_eject):
            log.warning("upstream %s is out for %gs after %d failure(s) in a row (%s)", self.name, cooldown_s,
                        self.failures, self.detail or "no detail")
            self.state, self.until, self.trial_busy = DOWN, now + cooldown_s, False

    def succeeded(self, now: float) -> None:
        if self.state is DOWN and now < self.until:
            return  # started before it was taken out: the cool-down stands
        if self.state is not UP:
            log.warning("upstream %s is back", self.name)
        self.state, self.failures, self.trial_busy = UP, 0, False

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state, "in_flight": self.in_flight,
                "requests": self.requests, "errors": self.errors,
                "latency_ms": round(1000 * self.latency_s / self.answered, 1) if self.answered else None,
                "models": sorted(self.models) if self.models is not None else None}
