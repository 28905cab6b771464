"""POST /v1/responses: OpenAI's Responses API, a metered route of the pipeline like chat completions."""

from __future__ import annotations

from ..endpoints.responses import Responses
from .openai import ProxyHandler


class ResponsesHandler(ProxyHandler):
    endpoint = Responses()
