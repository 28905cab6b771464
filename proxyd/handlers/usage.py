"""A user's own view (their API key): usage, limits, invoices. A user never sees another's data:
every query is bound to the authenticated caller's user id, never to a parameter."""

from __future__ import annotations

import datetime
import re
import time
from typing import Any

from .. import reports
from ..errors import InvalidRequest
from ..limitspec import to_api
from ..modelname import canonical
from ..periods import day_key, month_key
from .base import BaseHandler

DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")  # not \d: it matches other scripts' digits too
MONTH = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")


def day_range(handler: BaseHandler, default_start: str | None) -> tuple[str | None, str]:
    """``start`` and ``end`` query arguments: real calendar days (YYYY-MM-DD), end defaulting to today
    and not before start (today by the injected clock). A missing start is ``default_start``."""
    today = day_key(handler.ctx.ledger.clock())
    start = handler.get_query_argument("start", default_start)
    end = handler.get_query_argument("end", today)
    for name, value in (("start", start), ("end", end)):
        if value is not None and not _is_day(value):
            raise InvalidRequest(f"'{name}' must be a date YYYY-MM-DD", param=name)
    if start is not None and start > end:
        raise InvalidRequest("'start' must not be after 'end'", param="start")
    return start, end


def _is_day(value: str) -> bool:
    if not DAY.match(value):
        return False
    try:  # the pattern lets 2026-02-30 and 0000-00-00 through
        datetime.date.fromisoformat(value)
    except ValueError:
        return False
    return True


async def usage_query(handler: BaseHandler, *, user_id: str | None, default_group: str = "model") -> dict[str, Any]:
    ledger = handler.ctx.ledger
    start, end = day_range(handler, month_key(ledger.clock()) + "-01")  # by default this month so far
    group_by = handler.get_query_argument("group_by", default_group)
    # Users see their usage by model, day and dialect; which upstream served it is the operator's concern.
    allowed = ("model", "day", "endpoint") if user_id is not None else ("model", "day", "user", "endpoint", "upstream")
    if group_by not in allowed:
        raise InvalidRequest(f"'group_by' must be one of {', '.join(allowed)}", param="group_by")
    model = handler.get_query_argument("model", None)
    if model is not None:
        model = canonical(model)  # as the ledger records it (proxyd/modelname.py)
    rows = await ledger.usage(user_id=user_id, start=start, end=end, group_by=group_by, model=model)
    result = reports.usage(rows, start=start, end=end, group_by=group_by)
    if user_id is not None:
        result["user_id"] = user_id
    return result


def invoice_period(handler: BaseHandler) -> str:
    period = handler.get_query_argument("period", None)
    if period is None:
        # Billing is in arrears: by default the last closed month (by the injected clock).
        g = time.gmtime(handler.ctx.ledger.clock())
        period = f"{g.tm_year - 1}-12" if g.tm_mon == 1 else f"{g.tm_year}-{g.tm_mon - 1:02d}"
    if not MONTH.match(period):
        raise InvalidRequest("'period' must be a month YYYY-MM", param="period")
    return period


class UserAPIHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        self.authenticate_user()


class UsageHandler(UserAPIHandler):
    async def get(self) -> None:
        self.send_json(await usage_query(self, user_id=self.caller.user.user_id))


class LimitsHandler(UserAPIHandler):
    async def get(self) -> None:
        user = self.caller.user
        self.send_json(
            {"object": "limits", "user_id": user.user_id, "limits": await self.ctx.meter.limit_status(user),
             "effective": to_api(self.ctx.meter.effective(user))}
        )


class InvoiceHandler(UserAPIHandler):
    async def get(self) -> None:
        period = invoice_period(self)
        user_id = self.caller.user.user_id
        ledger = self.ctx.ledger
        lines = await ledger.invoice_lines(period=period, user_id=user_id)
        (invoice,) = reports.invoices(lines, period=period, user_id=user_id, now=ledger.clock())
        self.send_json(invoice)
