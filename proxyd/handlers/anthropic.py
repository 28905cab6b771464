"""Anthropic's routes: ``POST /v1/messages`` (metered, the pipeline's) and ``POST /v1/messages/count_tokens``.

Both take the key from ``x-api-key`` or ``Authorization: Bearer`` and answer every error, from the
missing key to a refusal, in Anthropic's envelope (proxyd/endpoints/anthropic.py). Each answer carries
the request id also as ``request-id``, the header the anthropic SDK reads into ``_request_id``.
"""

from __future__ import annotations

from ..endpoints.anthropic import Messages, check_prompt, to_chat
from ..errors import ProxyError
from ..validate import _model
from .base import BaseHandler
from .openai import ProxyHandler

MESSAGES = Messages()


class MessagesHandler(ProxyHandler):
    endpoint = MESSAGES

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self._headers["request-id"] = self.request_id


class CountTokensHandler(BaseHandler):
    """proxyd's own estimate of a Messages request's prompt, as the metered route would reserve it
    (Ollama has no such route). Authenticated, not metered: no reservation, no ledger row, no upstream
    request, and no image is fetched (an image counts the model's image_tokens whatever it is)."""

    endpoint = MESSAGES

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self._headers["request-id"] = self.request_id

    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user(self.endpoint.credentials(self.request.headers))

    async def post(self) -> None:
        body = self.json_body()
        model = _model(body)
        check_prompt(body)
        messages, tools, _ = to_chat(body)
        self.send_json({"input_tokens": await self.ctx.tokens.chat_prompt(model, messages, tools)})

    def error_body(self, err: ProxyError) -> bytes:
        return self.endpoint.error_body(err)
