"""Any OpenAI-compatible server as an upstream (``kind: openai``): OpenAI, OpenRouter, vLLM, llama.cpp's
server, another proxyd.

Its ``url`` is the API's base as the OpenAI SDK takes it (``https://openrouter.ai/api/v1``,
``http://gpu-box:8080/v1``): the operations' paths follow it directly. Its credential is the one from
its ``api_key_env``, sent as ``Authorization: Bearer`` with every request (the Upstream's fixed headers):
the client's key is never forwarded. Model names are the server's own (``openai/gpt-4o-mini``,
``Qwen/Qwen2.5-7B-Instruct``), not Ollama's: an id the server lists is served under that id.

Differences from Ollama that matter here: an upstream 401/403 is proxyd's credential being refused,
not the client's (a 502 to the client, whose own key was fine); a server may report the request's cost
(OpenRouter's ``usage.cost``, in USD), which is billed as reported (``reports_cost``).
"""

from __future__ import annotations

from typing import Any

from ..errors import ProxyError, UpstreamError
from ..modelname import canonical
from ..sse import SSEParser
from ..upstream import Upstream
from .ollama import OllamaBackend


class OpenAICompatBackend:
    name = "openai"
    reports_cost = True
    paths = {
        "chat": "/chat/completions",
        "completions": "/completions",
        "embeddings": "/embeddings",
        "models": "/models",
    }

    def __init__(self, upstream: Upstream, images: Any, upstream_name: str) -> None:
        self.upstream = upstream
        self.upstream_name = upstream_name
        self.images = images  # inlined as for Ollama: every OpenAI-compatible server takes data URLs
        self.open = upstream.request
        self.health = upstream.health
        self.state: Any = None

    @staticmethod
    def stream_parser(operation: str) -> SSEParser:
        return SSEParser()

    # The usage chunk is the one without choices, as at Ollama (OpenAI, OpenRouter and vLLM alike).
    stream_usage = staticmethod(OllamaBackend.stream_usage)

    @staticmethod
    def canonical_model(name: str) -> str:
        return name

    @staticmethod
    def model_key(name: str) -> str:
        """Ollama's canonical form where the name is one by Ollama's rules (so ``pricing`` and
        ``limits.models`` keys match it as they match Ollama's), else the server's id as it is."""
        return canonical(name) or name

    async def list_models(self) -> list[str]:
        doc = await self.upstream.get_json(self.paths["models"])
        return [str(m["id"]) for m in doc.get("data") or () if isinstance(m, dict) and m.get("id")]

    async def loaded_models(self) -> None:
        return None  # nothing to prefer: a hosted API has no cold loads proxyd can see

    @staticmethod
    def error(status: int, raw: bytes) -> ProxyError:
        if status in (401, 403):
            # proxyd's credential for this upstream was refused: the client's own key was fine, and an
            # AuthenticationError would tell it otherwise.
            return UpstreamError("The upstream refused proxyd's credentials.", status=502, type="api_error",
                                 detail=raw.decode("utf-8", "replace")[:300])
        err = OllamaBackend.error(status, raw)
        if status == 429:
            err.headers.setdefault("Retry-After", "1")
        return err

