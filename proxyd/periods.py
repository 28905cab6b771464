"""UTC calendar periods: the day and month a moment belongs to, and when they end.

Day and month limits count per UTC calendar period; a request is billed to the period in which it was
admitted. Called on every admission and for every ledger row, so a second's answers are computed once.
"""

from __future__ import annotations

import calendar
import time

_CAL: tuple = (None, None)  # (whole second, (day key, month key, day end, month end)), swapped atomically
# The fields of what ``calendar_of`` returns (a plain tuple: read on every admission, built once a second).
DAY_KEY, MONTH_KEY, DAY_END, MONTH_END = 0, 1, 2, 3


def calendar_of(t: float) -> tuple[str, str, float, float]:
    """(day key, month key, day end, month end) of the UTC second containing t, computed once per second."""
    global _CAL
    s = int(t // 1)
    cached = _CAL
    if cached[0] == s:
        return cached[1]
    g = time.gmtime(s)
    day_end = calendar.timegm((g.tm_year, g.tm_mon, g.tm_mday, 0, 0, 0)) + 86400
    year, month = (g.tm_year + 1, 1) if g.tm_mon == 12 else (g.tm_year, g.tm_mon + 1)
    values = (f"{g.tm_year:04d}-{g.tm_mon:02d}-{g.tm_mday:02d}", f"{g.tm_year:04d}-{g.tm_mon:02d}",
              day_end, calendar.timegm((year, month, 1, 0, 0, 0)))
    _CAL = (s, values)
    return values


def day_key(t: float) -> str:
    return calendar_of(t)[0]


def month_key(t: float) -> str:
    return calendar_of(t)[1]


def period_end(window: str, t: float) -> float | None:
    """When the calendar period containing t ends (UTC), or None for total."""
    if window == "day":
        return calendar_of(t)[2]
    if window == "month":
        return calendar_of(t)[3]
    return None
