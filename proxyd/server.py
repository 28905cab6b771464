"""Building the application: the objects handlers share (``Context``) and the route table.

Handlers receive the Context through ``initialize(ctx=...)`` from the route table: no globals, so
tests build as many independent proxies as they like in one process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import tornado.web

from .accounts import Accounts
from .backends import Router
from .backends.ollama import OllamaBackend
from .backends.openai_compat import OpenAICompatBackend
from .config import BY_KEY, Config, ConfigError
from .errors import InvalidRequest
from .handlers import admin, dashboard, native, openai, usage
from .handlers import anthropic as anthropic_handlers
from .handlers.base import BaseHandler, NotFoundHandler
from .handlers.responses import ResponsesHandler
from .limits import Limiter, MemoryAdmission
from .limitspec import parse_limits
from .meter import Meter
from .metrics import Metrics
from .modelname import canonical_keys
from .pricing import PriceTable
from .storage import Ledger
from .storage.sqlite import SQLiteStorage
from .tokens import ENCODINGS, TEMPLATES, TokenCounter
from .upstream import Upstream

log = logging.getLogger("proxyd")
access = logging.getLogger("proxyd.access")


@dataclass
class Context:
    config: Config
    ledger: Ledger
    accounts: Accounts
    meter: Meter
    tokens: TokenCounter
    upstream: Upstream
    images: Any  # proxyd.images.ImageInliner
    metrics: Metrics | None
    in_flight: int = 0
    shutting_down: bool = False
    router: Router | None = None  # picks the backend of a model (proxyd/backends/)
    upstream_kind: str = "ollama"  # what the admin view of /healthz calls the upstream (app.py --demo: "emulator")

    @property
    def open_per_key(self) -> dict[str, set]:
        """key id -> its open requests (the admission's ``OpenRequests``)."""
        return self.meter.admission.open_requests.by_key

    def cut_off(self, make_error: Callable[[], Any], reason: str, key_ids: Any = None) -> int:
        """Ends the running requests of ``key_ids`` (all keys if None) with a fresh ``make_error()`` each;
        returns how many were told. Used by the admin API (revoked key, disabled user) and the shutdown."""
        handlers = self.meter.admission.open_requests.of(key_ids)
        for handler in handlers:
            handler.cut_off(make_error(), reason)
        return len(handlers)

    def model_spec(self, model: str) -> dict[str, Any]:
        return self.tokens.spec(model)

    def cors_allows(self, origin: str) -> bool:
        allowed = self.config["server.cors_origins"]
        return bool(allowed) and ("*" in allowed or origin in allowed)

    def access_log(self, handler: BaseHandler) -> None:
        status = handler.get_status()
        seconds = handler.request.request_time()
        model = handler.log_fields.get("model", "")
        if self.metrics is not None:
            self.metrics.observe_request(type(handler).__name__, status, model, seconds)
        if self.config["logging.access_log"] and access.isEnabledFor(logging.INFO):
            access.info(
                json.dumps(
                    {
                        "ts": round(time.time(), 3),
                        "request_id": handler.request_id,
                        "method": handler.request.method,
                        "path": handler.request.path,
                        "status": status,
                        "ms": round(seconds * 1000, 1),
                        **handler.log_fields,
                    },
                    separators=(",", ":"),
                )
            )


def parse_config_limits(raw: dict[str, Any]) -> dict[str, Any]:
    """limits: {default: {...}, models: {model: {...}}, users: {user: {...}}} -> parsed (nano-USD)."""
    unknown = set(raw) - {"default", "models", "users"}
    if unknown:
        raise ConfigError(f"config: unknown key 'limits.{sorted(unknown)[0]}'")
    try:
        return {
            "default": parse_limits(raw.get("default"), "limits.default"),
            "models": canonical_keys({m: parse_limits(v, f"limits.models.{m}", allow_models=False)
                                      for m, v in (raw.get("models") or {}).items()}, "limits.models", per_model=True),
            "users": {u: parse_limits(v, f"limits.users.{u}") for u, v in (raw.get("users") or {}).items()},
        }
    except InvalidRequest as exc:
        raise ConfigError(f"config: {exc.message}") from None
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None


def check_structures(config: Config) -> None:
    """Validates the dict-typed settings (limits, pricing); raises ConfigError naming the key."""
    parse_config_limits(config["limits"])
    PriceTable(config["pricing"], {u["name"]: u["pricing"] for u in config["upstreams"]})
    try:
        canonical_keys(config["models"], "config: models")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for name, spec in {**config["models"], "model_defaults": config["model_defaults"]}.items():
        unknown = set(spec) - {"tokenizer", "template", "image_tokens", "context_window", "default_max_tokens"}
        if unknown:
            raise ConfigError(f"config: unknown key 'models.{name}.{sorted(unknown)[0]}'")
        if spec.get("tokenizer", "llama3") not in ENCODINGS:
            raise ConfigError(f"config: models.{name}.tokenizer must be one of {sorted(ENCODINGS)}")
        if spec.get("template", "generic") not in TEMPLATES:
            raise ConfigError(f"config: models.{name}.template must be one of {sorted(TEMPLATES)}")


def upstream_specs(config: Config) -> list[dict[str, Any]]:
    """The configured upstreams (parsed by config.parse_upstreams); without any, the old upstream.url
    as one Ollama named "default"."""
    if config["upstreams"]:
        if config["upstream.url"] != BY_KEY["upstream.url"].default:
            log.warning("upstreams is set: upstream.url (%s) is not used", config["upstream.url"])
        return config["upstreams"]
    return [{"name": "default", "url": config["upstream.url"], "kind": "ollama", "api_key": None, "headers": {},
             "models": None, "weight": 1.0, "max_in_flight": None, "pricing": {}}]


def build_admission(config: Config, ledger: Ledger, clock: Callable[[], float]) -> Any:
    """The Admission port: in memory (one process), or shared by several over Redis."""
    per_key = config["server.max_connections_per_key"]
    if config["admission.backend"] == "redis":
        from .redis_admission import RedisAdmission  # redis-py loads only when configured

        return RedisAdmission(config["admission.url"], ledger=ledger, connections_per_key=per_key,
                              key_prefix=config["admission.key_prefix"], lease_s=config["admission.lease_s"])
    return MemoryAdmission(Limiter(clock=clock), connections_per_key=per_key)


def build_context(config: Config, *, clock: Callable[[], float] = time.time, image_resolver=None) -> Context:
    """Opens the storage (migrations, crash recovery) and builds every shared object. Synchronous."""
    # Imported here: Pillow and aiohttp load only when a proxy is actually built.
    from .images import ImageInliner, ImagePolicy, upstream_endpoints

    config_limits = parse_config_limits(config["limits"])
    prices = PriceTable(config["pricing"], {u["name"]: u["pricing"] for u in config["upstreams"]})
    for warning in prices.check_start([*config["models"], *config_limits["models"]]):
        log.warning("%s", warning)
    # One storage holds both ports (proxyd/storage/): the Ledger and the AccountStore.
    storage = open_storage(config, clock)
    if config["database.backend"] == "postgres" and config["admission.backend"] == "memory":
        log.warning("database.backend postgres with admission.backend memory: limits are counted in this process, "
                    "exact only while it is the only instance on this database (README 'Several instances')")
    storage.open()
    expired = storage.expire_stale_pending()
    if expired:
        log.warning("expired %d reservations left pending by an earlier crash", expired)
    accounts = Accounts(storage, clock=clock)
    accounts.load(lambda raw: parse_limits(raw, "stored limits", stored=True))
    metrics = Metrics(per_user_labels=config["metrics.per_user_labels"]) if config["metrics.enabled"] else None
    admission = build_admission(config, storage, clock)
    meter = Meter(
        admission=admission,
        ledger=storage,
        prices=prices,
        config_limits=config_limits,
        min_completion_tokens=config["estimate.min_completion_tokens"],
        pending_row_after_s=config["database.pending_row_after_s"],
        metrics=metrics,
    )
    meter.load_usage()
    if metrics is not None:
        metrics.bind(
            in_flight=lambda: admission.pending,
            queue_depth=lambda: storage.queue_depth,
            commit_s=lambda: storage.last_commit_s,
            commits=lambda: (storage.commits, storage.writes),
        )
    tokens = TokenCounter(config["models"], config["model_defaults"])
    specs = upstream_specs(config)
    upstreams = [Upstream(
        spec["url"],
        connect_timeout_s=config["upstream.connect_timeout_s"],
        first_byte_timeout_s=config["upstream.first_byte_timeout_s"],
        idle_timeout_s=config["upstream.idle_timeout_s"],
        pool_size=config["upstream.pool_size"],
        max_response_bytes=config["upstream.max_response_bytes"],
        headers={**({"Authorization": "Bearer " + spec["api_key"]} if spec["api_key"] else {}), **spec["headers"]},
        health_path="/api/version" if spec["kind"] == "ollama" else "/models",
    ) for spec in specs]
    upstream = upstreams[0]
    img = config.section("images")
    policy = ImagePolicy(
        allow_private_networks=img["allow_private_networks"],
        max_bytes=img["max_bytes"],
        timeout_s=img["timeout_s"],
        connect_timeout_s=img["connect_timeout_s"],
        max_redirects=img["max_redirects"],
        max_dimension=img["max_dimension"],
        max_images=img["max_images"],
        max_pixels=img["max_pixels"],
        max_pixels_per_request=img["max_pixels_per_request"],
        decode_memory_bytes=img["decode_memory_bytes"],
        deny_networks=tuple(img["deny_networks"]),
        deny_endpoints=tuple(e for spec in specs for e in upstream_endpoints(spec["url"])),
    )
    images = ImageInliner(policy, resolver=image_resolver)
    kinds = {"ollama": OllamaBackend, "openai": OpenAICompatBackend}
    backends = [kinds[spec["kind"]](up, images, spec["name"]) for up, spec in zip(upstreams, specs)]
    router = Router(backends, specs, legacy=not config["upstreams"], max_attempts=config["upstream.max_attempts"],
                    probe_interval_s=config["upstream.probe_interval_s"],
                    failures_to_eject=config["upstream.failures_to_eject"], cooldown_s=config["upstream.cooldown_s"],
                    models_refresh_s=config["upstream.models_refresh_s"])
    if metrics is not None:
        metrics.bind_upstreams(router)
    ctx = Context(config, storage, accounts, meter, tokens, upstream, images, metrics, router=router)
    watch = getattr(storage, "watch", None)
    if watch is not None:  # a store other instances change too (SharedAccountStore): follow their changes
        async def changed(user_id: str | None) -> None:
            for key_ids, make_error, reason in await accounts.refresh(user_id):
                ctx.cut_off(make_error, reason, key_ids)

        watch(changed)
    return ctx


def open_storage(config: Config, clock: Callable[[], float]) -> Any:
    """The configured storage, not yet opened: the embedded SQLite file, or a PostgreSQL database."""
    if config["database.backend"] == "postgres":
        from .storage.postgres import PostgresStorage  # asyncpg loads only when configured

        return PostgresStorage(config["database.dsn"], batch_max=config["database.batch_max"],
                               write_wait_s=config["database.write_wait_s"],
                               instance_stale_s=config["database.instance_stale_s"], clock=clock)
    return SQLiteStorage(config["database.path"], synchronous=config["database.synchronous"],
                         batch_max=config["database.batch_max"], clock=clock)


class HealthHandler(BaseHandler):
    """200 when the upstream answers, 503 (same JSON body) when it does not: probes that read only the
    status code notice. Anonymous callers get the status and the reachable flag; the upstream's address,
    its error text, the queues and the warnings (models billed at 0) need the admin token. A wrong token
    is a 401, not a smaller answer, so a misconfigured probe is noticed too."""

    async def get(self) -> None:
        admin = "Authorization" in self.request.headers
        if admin:
            self.authenticate_admin()
        router = self.ctx.router
        # Probed now (each probe also feeds the upstream's health state, as the background probe does).
        results = await asyncio.gather(*(router.probe(b) for b in router.backends))
        ok = any(r[0] for r in results)  # proxyd serves while one upstream does
        upstream: dict[str, Any] = {"reachable": ok}
        all_up = all(r[0] for r in results) and all(b.state.state == "up" for b in router.backends)
        body: dict[str, Any] = {"status": "ok" if ok and all_up else "degraded", "upstream": upstream}
        admission = self.ctx.meter.admission
        if hasattr(admission, "health"):  # a shared admission: not ready while Redis is away or being rebuilt
            ready, why = await admission.health()
            body["admission"] = {"ready": ready, "detail": why}
            if not ready:
                ok, body["status"] = False, "degraded"
        if admin:
            # ``upstream`` is the first one (the only one without ``upstreams``), as before; the list has them all.
            upstream.update(url=self.ctx.upstream.base_url, kind=self.ctx.upstream_kind, detail=results[0][1])
            body.update(reservations_in_flight=self.ctx.meter.admission.pending,
                        ledger_queue_depth=self.ctx.ledger.queue_depth, warnings=self.ctx.meter.prices.warnings(),
                        upstreams=[{**b.state.as_json(), "url": b.upstream.base_url, "reachable": r[0], "detail": r[1]}
                                   for b, r in zip(router.backends, results)],
                        ledger_unavailable=self.ctx.ledger.unavailable)  # a shared ledger down: requests get 503
        self.send_json(body, 200 if ok else 503)


class OpenAPIHandler(BaseHandler):
    """The OpenAPI document of every endpoint, for clients and fuzzers. It lives in the package
    (proxyd/openapi.yaml; docs/openapi.yaml is a link to it) so that an installed proxyd serves it too."""

    PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.yaml")

    async def get(self) -> None:
        with open(self.PATH, "rb") as fh:
            self.set_header("Content-Type", "application/yaml")
            self.finish(fh.read())


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        if self.ctx.metrics is None:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish(self.ctx.metrics.render())


def api_routes() -> list[tuple[str, type]]:
    v1 = r"/(?:v1/)?"  # the brief's base_url has no /v1, so every route is served both ways
    return [
        (v1 + r"chat/completions", openai.ChatCompletionsHandler),
        (v1 + r"completions", openai.CompletionsHandler),
        (v1 + r"embeddings", openai.EmbeddingsHandler),
        (v1 + r"responses", ResponsesHandler),
        (v1 + r"models", openai.ModelsHandler),
        (v1 + r"models/(.+)", openai.ModelsHandler),
        (v1 + r"messages", anthropic_handlers.MessagesHandler),  # Anthropic's Messages API (issue #14)
        (v1 + r"messages/count_tokens", anthropic_handlers.CountTokensHandler),
        (v1 + r"messages/.*", anthropic_handlers.MessagesNotFoundHandler),
        (v1 + r"usage", usage.UsageHandler),
        (v1 + r"limits", usage.LimitsHandler),
        (v1 + r"billing/invoices", usage.InvoiceHandler),
        (v1 + r"usage/daily", dashboard.UserDailyHandler),
        (v1 + r"requests", dashboard.UserRequestsHandler),
        (r"/healthz", HealthHandler),
        (r"/metrics", MetricsHandler),
        (r"/openapi.yaml", OpenAPIHandler),
        *native.routes(),  # Ollama's native API (/api/...)
    ]


def admin_routes() -> list[tuple[str, type]]:
    return [
        (r"/admin/users", admin.UsersHandler),
        (r"/admin/users/([^/]+)", admin.UserHandler),
        (r"/admin/users/([^/]+)/keys", admin.UserKeysHandler),
        (r"/admin/users/([^/]+)/limits", admin.UserLimitsHandler),
        (r"/admin/users/([^/]+)/usage", admin.UserUsageHandler),
        (r"/admin/keys/([^/]+)", admin.KeyHandler),
        (r"/admin/usage", admin.AllUsageHandler),
        (r"/admin/invoices", admin.InvoicesHandler),
        (r"/admin/ledger/check", admin.ConsistencyHandler),
        (r"/admin/usage/daily", dashboard.AdminDailyHandler),
        (r"/admin/users/([^/]+)/requests", dashboard.AdminUserRequestsHandler),
        (r"/admin/overview", dashboard.AdminOverviewHandler),
        (r"/admin/live", dashboard.AdminLiveHandler),
    ]


def dashboard_routes() -> list[tuple[str, type]]:
    """The dashboard's pages and assets (issue #17), on every port that serves an API."""
    return [(r"/dashboard/?()", dashboard.DashboardFiles), (r"/dashboard/(.+)", dashboard.DashboardFiles)]


def make_app(ctx: Context, *, api: bool = True, admin_api: bool = True) -> tornado.web.Application:
    routes = (api_routes() if api else []) + (admin_routes() if admin_api else []) + dashboard_routes()
    return tornado.web.Application(
        [(pattern, handler, {"ctx": ctx}) for pattern, handler in routes],
        default_handler_class=NotFoundHandler,
        default_handler_args={"ctx": ctx},
        log_function=lambda handler: None,  # the JSON access log replaces Tornado's line
    )
