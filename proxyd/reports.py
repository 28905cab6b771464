"""Usage reports and invoices as the API shows them, from the sums the Ledger returns (proxyd/storage/).

Pure formatting: no storage, no clock of its own. Usage and invoices are answered from the per-day
aggregates (a few rows per user, model, price and day, whatever the traffic), never from request rows.
"""

from __future__ import annotations

from typing import Any, Iterable

from .periods import month_key
from .pricing import usd_str
from .storage import DayModelRow, InvoiceLine, UsageRow


def usage(rows: Iterable[UsageRow], *, start: str, end: str, group_by: str) -> dict[str, Any]:
    """A usage report: a row per group (model, day or user) over [start, end] (UTC days), and the totals."""
    rows = list(rows)
    out_rows = [_usage_row({group_by: r[0]}, r[1], r[2], r[3], r[4]) for r in rows]
    totals = _usage_row({}, *(sum(r[i] or 0 for r in rows) for i in range(1, 5)))
    return {"object": "usage", "start": start, "end": end, "group_by": group_by, "data": out_rows, "totals": totals}


def _usage_row(key: dict[str, Any], requests: int, prompt: int, completion: int, cost: int) -> dict[str, Any]:
    prompt, completion = prompt or 0, completion or 0
    return {
        **key,
        "requests": requests or 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_usd": usd_str(cost or 0),
    }


def invoices(lines: Iterable[InvoiceLine], *, period: str, user_id: str | None, now: float) -> list[dict[str, Any]]:
    """In-arrears invoices for a calendar month: a line per model and price, the total, and whether the
    month is over at ``now`` (the injected clock's time): "closed", else "open". With ``user_id``, that
    user's invoice even if empty."""
    status = "closed" if period < month_key(now) else "open"
    by_user: dict[str, dict[str, Any]] = {}
    for user, model, in_p, out_p, n, prompt, completion, cost in lines:
        inv = by_user.setdefault(
            user, {"object": "invoice", "user_id": user, "period": period, "status": status, "lines": [], "_total": 0}
        )
        inv["lines"].append(
            {
                "model": model,
                "input_per_million_usd": usd_str(in_p or 0),
                "output_per_million_usd": usd_str(out_p or 0),
                "requests": n,
                "prompt_tokens": prompt or 0,
                "completion_tokens": completion or 0,
                "total_tokens": (prompt or 0) + (completion or 0),
                "cost_usd": usd_str(cost or 0),
            }
        )
        inv["_total"] += cost or 0
    if user_id is not None and user_id not in by_user:
        by_user[user_id] = {"object": "invoice", "user_id": user_id, "period": period, "status": status, "lines": [], "_total": 0}
    out = []
    for inv in by_user.values():
        inv["total_usd"] = usd_str(inv.pop("_total"))
        out.append(inv)
    return out


def amounts(requests: int, prompt: int, completion: int, cost: int) -> dict[str, Any]:
    """Requests, tokens and cost as every usage report shows them."""
    return _usage_row({}, requests, prompt, completion, cost)


def daily_usage(rows: Iterable[DayModelRow], *, start: str, end: str, user_id: str | None) -> dict[str, Any]:
    """Usage per UTC day and model (the dashboard's chart and CSV) and the totals."""
    rows = list(rows)
    data = [{"day": r.day, "model": r.model, **_usage_row({}, *r[2:])} for r in rows]
    totals = _usage_row({}, *(sum(r[i] or 0 for r in rows) for i in range(2, 6)))
    return {"object": "usage.daily", "start": start, "end": end, **({"user_id": user_id} if user_id else {}),
            "data": data, "totals": totals}
