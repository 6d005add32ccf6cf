"""CostRates: the built-in $/call table, COST_RATES_FILE overrides and their validation."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from cost_rates import CostRates
from errors import ConfigError

pytestmark = pytest.mark.prd200


@pytest.mark.parametrize(
    ("action", "rate"),
    [
        ("claude.complete", "0.01"),
        ("claude.summarize", "0.01"),
        ("research.platform", "0.002"),
        ("dm.send", "0.001"),
        ("linkedin.message", "0.005"),
        ("upwork.propose", "0.003"),
        ("research.keyword", "0.01"),  # same service, unlisted topic: the default
        ("content.analyze_video", "0.01"),
    ],
)
def test_builtin_rates_are_the_prds(action: str, rate: str) -> None:
    assert CostRates.load(None).rate(action) == Decimal(rate)


def test_rates_are_exact_decimals_not_floats() -> None:
    rate = CostRates.load(None).rate("dm.send")
    assert isinstance(rate, Decimal)
    assert sum([CostRates.load(None).rate("claude.x")] * 10, Decimal(0)) == Decimal("0.10")


def _rates_file(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "rates.json"
    path.write_text(content, encoding="utf-8")
    return path


def test_overrides_replace_add_and_change_the_default(tmp_path: Path) -> None:
    path = _rates_file(
        tmp_path,
        json.dumps({"dm.send": 0.0015, "linkedin.*": "0.004", "publish.auto": 0, "*": 0.02}),
    )
    rates = CostRates.load(path)
    assert rates.rate("dm.send") == Decimal("0.0015")
    assert rates.rate("linkedin.search") == Decimal("0.004")
    assert rates.rate("linkedin.message") == Decimal("0.005")  # exact beats family
    assert rates.rate("publish.auto") == Decimal(0)
    assert rates.rate("unknown.thing") == Decimal("0.02")
    assert rates.rate("research.platform") == Decimal("0.002")  # untouched built-in


def test_json_floats_are_read_exactly(tmp_path: Path) -> None:
    rates = CostRates.load(_rates_file(tmp_path, '{"x.y": 0.1}'))
    assert rates.rate("x.y") == Decimal("0.1")
    assert rates.table()["x.y"] == "0.1"


def test_table_lists_every_entry_as_exact_strings() -> None:
    table = CostRates.load(None).table()
    assert table["claude.*"] == "0.01"
    assert table["upwork.propose"] == "0.003"
    assert table["*"] == "0.01"


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"dm.send": -0.01}', "'dm.send'"),
        ('{"dm.send": "cheap"}', "'dm.send'"),
        ('{"dm.send": null}', "'dm.send'"),
        ('{"dm.send": true}', "'dm.send'"),
        ('{"dm.send": [1]}', "'dm.send'"),
        ('{"dm.send": "NaN"}', "'dm.send'"),
        ('{"dm.send": "Infinity"}', "'dm.send'"),
        ('{"dm.send": 0.0000001}', "'dm.send'"),
        ('{"dm.send": 1e999}', "'dm.send'"),
        ('{"dm.send": 1e-999}', "'dm.send'"),
        ('{"dm.send": "1e999"}', "'dm.send'"),
        ('{"dm.send": 1000000000000000000000000000000}', "'dm.send'"),
        ('{"dm.send": NaN}', "'dm.send'"),
        ('{"dm.send": -Infinity}', "'dm.send'"),
        ('{"dm.send": "0x10"}', "'dm.send'"),
        ('{"not an action": 1}', "'not an action'"),
        ('{"dm.": 1}', "'dm.'"),
        ("[1, 2]", "JSON object"),
        ('{"dm.send": 0.01', "not valid JSON"),
    ],
)
def test_bad_rate_file_is_a_config_error_naming_the_entry(
    tmp_path: Path, content: str, named: str
) -> None:
    path = _rates_file(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        CostRates.load(path)
    assert named in str(info.value)
    assert "COST_RATES_FILE" in str(info.value)


def test_missing_rate_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="COST_RATES_FILE"):
        CostRates.load(tmp_path / "nope.json")


@pytest.mark.prd200
def test_the_builtin_system_actions_cost_nothing() -> None:
    rates = CostRates.load(None)
    assert rates.rate("system.heartbeat") == Decimal("0")
    assert rates.rate("system.self_test") == Decimal("0")


def test_an_absurd_rate_names_the_file_the_entry_and_the_reason(tmp_path: Path) -> None:
    path = _rates_file(tmp_path, '{"research.keyword": 1e999}')
    with pytest.raises(ConfigError) as info:
        CostRates.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "'research.keyword'" in message
    assert "at most 1000000" in message
