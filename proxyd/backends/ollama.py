"""Ollama, through its OpenAI-compatible API (/v1) and its native API (/api): the one backend kind today.

The wire facts proxyd relies on (docs/DESIGN.md, "Ollama's quirks"): streams on /v1 are server-sent
events ending in ``data: [DONE]`` (on /api, NDJSON ending on the ``done: true`` object); a stream reports usage only when ``stream_options.include_usage`` is asked
for, in a last chunk without choices, and /v1/completions then puts a zeroed usage object on every
other chunk too; an image sent to a model without vision is a 500 whose message says so; runner
errors name the runner's own address; model names fold as proxyd/modelname.py says.
"""

from __future__ import annotations

from typing import Any

from .. import jsonio
from ..errors import ProxyError, UpstreamError, openai_type_for_status
from ..modelname import canonical
from ..ndjson import NDJSONParser
from ..sse import SSEParser
from ..upstream import Upstream, without_addresses

# Ollama's answer to an image sent to a model without vision (a 500): the client's mistake, not a crash.
NO_VISION = "missing data required for image input"


class OllamaBackend:
    name = "ollama"
    reports_cost = False  # Ollama bills nothing: usage is priced from proxyd's table
    paths = {
        "chat": "/v1/chat/completions",
        "completions": "/v1/completions",
        "embeddings": "/v1/embeddings",
        "responses": "/v1/responses",
        "models": "/v1/models",
        # Ollama's native API (proxyd/endpoints/native.py): NDJSON streams, ``{"error": "..."}`` errors.
        "api.chat": "/api/chat",
        "api.generate": "/api/generate",
        "api.embed": "/api/embed",
        "api.embeddings": "/api/embeddings",
        "api.tags": "/api/tags",
        "api.show": "/api/show",
        "api.ps": "/api/ps",
        "api.version": "/api/version",
        "messages": "/v1/messages",  # Anthropic's Messages API (Ollama v0.14.0+)
    }

    def __init__(self, upstream: Upstream, images: Any, upstream_name: str = "default") -> None:
        self.upstream = upstream
        self.upstream_name = upstream_name  # config's upstream.url is the one upstream called "default"
        # The image policy: Ollama takes images only inline, as JPEG, PNG or WebP data URLs; proxyd checks,
        # fetches and converts the rest (proxyd/images.py, ImageInliner).
        self.images = images
        # The pool's own method, not a wrapper around it: opening a request costs no extra call.
        self.open = upstream.request
        self.health = upstream.health
        # Routing state (proxyd/backends/health.py), set by the Router that owns this backend.
        self.state: Any = None

    async def list_models(self) -> list[str]:
        """The installed models (/api/tags), as proxyd names them (canonical, with their tag)."""
        doc = await self.upstream.get_json("/api/tags")
        return [n for n in (canonical(str(m.get("name") or m.get("model") or "")) for m in doc.get("models") or ()) if n]

    async def loaded_models(self) -> set[str] | None:
        """The models in memory now (/api/ps): a request for one of them starts without a cold load."""
        doc = await self.upstream.get_json("/api/ps", timeout_s=2.0)
        return {n for n in (canonical(str(m.get("name") or m.get("model") or "")) for m in doc.get("models") or ()) if n}

    @staticmethod
    def stream_parser(operation: str) -> SSEParser | NDJSONParser:
        return NDJSONParser() if operation in _NDJSON_OPERATIONS else SSEParser()
    canonical_model = staticmethod(canonical)
    model_key = staticmethod(canonical)

    @staticmethod
    def stream_usage(doc: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any] | None:
        # The usage chunk is the one with no choices; its figures count even when they are zero (an
        # empty prompt). Other chunks of /v1/completions carry a zeroed usage object: not a report.
        if not doc.get("choices") or usage.get("total_tokens"):
            return usage
        return None

    @staticmethod
    def error(status: int, raw: bytes) -> ProxyError:
        """Ollama's error passes through with its status; a non-JSON body is described."""
        # Ollama's 503 means its queue is full: tell clients when to come back.
        headers = {"Retry-After": "1"} if status == 503 else None
        kind, code, param = openai_type_for_status(status), None, None
        try:
            err = jsonio.loads(raw)["error"]
            if isinstance(err, dict):
                message = str(err.get("message") or f"Upstream returned HTTP {status}.")
                kind, code, param = err.get("type") or kind, err.get("code"), err.get("param")
            else:
                message = str(err)
        except (ValueError, KeyError, TypeError):
            text = raw.decode("utf-8", "replace").strip()[:300]
            message = f"Upstream returned HTTP {status}" + (f": {text}" if text else " with an empty body.")
        # Ollama's runner errors name the runner's URL ('Post "http://127.0.0.1:39123/completion": EOF'):
        # the client gets the message without addresses, the log the original (see BaseHandler.log_exception).
        public = without_addresses(message)
        detail = message if public != message else None
        message = public
        if status == 500 and NO_VISION in message:
            return UpstreamError("This model does not accept images (" + message + ").", status=400,
                                 type="invalid_request_error", param="messages")
        return UpstreamError(message, status=status, type=kind, code=code, param=param, headers=headers, detail=detail)


# The native API's operations: their streams are NDJSON (a set lookup per stream, no call).
_NDJSON_OPERATIONS = frozenset(op for op in OllamaBackend.paths if op.startswith("api."))
