"""The price table: USD per million tokens in config, integer nano-USD per million tokens inside.

A model's price is looked up by its canonical name (proxyd/modelname.py: as Ollama matches names, with
its tag), then its family (a key without a tag), then the ``default`` entry, else it is free. The
price in force at settle time is written on each ledger row, so changing the table never rewrites a
past bill.

Every entry names both prices: an entry without ``output_per_million_usd`` used to bill output as
free, silently. A model that no entry covers is served at cost 0, but not without a word: a table
without ``default`` is a warning at start, and each such model billed is a warning in the log (once)
and on /healthz (DESIGN.md, "Prices").
"""

from __future__ import annotations

import logging
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Iterable

from .config import ConfigError
from .modelname import canonical_keys, family

log = logging.getLogger("proxyd")

NANO = 10**9
FREE = (0, 0)
PRICE_KEYS = ("input_per_million_usd", "output_per_million_usd")
# Unpriced models remembered for /healthz: enough to name every model of a real Ollama, bounded
# against a caller inventing names (only models that were served and billed get here).
MAX_UNPRICED_SHOWN = 100


class PriceTable:
    """``upstreams``: an upstream's own prices (``upstreams[].pricing``, the same shape), which win over
    the table's for the requests that upstream served; a price the upstream reports itself
    (``Usage.cost_nusd``) wins over both (proxyd/meter.py, settle)."""

    def __init__(self, raw: dict[str, Any], upstreams: dict[str, dict[str, Any]] | None = None, *,
                 where: str = "pricing") -> None:
        self._prices: dict[str, tuple[int, int]] = {}
        self.unpriced: set[str] = set()  # models billed at 0 for want of any entry, since start
        self._start_warnings: list[str] = []
        try:  # keyed as requests are looked up: by canonical model name (proxyd/modelname.py)
            entries = canonical_keys(raw or {}, f"config: {where}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for model, entry in entries.items():
            self.set(model, entry, where=f"{where}.{model}")
        self.by_upstream = {name: PriceTable(table, where=f"upstreams.{name}.pricing")
                            for name, table in (upstreams or {}).items() if table}
        if not self.by_upstream:
            self.reserve_price = self.price  # one table: no maximum to take

    def own(self, model: str) -> tuple[int, int] | None:
        """This table's entry for the model (its name, its family, its default), else None."""
        p = self._prices
        return p.get(model) or p.get(family(model)) or p.get("default")

    def reserve_price(self, model: str) -> tuple[int, int]:
        """The price a reservation is made at: the highest the model may be billed at by any upstream,
        so a cost limit holds whichever serves it (the upstream is chosen after the reservation)."""
        prices = [self.price(model), *(t.own(model) or FREE for t in self.by_upstream.values())]
        return max(p[0] for p in prices), max(p[1] for p in prices)

    def set(self, model: str, entry: Any, *, where: str) -> None:
        if not isinstance(entry, dict):
            raise ConfigError(f"config: '{where}' must be a mapping")
        unknown = set(entry) - set(PRICE_KEYS)
        if unknown:
            raise ConfigError(f"config: unknown key '{where}.{sorted(unknown)[0]}'")
        for key in PRICE_KEYS:
            if key not in entry:  # a missing price is not a price of 0: say 0 if that is meant
                raise ConfigError(f"config: '{where}' has no '{key}' (it would be billed as free; write 0 if it is)")
        self._prices[model] = (
            _nusd(entry["input_per_million_usd"], f"{where}.input_per_million_usd"),
            _nusd(entry["output_per_million_usd"], f"{where}.output_per_million_usd"),
        )

    def price(self, model: str) -> tuple[int, int]:
        """(input, output) in nano-USD per million tokens."""
        p = self._prices.get(model)
        if p is None:
            p = self._prices.get(family(model)) or self._prices.get("default") or FREE
        return p

    def settle_price(self, model: str, upstream: str | None = None) -> tuple[int, int]:
        """``price()`` for a bill, the serving upstream's own entry first: a model no entry covers is
        noted (log once, /healthz) as billed at 0."""
        if self.by_upstream and upstream in self.by_upstream:
            p = self.by_upstream[upstream].own(model)
            if p is not None:
                return p
        p = self._prices.get(model)
        if p is None:
            p = self._prices.get(family(model)) or self._prices.get("default")
            if p is None:
                p = FREE
                if self._prices and model not in self.unpriced and len(self.unpriced) < MAX_UNPRICED_SHOWN:
                    self.unpriced.add(model)
                    log.warning("model %s has no price and pricing has no 'default' entry: it is billed at 0 "
                                "(add pricing.%s, its family, or pricing.default; 0 to make free explicit)", model, model)
        return p

    def check_start(self, models: Iterable[str]) -> list[str]:
        """What the table leaves free without saying so (``models``: the names the config knows of).
        Returned for the start log and kept for /healthz."""
        if not self._prices:
            self._start_warnings = [
                "pricing is empty: every model is served at cost 0 (no bills, and cost limits never bind); "
                "set pricing.default to bill every model"]
        elif "default" not in self._prices:
            free = sorted({m for m in models if self.price(m) is FREE})
            named = f" (of the models configured: {', '.join(free)})" if free else ""
            self._start_warnings = [f"pricing has no 'default' entry: a model it does not list is billed at 0{named}; "
                                    "set pricing.default, or a price of 0 for the models meant to be free"]
        return self._start_warnings

    def warnings(self) -> list[str]:
        """For /healthz: the start warnings, then the models billed at 0 since start."""
        return self._start_warnings + [f"model {m} was billed at 0: no pricing entry covers it" for m in sorted(self.unpriced)]

    def as_api(self) -> dict[str, dict[str, str]]:
        return {
            m: {"input_per_million_usd": _usd(i), "output_per_million_usd": _usd(o)} for m, (i, o) in self._prices.items()
        }


def _nusd(value: Any, where: str) -> int:
    try:
        usd = Decimal(str(value))
    except InvalidOperation:
        raise ConfigError(f"config: '{where}' must be a number") from None
    if isinstance(value, bool) or not usd.is_finite() or usd < 0:
        raise ConfigError(f"config: '{where}' must be a number >= 0")
    nusd = usd * NANO
    if nusd != nusd.to_integral_value():
        raise ConfigError(f"config: '{where}' has more than 9 decimals")
    return int(nusd)


def _usd(nusd: int) -> str:
    return format(Decimal(nusd) / NANO, "f")


def reported_cost_nusd(value: Any) -> int | None:
    """An upstream's own cost of a request (OpenRouter's ``usage.cost``, USD as a JSON number) in
    nano-USD, rounded half up from its decimal text (no binary float rounding on the way); None if it
    is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        usd = Decimal(str(value))
    except InvalidOperation:
        return None
    if not usd.is_finite() or usd < 0:
        return None
    return int((usd * NANO).to_integral_value(rounding=ROUND_HALF_UP))


def cost_nusd(prompt_tokens: int, completion_tokens: int, price: tuple[int, int]) -> int:
    """nano-USD, rounded half up; prices are nano-USD per million tokens."""
    return (prompt_tokens * price[0] + completion_tokens * price[1] + 500_000) // 1_000_000


def usd_str(nusd: int) -> str:
    whole, frac = divmod(abs(nusd), NANO)
    return f"{'-' if nusd < 0 else ''}{whole}.{frac:09d}"
