"""The price table: USD per million tokens in config, integer nano-USD per million tokens inside.

A model's price is looked up by its canonical name (proxyd/modelname.py: as Ollama matches names, with
its tag), then its family (a key without a tag), then the ``default`` entry, else it is free. The
price in force at settle time is written on each ledger row, so changing the table never rewrites a
past bill.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from .config import ConfigError
from .modelname import canonical_keys, family

NANO = 10**9


class PriceTable:
    def __init__(self, raw: dict[str, Any]) -> None:
        self._prices: dict[str, tuple[int, int]] = {}
        try:  # keyed as requests are looked up: by canonical model name (proxyd/modelname.py)
            entries = canonical_keys(raw or {}, "config: pricing")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for model, entry in entries.items():
            self.set(model, entry, where=f"pricing.{model}")

    def set(self, model: str, entry: Any, *, where: str) -> None:
        if not isinstance(entry, dict):
            raise ConfigError(f"config: '{where}' must be a mapping")
        unknown = set(entry) - {"input_per_million_usd", "output_per_million_usd"}
        if unknown:
            raise ConfigError(f"config: unknown key '{where}.{sorted(unknown)[0]}'")
        self._prices[model] = (
            _nusd(entry.get("input_per_million_usd", 0), f"{where}.input_per_million_usd"),
            _nusd(entry.get("output_per_million_usd", 0), f"{where}.output_per_million_usd"),
        )

    def price(self, model: str) -> tuple[int, int]:
        """(input, output) in nano-USD per million tokens."""
        p = self._prices.get(model)
        if p is None:
            p = self._prices.get(family(model)) or self._prices.get("default") or (0, 0)
        return p

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
