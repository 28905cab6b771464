"""The application and how to start one on the running loop."""

from __future__ import annotations

import logging
from typing import Any

import tornado.httpserver
import tornado.netutil
import tornado.web

from .anthropic import MessagesHandler
from .handlers import (
    ChatHandler,
    CompletionsHandler,
    EmbeddingsHandler,
    ModelHandler,
    ModelsHandler,
    NotFoundHandler,
    RootHandler,
    VersionHandler,
)
from .native import ROUTES as NATIVE_ROUTES
from .responses import ResponsesHandler
from .state import EmulatorOptions, EmulatorState

log = logging.getLogger("ollama_emulator")

_BIG_BODY = 1 << 30  # Ollama has no body limit; 1 GiB keeps Tornado out of the way of image tests


def _no_access_log(handler: tornado.web.RequestHandler) -> None:
    """Per-request logging only at DEBUG: load benchmarks must not pay for it."""
    if log.isEnabledFor(logging.DEBUG):
        r = handler.request
        log.debug("%d %s %s %.1fms", handler.get_status(), r.method, r.uri, 1000 * r.request_time())


def make_app(state: EmulatorState) -> tornado.web.Application:
    args = {"state": state}
    return tornado.web.Application(
        [
            (r"/", RootHandler, args),
            (r"/api/version", VersionHandler, args),
            (r"/v1/chat/completions", ChatHandler, args),
            (r"/v1/completions", CompletionsHandler, args),
            (r"/v1/embeddings", EmbeddingsHandler, args),
            (r"/v1/responses", ResponsesHandler, args),
            (r"/v1/models", ModelsHandler, args),
            (r"/v1/models/([^/]+)", ModelHandler, args),
            *((pattern, handler, args) for pattern, handler in NATIVE_ROUTES),
            (r"/v1/messages", MessagesHandler, args),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=args,
        log_function=_no_access_log,
    )


async def start_emulator(
    port: int = 0, address: str = "127.0.0.1", **option_overrides: Any
) -> tuple[tornado.httpserver.HTTPServer, int, EmulatorState]:
    """Starts an emulator on the running loop; port 0 picks a free port. Stop with server.stop()
    (and ``state.tokens.close()`` for its tokenizer threads)."""
    state = EmulatorState(EmulatorOptions(**option_overrides))
    app = make_app(state)
    server = tornado.httpserver.HTTPServer(app, max_body_size=_BIG_BODY, max_buffer_size=_BIG_BODY)
    sockets = tornado.netutil.bind_sockets(port, address)
    server.add_sockets(sockets)
    state.bound_address = sockets[0].getsockname()[0]
    return server, sockets[0].getsockname()[1], state
