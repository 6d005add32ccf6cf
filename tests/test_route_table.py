"""route_table.json and its loader: coverage of the PRD's actions, lookup order, and malformed
tables rejected with the file, the entry and the reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from action_classifier import CLOUD_PREFERRED, LOCAL_PREFERRED
from errors import RouteTableError
from route_table import DEFAULT_PATH, Fallback, Preferred, Route, RouteTable

pytestmark = pytest.mark.prd200

BUNDLED = RouteTable.load()
ENTRY = {"preferred_env": "cloud", "fallback_env": "local", "side_effect": False}


def test_the_bundled_table_loads_from_the_package() -> None:
    assert BUNDLED.source == str(DEFAULT_PATH)
    assert RouteTable.load(DEFAULT_PATH).rows() == BUNDLED.rows()


@pytest.mark.parametrize(
    "action",
    [
        *sorted(LOCAL_PREFERRED | CLOUD_PREFERRED),
        "revenue.dashboard",
        "feedback.twitter_cycle",
        "system.heartbeat",
        "system.echo",
    ],
)
def test_the_bundled_table_has_an_exact_entry_for(action: str) -> None:
    assert action in BUNDLED.names()
    assert BUNDLED.get(action).known


@pytest.mark.parametrize("family", ["claude.*", "linkedin.*", "publish.*", "upwork.*", "safari.*"])
def test_the_bundled_table_has_the_family(family: str) -> None:
    assert family in BUNDLED.names()


@pytest.mark.parametrize("action", sorted(LOCAL_PREFERRED))
def test_local_preferred_actions_prefer_local(action: str) -> None:
    assert BUNDLED.get(action).preferred_env is Preferred.LOCAL


@pytest.mark.parametrize("action", sorted(CLOUD_PREFERRED))
def test_cloud_preferred_actions_prefer_cloud(action: str) -> None:
    assert BUNDLED.get(action).preferred_env is Preferred.CLOUD


@pytest.mark.parametrize(
    "action",
    [
        "dm.send",
        "dm.process_outreach",
        "publish.auto",
        "publish.multi",
        "publish.lite",
        "publish.tiktok",  # a new publish topic is covered by publish.*
        "linkedin.message",
        "linkedin.campaign",
        "upwork.propose",
        "telegram.send",
        "comments.post",
        "comments.threads_engage",
    ],
)
def test_side_effect_actions_are_marked(action: str) -> None:
    assert BUNDLED.get(action).side_effect is True


@pytest.mark.parametrize(
    "action",
    [
        "research.keyword",
        "research.platform",
        "dm.conversations",
        "linkedin.search",
        "upwork.search",
        "upwork.scan",
        "content.analyze_video",
        "feedback.twitter_cycle",
        "revenue.dashboard",
        "claude.complete",
        "system.heartbeat",
    ],
)
def test_read_only_actions_are_not_side_effects(action: str) -> None:
    assert BUNDLED.get(action).side_effect is False


@pytest.mark.parametrize("row", BUNDLED.rows(), ids=lambda row: row["action"])
def test_no_entry_falls_back_to_where_it_prefers_to_run(row: dict[str, Any]) -> None:
    assert row["fallback_env"] != row["preferred_env"]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("linkedin.search", Route(Preferred.CLOUD, Fallback.LOCAL, False)),  # exact over family
        ("linkedin.endorse", Route(Preferred.CLOUD, Fallback.LOCAL, True)),  # family
        ("upwork.propose", Route(Preferred.CLOUD, Fallback.LOCAL, True)),  # exact over family
        ("upwork.invoices", Route(Preferred.CLOUD, Fallback.LOCAL, False)),  # family
        ("claude.summarize", Route(Preferred.AUTO, Fallback.LOCAL, False)),  # family
        ("feedback.anything", Route(Preferred.LOCAL, Fallback.CLOUD, False)),  # family
    ],
)
def test_bundled_lookup(action: str, expected: Route) -> None:
    assert BUNDLED.get(action) == expected


@pytest.mark.parametrize("action", ["crm.create_contact", "x", "nothing.here", "linkedin"])
def test_an_unknown_action_gets_the_unknown_default(action: str) -> None:
    route = BUNDLED.get(action)
    assert route == Route(Preferred.AUTO, Fallback.LOCAL, True, known=False)
    assert not BUNDLED.is_known(action)


def test_exact_beats_family_beats_unknown() -> None:
    table = RouteTable.from_dict(
        {
            "unknown": {"preferred_env": "local", "fallback_env": "none", "side_effect": True},
            "actions": {
                "svc.*": {"preferred_env": "cloud", "fallback_env": "local", "side_effect": True},
                "svc.read": {"preferred_env": "auto", "fallback_env": "none", "side_effect": False},
            },
        }
    )
    assert table.get("svc.read") == Route(Preferred.AUTO, Fallback.NONE, False)
    assert table.get("svc.write") == Route(Preferred.CLOUD, Fallback.LOCAL, True)
    assert table.get("other.x") == Route(Preferred.LOCAL, Fallback.NONE, True, known=False)
    # A second lookup (from the memo) gives the same answer.
    assert table.get("svc.read") == Route(Preferred.AUTO, Fallback.NONE, False)
    assert table.names() == ["svc.*", "svc.read"]
    assert table.is_known("svc.anything")


def test_a_table_without_unknown_treats_unknown_actions_as_side_effects() -> None:
    table = RouteTable.from_dict({"actions": {}})
    assert table.get("a.b") == Route(Preferred.AUTO, Fallback.LOCAL, True, known=False)


def test_rows_list_every_entry() -> None:
    table = RouteTable.from_dict({"actions": {"a.b": ENTRY, "a.*": {**ENTRY, "note": "why"}}})
    assert table.rows() == [
        {"action": "a.*", "preferred_env": "cloud", "fallback_env": "local", "side_effect": False},
        {"action": "a.b", "preferred_env": "cloud", "fallback_env": "local", "side_effect": False},
    ]


# -- malformed tables -------------------------------------------------------------------------


def _load(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "routes.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(RouteTableError) as info:
        RouteTable.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not readable JSON"),
        ("", "not readable JSON"),
        (b"\xff\xfe{}", "not readable JSON"),
        ("[]", "must be an object with an 'actions' object"),
        ('{"version": 1}', "must be an object with an 'actions' object"),
        ('{"actions": []}', "must be an object with an 'actions' object"),
    ],
    ids=["syntax", "empty", "not-utf8", "list", "no-actions", "actions-list"],
)
def test_a_malformed_file_names_the_file_and_reason(
    tmp_path: Path, content: str | bytes, reason: str
) -> None:
    assert reason in _load(tmp_path, content)


@pytest.mark.parametrize(
    ("name", "entry", "reason"),
    [
        ("dm.send", {**ENTRY, "preferred_env": "remote"}, "preferred_env must be local, cloud"),
        ("dm.send", {**ENTRY, "preferred_env": None}, "preferred_env must be local, cloud"),
        ("dm.send", {**ENTRY, "fallback_env": "auto"}, "fallback_env must be local, cloud or none"),
        ("dm.send", {**ENTRY, "fallback_env": ["local"]}, "fallback_env must be local, cloud"),
        ("dm.send", {**ENTRY, "side_effect": "yes"}, "side_effect must be true or false"),
        ("dm.send", {**ENTRY, "side_effect": 1}, "side_effect must be true or false"),
        ("dm.send", {**ENTRY, "side_effect": None}, "side_effect must be true or false"),
        ("dm.send", {**ENTRY, "preferred": "cloud"}, "unknown field(s) ['preferred']"),
        ("dm.send", {**ENTRY, "sideEffect": True}, "unknown field(s) ['sideEffect']"),
        ("dm.send", {"preferred_env": "cloud", "fallback_env": "local"}, "missing field(s)"),
        ("dm.send", {}, "missing field(s) ['preferred_env', 'fallback_env', 'side_effect']"),
        ("dm.send", "cloud", "must be an object"),
        ("dm.send", None, "must be an object"),
        ("DM.send", ENTRY, "name must be 'service.topic' or 'service.*'"),
        ("dm", ENTRY, "name must be 'service.topic' or 'service.*'"),
        ("dm.send/x", ENTRY, "name must be 'service.topic' or 'service.*'"),
        ("dm.*.x", ENTRY, "name must be 'service.topic' or 'service.*'"),
        ("*.send", ENTRY, "name must be 'service.topic' or 'service.*'"),
        ("*", ENTRY, "name must be 'service.topic' or 'service.*'"),
        ("dm.send\n", ENTRY, "name must be 'service.topic' or 'service.*'"),
    ],
)
def test_a_malformed_entry_names_file_entry_and_reason(
    tmp_path: Path, name: str, entry: Any, reason: str
) -> None:
    good = {"research.keyword": ENTRY}
    message = _load(tmp_path, json.dumps({"version": 1, "actions": {**good, name: entry}}))
    assert f"entry {name!r}" in message
    assert reason in message


def test_a_malformed_unknown_default_is_named(tmp_path: Path) -> None:
    content = json.dumps({"unknown": {**ENTRY, "preferred_env": "moon"}, "actions": {}})
    message = _load(tmp_path, content)
    assert "entry 'unknown'" in message
    assert "preferred_env must be local, cloud or auto; got 'moon'" in message


def test_a_missing_file_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(RouteTableError, match="route table not found; set ROUTE_TABLE_PATH"):
        RouteTable.load(tmp_path / "absent.json")


def test_from_dict_errors_name_the_source() -> None:
    with pytest.raises(RouteTableError, match=r"^<memory>: entry 'a\.b': side_effect"):
        RouteTable.from_dict({"actions": {"a.b": {**ENTRY, "side_effect": "no"}}})
