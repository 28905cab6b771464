"""Endpoints: one per client dialect (the API a client speaks), built once, shared by all requests.

An endpoint turns the client's body into a plan and the upstream's answer into what the client gets,
in the client's wire format; the pipeline (proxyd/pipeline.py) does everything else. Today's three are
OpenAI's chat completions, completions and embeddings (proxyd/endpoints/openai.py). docs/DESIGN.md says
what a new dialect takes (OpenAI Responses, Anthropic Messages, Ollama's native API).
"""

from __future__ import annotations

from typing import Any, Protocol

from .. import jsonio
from ..errors import UpstreamUnavailable


class Endpoint(Protocol):
    name: str  # the ledger's name for it, e.g. "chat.completions"
    operation: str  # what it asks of a backend: a key of ``Backend.paths``
    reserves_completion: bool  # False: no output tokens to budget (embeddings)
    stream_content_type: str  # "text/event-stream" (SSE), "application/x-ndjson", ...

    def rate_headers(self, checks: Any, amounts: Any, now: float, *, entered: bool, long_term: bool = True) -> dict:
        """The limit headers of an answer or a refusal in the dialect's words (proxyd/limits_http.py)."""

    def credentials(self, headers: Any) -> str | None:
        """The API key as an ``Authorization`` value (``Bearer <key>``), from wherever the dialect sends
        it (OpenAI: Authorization; Anthropic: x-api-key)."""

    def parse(self, body: dict[str, Any]) -> tuple[str, bool, bool, int | None]:
        """The plan: (model, stream, include_usage, the client's completion cap or None); raises
        InvalidRequest for a body the dialect does not accept."""

    async def estimate(self, body: dict[str, Any], model: str, call: Any) -> int:
        """Prompt tokens of the request (after what must happen before counting, e.g. images inlined)."""

    def forward_body(self, body: dict[str, Any], completion_tokens: int, stream: bool) -> dict[str, Any]:
        """The upstream's request body, capped at the reserved completion budget."""

    def answer(self, raw: bytes, call: Any) -> bytes:
        """A whole (non-stream) upstream answer -> the client's body; records usage and text on ``call``."""

    def relay_event(self, data: bytes, call: Any) -> bytes | None:
        """One upstream stream event -> the client's framed bytes (None: nothing to send); records usage
        and text on ``call``."""

    def stream_end(self, call: Any, usage: Any) -> bytes:
        """The stream's last bytes, after the settle (a usage event owed to the client, [DONE], ...)."""

    def error_body(self, err: Any) -> bytes:
        """An error before the response started: the dialect's error envelope."""

    def error_event(self, err: Any) -> bytes:
        """An error after the response started: the dialect's framed error event."""


def upstream_object(raw: bytes, message: str = "Upstream answered with invalid JSON.") -> dict[str, Any]:
    """An upstream's JSON object, or the 502 every dialect gives for anything else (the same answer
    whatever the dialect: the client's request was fine, the upstream's reply was not)."""
    try:
        doc = jsonio.loads(raw)
    except ValueError:
        raise UpstreamUnavailable(message) from None
    if not isinstance(doc, dict):
        raise UpstreamUnavailable(message)
    return doc
