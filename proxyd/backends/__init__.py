"""Backends: one per kind of upstream, and the router that picks one for a model.

A backend knows its upstream's wire: how to open a request (its paths, its connection pool), its
model-name rules, its image policy, how its errors read and become proxyd's, how its streams are
framed, its health probe and its quirks. It knows nothing of metering or of the client's dialect.
The one kind today is Ollama's OpenAI-compatible API (``OllamaBackend``); docs/DESIGN.md says what a
second kind (``kind: openai``) and several upstreams with failover take.
"""

from __future__ import annotations

from typing import Any, Protocol


class Backend(Protocol):
    name: str  # the kind, as /healthz names it
    upstream_name: str  # the configured upstream's name, as the ledger's upstream column records it
    # operation ("chat", "completions", "embeddings", "models") -> the upstream's path for it
    paths: dict[str, str]

    async def open(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Sends a request and waits for the response's headers (an ``proxyd.upstream.UpstreamResponse``:
        status, read(), chunks(), release(), abort())."""

    def stream_parser(self, operation: str) -> Any:
        """A fresh parser for one response stream of ``operation`` (the upstream's framing may differ by
        route: SSE on Ollama's /v1, NDJSON on its /api): ``feed(bytes)`` yields each event's payload, and
        ``proxyd.sse.DONE`` once the upstream says the stream is complete (a dialect without such a line
        ends on its terminal event instead: ``MeteredCall.upstream_done``)."""

    def error(self, status: int, raw: bytes) -> Exception:
        """The upstream's error answer as the ProxyError the client gets."""

    def stream_usage(self, doc: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any] | None:
        """The usage a stream event carries, or None if it is not a report (quirks live here)."""

    def canonical_model(self, name: str) -> str:
        """The model a name means to this upstream ("" if the upstream would refuse the name)."""

    def model_key(self, name: str) -> str:
        """The name a model this upstream lists is routed, metered and priced under."""

    reports_cost: bool  # a usage.cost in its answers is the request's price, billed as reported
    state: Any  # the router's UpstreamState (proxyd/backends/health.py)

    async def list_models(self) -> list[str]:
        """The models it serves, as it names them (discovery)."""

    async def loaded_models(self) -> set[str] | None:
        """The models it has in memory (Ollama's /api/ps), None if it cannot say."""

    async def health(self) -> tuple[bool, str]: ...


from .router import Router  # noqa: E402  (re-exported: proxyd.backends.Router)

__all__ = ["Backend", "Router"]
