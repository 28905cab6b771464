"""The web dashboard (issue #17): its pages and assets, and the few JSON reads they need beyond the
existing API (usage per day and model, a page of request rows, the admin's user overview, live tiles).

The pages are static files (proxyd/dashboard/) under a strict Content-Security-Policy: scripts and styles
from this origin only, nothing inline, no frames, no form submission. Every figure comes from the JSON API
with the key (user view) or the admin token (admin view) in the Authorization header, sent by the page's
script from sessionStorage: a page without one shows the sign-in form and nothing else.
"""

from __future__ import annotations

import os
from typing import Any

import tornado.web

from .. import reports
from ..errors import InvalidRequest, NotFound
from ..periods import month_key
from ..pricing import usd_str
from ..storage import RequestListing
from .admin import AdminHandler
from .base import _from_http_error
from .openai import ProxyHandler
from .usage import UserAPIHandler, day_range

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dashboard")
PAGES = {"": "user.html", "admin": "admin.html"}
# 'self' only: no inline script or style (the pages hold none), no eval, no frames, no form posts (the
# forms are handled by script; were it ever to fail, a sign-in form must not send the key in a URL).
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
       " base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class DashboardFiles(tornado.web.StaticFileHandler):
    """The pages (/dashboard, /dashboard/admin) and their assets (/dashboard/static/...)."""

    def initialize(self, ctx) -> None:  # noqa: ARG002 - the route table hands every handler the ctx
        super().initialize(path=ASSETS)

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")
        self.clear_header("Server")

    def parse_url_path(self, url_path: str) -> str:
        url_path = url_path.strip("/")
        if url_path in PAGES:
            return PAGES[url_path]
        if not url_path.startswith("static/"):
            raise tornado.web.HTTPError(404)
        return super().parse_url_path(url_path)

    def set_extra_headers(self, path: str) -> None:
        # Pages and scripts change with proxyd's version: revalidate (cheap, ETag) rather than run stale code.
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        err = _from_http_error(status_code, None)
        self.set_header("Content-Type", "application/json")
        self.finish(err.body())


async def daily(handler, user_id: str | None) -> dict[str, Any]:
    ledger = handler.ctx.ledger
    start, end = day_range(handler, month_key(ledger.clock()) + "-01")
    rows = await ledger.usage_by_day_and_model(user_id=user_id, start=start, end=end)
    return reports.daily_usage(rows, start=start, end=end, user_id=user_id)


def _listing(r: RequestListing) -> dict[str, Any]:
    return {"id": r.id, "created_at": r.created_at, "model": r.model, "endpoint": r.endpoint, "status": r.status,
            "http_status": r.http_status, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "cost_usd": usd_str(r.cost_nusd) if r.cost_nusd is not None else None, "latency_ms": r.latency_ms}


async def requests_page(handler, user_id: str) -> dict[str, Any]:
    raw = handler.get_query_argument("limit", "20")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidRequest("'limit' must be a whole number from 1 to 100", param="limit")
    try:
        rows, cursor = await handler.ctx.ledger.user_requests(user_id=user_id, limit=int(raw),
                                                              cursor=handler.get_query_argument("cursor", None))
    except ValueError:
        raise InvalidRequest("'cursor' is not a cursor this API returned (use next_cursor as it is)",
                             param="cursor") from None
    return {"object": "list", "user_id": user_id, "data": [_listing(r) for r in rows], "next_cursor": cursor}


class UserDailyHandler(UserAPIHandler):
    """GET /v1/usage/daily?start&end: the caller's settled usage per day and model (default: this month)."""

    async def get(self) -> None:
        self.send_json(await daily(self, self.caller.user.user_id))


class UserRequestsHandler(UserAPIHandler):
    """GET /v1/requests?limit&cursor: the caller's requests, newest first, a page at a time."""

    async def get(self) -> None:
        self.send_json(await requests_page(self, self.caller.user.user_id))


class AdminDailyHandler(AdminHandler):
    """GET /admin/usage/daily?start&end[&user_id]: usage of everyone (or one user) per day and model."""

    async def get(self) -> None:
        user_id = self.get_query_argument("user_id", None)
        if user_id is not None:
            self.ctx.accounts.get(user_id)  # 404 for an unknown user, as /admin/users/{id}/usage
        self.send_json(await daily(self, user_id))


class AdminUserRequestsHandler(AdminHandler):
    async def get(self, user_id: str) -> None:
        self.ctx.accounts.get(user_id)
        self.send_json(await requests_page(self, user_id))


class AdminOverviewHandler(AdminHandler):
    """GET /admin/overview: every user with this month's requests, tokens and cost (aggregates), the time
    of their newest request (an index probe each), whether they are disabled and their active keys."""

    async def get(self) -> None:
        ledger = self.ctx.ledger
        month = month_key(ledger.clock())
        end = month + "-31"
        sums = {r.key: r for r in await ledger.usage(user_id=None, start=month + "-01", end=end, group_by="user",
                                                      model=None)}
        users = sorted(self.ctx.accounts.users.values(), key=lambda u: u.user_id)
        last = await ledger.last_request_at([u.user_id for u in users])
        data = []
        for user in users:
            s = sums.get(user.user_id)
            row = reports.amounts(*(s[1:] if s else (0, 0, 0, 0)))
            keys = self.ctx.accounts.keys_of(user.user_id)
            data.append({"user_id": user.user_id, "disabled": user.disabled, "created_at": user.created_at,
                         "last_request_at": last.get(user.user_id), "month_to_date": row,
                         "keys": [{"key_id": k.key_id, "prefix": k.prefix, "revoked_at": k.revoked_at}
                                  for k in keys]})
        self.send_json({"object": "list", "period": month, "data": data})


def _subclass_names(cls: type) -> set[str]:
    names, todo = set(), [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    return names


class AdminLiveHandler(AdminHandler):
    """GET /admin/live: cumulative counts from /metrics' own collectors plus the reservations in flight;
    the page turns two snapshots into rates and latency quantiles."""

    async def get(self) -> None:
        metrics = self.ctx.metrics
        if metrics is None:
            raise NotFound("Metrics are disabled (metrics.enabled: false): no live figures.", code="metrics_disabled")
        # The model routes (every ProxyHandler, whatever its dialect): what the tiles call traffic.
        routes = _subclass_names(ProxyHandler)
        self.send_json({"object": "live", "time": self.ctx.ledger.clock(), "in_flight": self.ctx.meter.admission.pending,
                        **metrics.live(routes)})
