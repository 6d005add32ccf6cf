"""CostRates: the estimated price in US dollars of one cloud call, per action.

The built-in table covers the actions the PRD prices; ``COST_RATES_FILE`` (a JSON object) may
override any entry, add exact actions (``"dm.send"``), wildcard families (``"linkedin.*"``) or
change the default for everything else (``"*"``):

    {"dm.send": 0.0015, "linkedin.*": "0.004", "*": 0.02}

Lookup order: exact action, then its ``service.*`` family, then the default. Rates are exact
``Decimal`` values with at most 6 decimal places (the ledger counts micro-dollars), never floats.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from errors import ConfigError

DEFAULT_KEY = "*"
MICRO_USD = Decimal("0.000001")
# No single call is priced anywhere near this; the bound keeps every rate exact in the ledger
# (numeric(18, 6) in PostgreSQL) and catches typos such as 1e999 before start-up completes.
MAX_RATE_USD = Decimal("1000000")

# The PRD's prices (feature 035). The default is the dearest listed price: an action nobody
# priced is assumed expensive rather than free, so the cap errs on the safe side.
BUILTIN_RATES: Mapping[str, Decimal] = {
    "claude.*": Decimal("0.01"),
    "research.platform": Decimal("0.002"),
    "dm.send": Decimal("0.001"),
    "linkedin.message": Decimal("0.005"),
    "upwork.propose": Decimal("0.003"),
    # The built-ins (heartbeat, echo, self-test) call no paid API.
    "system.*": Decimal("0"),
    DEFAULT_KEY: Decimal("0.01"),
}

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\.(\*|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)$")


def parse_rate(value: Any, *, where: str) -> Decimal:
    """Turn a JSON value into an exact, non-negative rate; ``ConfigError`` naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigError(f"{where}: the rate must be a number of US dollars, got {value!r}")
    try:
        rate = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise ConfigError(
            f"{where}: the rate must be a number of US dollars, got {value!r}"
        ) from None
    if not rate.is_finite():
        raise ConfigError(f"{where}: the rate must be a finite number, got {value!r}")
    if rate < 0:
        raise ConfigError(f"{where}: the rate must not be negative, got {value!r}")
    if rate > MAX_RATE_USD:
        raise ConfigError(
            f"{where}: the rate must be at most {MAX_RATE_USD} US dollars per call, got {value!r}"
        )
    if rate != rate.quantize(MICRO_USD):
        raise ConfigError(
            f"{where}: the rate has more than 6 decimal places (the ledger counts whole "
            f"micro-dollars), got {value!r}"
        )
    return rate


class CostRates:
    """An immutable $/call table: exact actions, ``service.*`` families and a default."""

    def __init__(self, rates: Mapping[str, Decimal]) -> None:
        if DEFAULT_KEY not in rates:
            raise ConfigError(f"cost rates need a default entry {DEFAULT_KEY!r}")
        self._exact = {k: v for k, v in rates.items() if not k.endswith(".*") and k != DEFAULT_KEY}
        self._families = {k[:-2]: v for k, v in rates.items() if k.endswith(".*")}
        self._default = rates[DEFAULT_KEY]
        self._all = dict(rates)

    @classmethod
    def builtin(cls) -> CostRates:
        """Return the built-in table without overrides."""
        return cls(BUILTIN_RATES)

    @classmethod
    def load(cls, path: Path | None) -> CostRates:
        """Return the built-in table with the overrides of the JSON file at ``path`` (if any).

        A missing or unreadable file, malformed JSON, a bad action name or a negative,
        non-numeric or over-precise rate is a ``ConfigError`` naming the file and the entry.
        """
        rates = dict(BUILTIN_RATES)
        if path is None:
            return cls(rates)
        where = f"COST_RATES_FILE {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
        try:
            # parse_float=str keeps 0.1 as the exact decimal the user wrote, not a binary float.
            data = json.loads(text, parse_float=str)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f'{where}: must be a JSON object of action to $/call, e.g. {{"dm.send": 0.001}}'
            )
        for key, value in data.items():
            if key != DEFAULT_KEY and not _KEY_RE.match(key):
                raise ConfigError(
                    f"{where}: entry {key!r} is not an action name (service.topic), a family "
                    f"(service.*) or the default ({DEFAULT_KEY!r})"
                )
            rates[key] = parse_rate(value, where=f"{where}: entry {key!r}")
        return cls(rates)

    def rate(self, action: str) -> Decimal:
        """Return the estimated $/call of ``action``: exact entry, its family, else default."""
        exact = self._exact.get(action)
        if exact is not None:
            return exact
        service, _, _ = action.partition(".")
        family = self._families.get(service)
        return family if family is not None else self._default

    @property
    def default_usd(self) -> Decimal:
        return self._default

    def table(self) -> dict[str, str]:
        """Return every entry as exact decimal strings, sorted, for /status and the docs."""
        return {key: format(self._all[key], "f") for key in sorted(self._all)}
