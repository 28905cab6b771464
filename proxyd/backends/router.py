"""The Router: which upstream serves a request, and what it learnt of each (health, models, load).

    pick(model)            a backend serving the model, or None (then ``pick_fresh``: refresh, else 404)
    acquire(model, tried)  the one to send to now: healthy, serving it, with room, the fewest requests
                           in flight per unit of weight (ties at random), Ollama's with the model loaded
                           first; its in-flight count taken. None once every candidate was tried.
    release(backend, failed, first_byte_s)   the count given back; a failure or success for its health

With the old single ``upstream.url`` (``legacy``) every model goes to that one Ollama, which answers for
itself (an unknown model is its 404, as before routing existed): ``pick`` and ``acquire`` take a fast
path without the model lists. The active probe, the model lists and /api/ps run in one background task
(``start``), never on a request's path; a model no list has triggers one refresh (at most one a second)
before the 404, so a model just pulled is found.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from ..errors import InvalidRequest, NotFound, ServiceUnavailable
from .health import DOWN, UP, UpstreamState

log = logging.getLogger("proxyd.upstreams")

MAX_CACHED_MODELS = 10_000  # model -> candidates, for names clients send: bounded


class Router:
    def __init__(self, backends: list[Any], specs: list[dict[str, Any]] | None = None, *, legacy: bool = True,
                 max_attempts: int = 1, probe_interval_s: float = 2.0, failures_to_eject: int = 3,
                 cooldown_s: float = 5.0, models_refresh_s: float = 60.0) -> None:
        self.backends = backends
        self.default = backends[0]
        for backend, spec in zip(backends, specs or [{"name": b.upstream_name, "kind": b.name, "url": ""}
                                                     for b in backends]):
            backend.state = UpstreamState(spec)
            if spec.get("models") is not None:
                backend.state.listed = list(spec["models"])
                backend.state.models = {backend.model_key(m) for m in spec["models"]}
        self.legacy = legacy
        self.single = backends[0] if legacy and len(backends) == 1 else None
        self.max_attempts = max_attempts
        self.probe_interval_s = probe_interval_s
        self.failures_to_eject = failures_to_eject
        self.cooldown_s = cooldown_s
        self.models_refresh_s = models_refresh_s
        self._serving: dict[str, list[Any]] = {}
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Future | None = None
        self._models_at = -1e9

    # -- the request path -------------------------------------------------------------------------------

    def pick(self, model: str, operation: str = "chat") -> Any:
        """A backend serving the model (for its image policy and estimate; ``acquire`` chooses which one
        forwards), None if no list has it. A model served only by upstreams of another kind of API (Ollama's
        native /api on an openai-kind upstream) is a 400 here, before any reservation."""
        if self.single is not None:
            return self.single
        candidates = self._serving.get(model) or self._candidates(model)
        return self._taking(candidates, model, operation) if candidates else None

    async def pick_fresh(self, model: str, asked: str, operation: str = "chat") -> Any:
        """The miss path: no list has the model. One refresh (shared, at most one a second), then 404."""
        if time.monotonic() - self._models_at > 1.0:
            await self.refresh_models()
        candidates = self._candidates(model)
        if not candidates:
            raise NotFound(f"The model `{asked}` does not exist or you do not have access to it.",
                           code="model_not_found", param="model")
        return self._taking(candidates, model, operation)

    @staticmethod
    def _taking(candidates: list[Any], model: str, operation: str) -> Any:
        for backend in candidates:
            if operation in backend.paths:
                return backend
        raise InvalidRequest(f"No upstream serving {model} takes this API.", param="model", code="unsupported_api")

    def foreign_model(self, raw: str) -> str | None:
        """A name Ollama's rules refuse, as an openai-kind upstream lists it (its key), else None."""
        for backend in self.backends:
            models = backend.state.models
            if backend.name != "ollama" and (models is None or raw in models):
                return raw
        return None

    def acquire(self, model: str, tried: list[Any] | None, operation: str = "chat") -> Any:
        single = self.single
        if single is not None:
            if tried:
                return None
            state = single.state
            state.in_flight += 1
            state.requests += 1
            return single
        now = time.monotonic()
        best = best_key = fallback = None
        ties = 0
        full = False
        for backend in self._serving.get(model) or self._candidates(model):
            if tried and backend in tried or operation not in backend.paths:
                continue  # tried already, or another kind of API (Ollama's native /api on an openai-kind one)
            s = backend.state
            if s.max_in_flight is not None and s.in_flight >= s.max_in_flight:
                full = True
                continue
            if not s.available(now):
                if fallback is None or s.until < fallback.state.until:
                    fallback = backend
                continue
            # A cold load takes seconds to minutes: an Ollama with the model in memory first.
            key = (s.loaded is not None and model not in s.loaded, s.in_flight / s.weight)
            if best is None or key < best_key:
                best, best_key, ties = backend, key, 1
            elif key == best_key:
                ties += 1
                if random.random() * ties < 1.0:  # each of the tied equally likely (reservoir sampling)
                    best = backend
        if best is None:
            # Every untried candidate is cooling down: the one back soonest rather than an error unheard.
            best = fallback
            if best is None:
                if tried:
                    return None
                if full:
                    raise ServiceUnavailable("Every upstream serving this model is at its max_in_flight; retry shortly.",
                                             code="upstreams_busy", headers={"Retry-After": "1"})
                raise InvalidRequest(f"No upstream serving {model} takes this API.", param="model",
                                     code="unsupported_api")
        s = best.state
        s.in_flight += 1
        s.requests += 1
        if s.state is not UP:
            s.trial_busy = True  # the one trial request after a cool-down
        return best

    def release(self, backend: Any, failed: bool, first_byte_s: float | None = None, detail: str = "") -> None:
        s = backend.state
        s.in_flight -= 1
        if first_byte_s is not None:
            s.latency_s += first_byte_s
            s.answered += 1
        if failed:
            s.errors += 1
            s.failed(time.monotonic(), self.failures_to_eject, self.cooldown_s, detail)
        elif s.failures or s.state is not UP:
            s.succeeded(time.monotonic())

    def _candidates(self, model: str) -> list[Any]:
        found = [b for b in self.backends if b.state.models is None or model in b.state.models]
        if found:
            if len(self._serving) >= MAX_CACHED_MODELS:
                self._serving.clear()
            self._serving[model] = found
        return found

    # -- what the upstreams serve ---------------------------------------------------------------------

    def served_models(self) -> list[str]:
        """The union of the lists, for /v1/models (as each upstream names them)."""
        seen: dict[str, None] = {}
        for backend in self.backends:
            for name in backend.state.listed:
                seen.setdefault(name, None)
        return list(seen)

    async def refresh_models(self) -> None:
        """Asks every upstream without a configured list for its models; one refresh at a time."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            await asyncio.gather(*(self._discover(b) for b in self.backends if not b.state.fixed_models))
            self._models_at = time.monotonic()
            self._serving.clear()
        finally:
            self._refreshing.set_result(None)
            self._refreshing = None

    async def _discover(self, backend: Any) -> None:
        try:
            listed = await backend.list_models()
        except Exception as exc:  # unreachable now: keep what it served before (None at start)
            log.info("upstream %s: model list unavailable (%s)", backend.upstream_name, str(exc) or type(exc).__name__)
            return
        backend.state.listed = listed
        backend.state.models = {backend.model_key(m) for m in listed}

    # -- health ----------------------------------------------------------------------------------------

    async def probe(self, backend: Any) -> tuple[bool, str]:
        ok, detail = await backend.health()
        s, now = backend.state, time.monotonic()
        if ok:
            if s.state is DOWN and now < s.until:
                pass  # cooling down: the probe after it is the trial
            else:
                s.succeeded(now)
            if self.single is None and backend.name == "ollama":
                try:
                    s.loaded = await backend.loaded_models()
                except Exception:
                    s.loaded = None
        else:
            s.failed(now, self.failures_to_eject, self.cooldown_s, f"probe: {detail}")
        return ok, detail

    async def start(self) -> None:
        """The first model lists and probes (awaited: routing needs them; each is bounded by its timeout),
        then the probe loop in the background."""
        if self._task is not None:
            return
        if not self.legacy:
            await asyncio.gather(self.refresh_models(), *(self.probe(b) for b in self.backends))
        self._task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await asyncio.gather(*(self.probe(b) for b in self.backends))
                if not self.legacy and time.monotonic() - self._models_at > self.models_refresh_s:
                    await self.refresh_models()
            except Exception:
                log.exception("upstream probe failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for backend in self.backends:
            await backend.upstream.close()
