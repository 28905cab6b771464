"""Prometheus metrics (own registry per application, so tests can build several apps in one process)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class Metrics:
    def __init__(self, *, per_user_labels: bool = False) -> None:
        self.registry = r = CollectorRegistry()
        self.per_user = per_user_labels
        self._children: dict[tuple, Any] = {}
        # Model names come from clients: a label only for models that have settled usage (Ollama served
        # them), "other" for the rest, so random names cannot grow the label sets without bound.
        self._models: set[str] = set()
        self.requests = Counter("proxyd_requests", "Requests answered", ["route", "status", "model"], registry=r)
        token_labels = ["model", "kind"] + (["user"] if per_user_labels else [])
        self.tokens = Counter("proxyd_tokens", "Tokens settled", token_labels, registry=r)
        self.voided_total = Counter("proxyd_reservations_voided", "Reservations released unbilled", ["model"], registry=r)
        self.estimate_error = Histogram(
            "proxyd_prompt_estimate_error_tokens",
            "Reported prompt tokens minus proxyd's estimate",
            ["model"],
            buckets=(-100, -20, -5, -1, 0, 1, 5, 20, 100),
            registry=r,
        )
        self.ttfb = Histogram(
            "proxyd_upstream_first_byte_seconds", "Time until Ollama's response headers (first byte)", ["endpoint"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 300), registry=r,
        )
        self.latency = Histogram(
            "proxyd_request_seconds", "Request latency as seen by proxyd", ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r,
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        # labels() costs a lock and a dict build per call; the children are cached by their key.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def model_label(self, model: str) -> str:
        return model if not model or model in self._models else "other"

    def upstream_first_byte(self, endpoint: str, seconds: float) -> None:
        self._child(self.ttfb, endpoint).observe(seconds)

    def bind(self, *, in_flight: Callable[[], int], queue_depth: Callable[[], int], commit_s: Callable[[], float],
             commits: Callable[[], tuple[int, int]]) -> None:
        Gauge("proxyd_reservations_in_flight", "Reservations pending", registry=self.registry).set_function(in_flight)
        Gauge("proxyd_ledger_queue_depth", "Ledger writes queued", registry=self.registry).set_function(queue_depth)
        Gauge("proxyd_ledger_last_commit_seconds", "Duration of the last group commit", registry=self.registry).set_function(commit_s)
        self.registry.register(_LedgerCommits(commits))

    def bind_upstreams(self, router: Any) -> None:
        self.registry.register(_Upstreams(router))

    def settled(self, ticket: Any, usage: Any) -> None:
        self._models.add(ticket.model)
        extra = (ticket.caller.user.user_id,) if self.per_user else ()
        self._child(self.tokens, ticket.model, "prompt", *extra).inc(usage.prompt_tokens)
        self._child(self.tokens, ticket.model, "completion", *extra).inc(usage.completion_tokens)
        if usage.source == "reported":
            self._child(self.estimate_error, ticket.model).observe(usage.prompt_tokens - ticket.prompt_tokens)

    def voided(self, ticket: Any) -> None:
        self._child(self.voided_total, self.model_label(ticket.model)).inc()

    def observe_request(self, route: str, status: int, model: str, seconds: float) -> None:
        self._child(self.requests, route, str(status), self.model_label(model)).inc()
        self._child(self.latency, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def live(self, routes: set[str]) -> dict[str, Any]:
        """The cumulative counts the dashboard's live tiles are computed from (issue #17): the requests
        answered on ``routes`` (the model routes: the dashboard's own polling is not traffic) by status
        class, their latency histogram, and the tokens settled. Totals only: the page takes the difference
        of two snapshots, so the proxy keeps no state per viewer and any number of viewers agree."""
        by_class = {"2xx": 0, "4xx": 0, "5xx": 0}
        for family in self.requests.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["route"] in routes:
                    cls = sample.labels["status"][0] + "xx"
                    by_class[cls if cls in by_class else "5xx"] += int(sample.value)
        buckets: dict[float, float] = {}
        count = total_s = 0.0
        for family in self.latency.collect():
            for sample in family.samples:
                if sample.labels.get("route") not in routes:
                    continue
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0) + sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total_s += sample.value
        tokens = 0
        for family in self.tokens.collect():
            tokens += sum(int(s.value) for s in family.samples if s.name.endswith("_total"))
        return {"requests": by_class, "latency": {"count": int(count), "sum_s": total_s,
                                                   "buckets": [[le if le != float("inf") else None, int(n)]
                                                               for le, n in sorted(buckets.items())]},
                "tokens": tokens}


class _LedgerCommits:
    """Group commits and the writes they carried: writes per commit is the batching the ledger gets."""

    def __init__(self, read: Callable[[], tuple[int, int]]) -> None:
        self.read = read

    def collect(self):
        commits, writes = self.read()
        yield CounterMetricFamily("proxyd_ledger_commits", "Ledger transactions committed", value=commits)
        yield CounterMetricFamily("proxyd_ledger_writes", "Ledger writes committed (a write: a request's row(s))",
                                  value=writes)


class _Upstreams:
    """Each upstream's routing state, read at scrape time from the router (nothing per request)."""

    def __init__(self, router: Any) -> None:
        self.router = router

    def collect(self):
        up = GaugeMetricFamily("proxyd_upstream_up", "1 up, 0.5 on trial after a cool-down, 0 out", labels=["upstream"])
        in_flight = GaugeMetricFamily("proxyd_upstream_in_flight", "Requests in flight", labels=["upstream"])
        requests = CounterMetricFamily("proxyd_upstream_requests", "Attempts sent", labels=["upstream"])
        errors = CounterMetricFamily("proxyd_upstream_errors", "Failed attempts (unreachable, cut, 5xx)",
                                     labels=["upstream"])
        latency = CounterMetricFamily("proxyd_upstream_first_byte_seconds_sum", "Time to the response headers, summed",
                                      labels=["upstream"])
        answered = CounterMetricFamily("proxyd_upstream_first_byte_seconds_count", "Responses whose headers came",
                                       labels=["upstream"])
        for backend in self.router.backends:
            s, name = backend.state, [backend.upstream_name]
            up.add_metric(name, {"up": 1.0, "trial": 0.5}.get(s.state, 0.0))
            in_flight.add_metric(name, s.in_flight)
            requests.add_metric(name, s.requests)
            errors.add_metric(name, s.errors)
            latency.add_metric(name, s.latency_s)
            answered.add_metric(name, s.answered)
        yield from (up, in_flight, requests, errors, latency, answered)
