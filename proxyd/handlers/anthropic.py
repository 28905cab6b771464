"""Anthropic's routes: ``POST /v1/messages`` (metered, the pipeline's) and ``POST /v1/messages/count_tokens``.

Both take the key from ``x-api-key`` or ``Authorization: Bearer`` and answer every error, from the
missing key to a refusal, in Anthropic's envelope (proxyd/endpoints/anthropic.py). Each answer carries
the request id also as ``request-id``, the header the anthropic SDK reads into ``_request_id``.
"""

from __future__ import annotations

from ..endpoints.anthropic import Messages, check_prompt, to_chat
from ..errors import NotFound, ProxyError
from ..validate import _model
from .base import BaseHandler
from .openai import ProxyHandler

MESSAGES = Messages()


class AnthropicRoute:
    """What every route under /v1/messages shares: the envelope and the ``request-id`` header."""

    def set_default_headers(self) -> None:
        super().set_default_headers()  # type: ignore[misc]
        self._headers["request-id"] = self.request_id  # type: ignore[attr-defined]

    def error_body(self, err: ProxyError) -> bytes:
        return MESSAGES.error_body(err)


class MessagesHandler(AnthropicRoute, ProxyHandler):
    endpoint = MESSAGES


class CountTokensHandler(AnthropicRoute, BaseHandler):
    """proxyd's own estimate of a Messages request's prompt, as the metered route would reserve it
    (Ollama has no such route). Authenticated, not metered: no reservation, no ledger row, no upstream
    request, and no image is fetched (an image counts the model's image_tokens whatever it is)."""

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user(MESSAGES.credentials(self.request.headers))

    async def post(self) -> None:
        body = self.json_body()
        model = _model(body)
        check_prompt(body)
        messages, tools, _ = to_chat(body)
        self.send_json({"input_tokens": await self.ctx.tokens.chat_prompt(model, messages, tools)})


class MessagesNotFoundHandler(AnthropicRoute, BaseHandler):
    """Other paths under /v1/messages/ (Anthropic's batches, ...): a 404 in the envelope of the API
    the client speaks there."""

    def prepare(self) -> None:
        raise NotFound(f"Unknown path {self.request.method} {self.request.path}.", code="unknown_url")
