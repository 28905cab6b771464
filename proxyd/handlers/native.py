"""Ollama's native routes (/api/...): the metered ones are the pipeline's shell (``ProxyHandler``)
with a native endpoint (proxyd/endpoints/native.py); the model routes are passed through unmetered;
the routes that manage the server's models are refused; every error is ``{"error": "..."}``.

Every route needs a key, /api/version too: the exact version of the Ollama behind proxyd is the
operator's business (it tells which known bugs it has), every client of this API can send a key (the
``ollama`` libraries pass the headers they are given), and /healthz answers liveness probes without one.
"""

from __future__ import annotations

from typing import Any

from .. import jsonio
from ..endpoints.native import NativeChat, NativeEmbed, NativeEmbeddings, NativeGenerate
from ..errors import InvalidRequest, NotFound, PermissionDenied, ProxyError
from .base import BaseHandler
from .openai import ProxyHandler


class NativeChatHandler(ProxyHandler):
    endpoint = NativeChat()


class NativeGenerateHandler(ProxyHandler):
    endpoint = NativeGenerate()


class NativeEmbedHandler(ProxyHandler):
    endpoint = NativeEmbed()


class NativeEmbeddingsHandler(ProxyHandler):
    endpoint = NativeEmbeddings()


class NativeHandler(BaseHandler):
    """A native route that is not metered: authenticated, answered in Ollama's error shape."""

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user()

    def error_body(self, err: ProxyError) -> bytes:
        return jsonio.dumps({"error": err.message})


class PassThroughHandler(NativeHandler):
    """/api/tags, /api/ps, /api/version and /api/show: what the server has and runs, read-only. The
    upstream's answer is relayed as it is, its errors in the native shape. Each route implements the
    methods Ollama serves on it (others: 405 with Allow)."""

    operation = ""

    async def relay(self, method: str, body: dict[str, Any] | None = None) -> None:
        backend = self.ctx.router.default  # one backend today: its models are the ones there are
        resp = await backend.open(method, backend.paths[self.operation], body)
        raw = await resp.read()
        if resp.status != 200:
            raise backend.error(resp.status, raw)
        self.set_header("Content-Type", resp.content_type or "application/json")
        self.finish(raw)  # Tornado sends no body for HEAD


class TagsHandler(PassThroughHandler):
    operation = "api.tags"

    async def get(self) -> None:
        await self.relay("GET")

    head = get


class VersionHandler(TagsHandler):
    operation = "api.version"


class PsHandler(PassThroughHandler):
    operation = "api.ps"

    async def get(self) -> None:
        await self.relay("GET")


class ShowHandler(PassThroughHandler):
    operation = "api.show"

    async def post(self) -> None:
        body = self.json_body()
        model = body.get("model") or body.get("name")  # "name": the field's deprecated spelling
        if not isinstance(model, str):
            raise InvalidRequest("model is required" if model is None else "'model' must be a string", param="model")
        await self.relay("POST", body)


class ManagementHandler(NativeHandler):
    """/api/pull, /api/push, /api/create, /api/delete, /api/copy, /api/blobs/<digest>: a user of proxyd
    must not change which models the shared server has. Refused after the key is checked, whatever
    the method, before a byte of the body is read (a blob upload can be gigabytes): the connection
    closes after the answer, since the unread body leaves it unusable."""

    def prepare(self) -> None:
        super().prepare()
        raise PermissionDenied(
            f"{self.request.path} is not available through proxyd: the models on the server are managed by its operator.",
            headers={"Connection": "close"},
        )


class NativeNotFoundHandler(NativeHandler):
    """Any other /api/ path: 404 in the native shape (Ollama's gin answers plain text)."""

    def prepare(self) -> None:
        raise NotFound(f"Unknown path {self.request.method} {self.request.path}.")


def routes() -> list[tuple[str, type]]:
    return [
        (r"/api/chat", NativeChatHandler),
        (r"/api/generate", NativeGenerateHandler),
        (r"/api/embed", NativeEmbedHandler),
        (r"/api/embeddings", NativeEmbeddingsHandler),
        (r"/api/tags", TagsHandler),
        (r"/api/show", ShowHandler),
        (r"/api/ps", PsHandler),
        (r"/api/version", VersionHandler),
        (r"/api/(?:pull|push|create|delete|copy|blobs/[^/]+)", ManagementHandler),
        (r"/api/.*", NativeNotFoundHandler),
    ]
