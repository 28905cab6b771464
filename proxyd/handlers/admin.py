"""The admin API (Bearer admin token): users, keys, limits, usage and invoices of everyone."""

from __future__ import annotations

import re
from typing import Any

from .. import reports
from ..errors import AuthError, InvalidRequest, PermissionDenied
from ..limitspec import parse_limits, to_api
from .base import BaseHandler
from .usage import day_range, invoice_period, usage_query

USER_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


class AdminHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        self.authenticate_admin()

    def user_view(self, user) -> dict[str, Any]:
        return {
            "user_id": user.user_id,
            "created_at": user.created_at,
            "disabled": user.disabled,
            "limit_overrides": to_api(user.overrides),
            "keys": [
                {"key_id": k.key_id, "prefix": k.prefix, "created_at": k.created_at, "revoked_at": k.revoked_at}
                for k in self.ctx.accounts.keys_of(user.user_id)
            ],
        }


class UsersHandler(AdminHandler):
    async def get(self) -> None:
        users = sorted(self.ctx.accounts.users.values(), key=lambda u: u.user_id)
        self.send_json({"object": "list", "data": [self.user_view(u) for u in users]})

    async def post(self) -> None:
        body = self.json_body()
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not USER_ID.fullmatch(user_id):
            raise InvalidRequest("'user_id' must be 1-128 characters of letters, digits, _ . @ -", param="user_id")
        unknown = set(body) - {"user_id", "limits"}
        if unknown:
            raise InvalidRequest(f"unknown field '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
        raw = body.get("limits")
        overrides = parse_limits(raw, "limits")
        user, key, key_id = await self.ctx.accounts.create_user(user_id, overrides, raw)
        self.send_json({"user_id": user.user_id, "api_key": key, "key_id": key_id}, status=201)


class UserHandler(AdminHandler):
    async def get(self, user_id: str) -> None:
        user = self.ctx.accounts.get(user_id)
        self.send_json({**self.user_view(user), "effective_limits": to_api(self.ctx.meter.effective(user))})

    async def patch(self, user_id: str) -> None:
        body = self.json_body()
        if set(body) != {"disabled"} or not isinstance(body["disabled"], bool):
            raise InvalidRequest("PATCH takes exactly {\"disabled\": true|false}", param="disabled")
        user = await self.ctx.accounts.set_disabled(user_id, body["disabled"])
        if user.disabled:
            # New requests get 403 from authenticate(); the running ones (a long stream) end now too,
            # billed for what they relayed, with the same error in the stream.
            keys = [k.key_id for k in self.ctx.accounts.keys_of(user_id)]
            self.ctx.cut_off(lambda: PermissionDenied(f"User {user_id} is disabled.", code="user_disabled"),
                             "user_disabled", keys)
        self.send_json(self.user_view(user))


class UserKeysHandler(AdminHandler):
    async def post(self, user_id: str) -> None:
        key, key_id = await self.ctx.accounts.add_key(user_id)
        self.send_json({"user_id": user_id, "api_key": key, "key_id": key_id}, status=201)


class KeyHandler(AdminHandler):
    async def delete(self, key_id: str) -> None:
        await self.ctx.accounts.revoke_key(key_id)
        # New requests get 401 from authenticate(); the running ones end now, billed for what they relayed.
        self.ctx.cut_off(lambda: AuthError("This API key was revoked."), "key_revoked", [key_id])
        self.set_status(204)
        self.clear_header("Content-Type")
        self.finish()


class UserLimitsHandler(AdminHandler):
    """PUT replaces the user's overrides; GET shows overrides and effective limits; DELETE clears them."""

    async def view(self, user) -> dict[str, Any]:
        return {
            "user_id": user.user_id,
            "overrides": to_api(user.overrides),
            "effective": to_api(self.ctx.meter.effective(user)),
            "status": await self.ctx.meter.limit_status(user),
        }

    async def get(self, user_id: str) -> None:
        self.send_json(await self.view(self.ctx.accounts.get(user_id)))

    async def put(self, user_id: str) -> None:
        self.ctx.accounts.get(user_id)
        raw = self.json_body()
        overrides = parse_limits(raw, "limits")
        user = await self.ctx.accounts.set_overrides(user_id, overrides, raw)
        self.send_json(await self.view(user))

    async def delete(self, user_id: str) -> None:
        user = await self.ctx.accounts.set_overrides(user_id, {}, None)
        self.send_json(await self.view(user))


class UserUsageHandler(AdminHandler):
    async def get(self, user_id: str) -> None:
        self.ctx.accounts.get(user_id)
        self.send_json(await usage_query(self, user_id=user_id))


class AllUsageHandler(AdminHandler):
    async def get(self) -> None:
        self.send_json(await usage_query(self, user_id=None, default_group="user"))


class InvoicesHandler(AdminHandler):
    async def get(self) -> None:
        period = invoice_period(self)
        user_id = self.get_query_argument("user_id", None)
        ledger = self.ctx.ledger
        lines = await ledger.invoice_lines(period=period, user_id=user_id)
        data = reports.invoices(lines, period=period, user_id=user_id, now=ledger.clock())
        self.send_json({"object": "list", "period": period, "data": data})


class ConsistencyHandler(AdminHandler):
    async def get(self) -> None:
        # ?start=YYYY-MM-DD[&end=YYYY-MM-DD] checks only those days (end defaults to today): on a large
        # ledger, checking yesterday reads one day's rows (~0.1 s for 33k) where the whole ledger takes seconds.
        if self.get_query_argument("start", None) is not None:
            start, end = day_range(self, None)
        elif self.get_query_argument("end", None) is not None:
            raise InvalidRequest("'end' needs 'start' (without both, the whole ledger is checked)", param="end")
        else:
            start = end = None
        result = await self.ctx.ledger.check(start=start, end=end)
        result["reserved_in_flight"] = self.ctx.meter.admission.pending
        self.send_json(result)
