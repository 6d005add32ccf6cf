"""The status page's outbox card lists the items waiting for their time, each with a button
that cancels it: a real server, a scheduled action, headless Chromium."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.test_status_page import (  # noqa: F401 (browser and chromium_process are fixtures)
    Chromium,
    browser,
    chromium_process,
)

pytestmark = pytest.mark.e2e


def test_a_scheduled_action_is_listed_and_its_cancel_button_cancels_it(
    server_factory,
    browser: Chromium,  # noqa: F811
) -> None:
    server = server_factory(EVERREACH_SERVICES="tests.e2e_services")
    answer = httpx.post(
        f"{server.url}/dispatch",
        json={"action": "dm.send", "params": {"to": "bob"}, "delay_sec": 3600},
        timeout=10,
    )
    assert answer.status_code == 202
    item = answer.json()["outbox_id"]
    (waiting,) = httpx.get(f"{server.url}/status", timeout=10).json()["waiting"]
    assert (waiting["id"], waiting["action"]) == (item, "dm.send")

    browser.open(f"{server.url}/")
    browser.wait_for("document.querySelector('#outbox table.waiting') !== null", what="the list")
    row = browser.eval(
        "[...document.querySelectorAll('#outbox table.waiting tbody td')]"
        ".map((td) => td.textContent)"
    )
    assert row[0] == item[:8] + "…" and row[1] == "dm.send" and row[2].startswith("in ")
    browser.eval("window.confirm = (q) => { window.__asked = q; return true; }; true")
    browser.eval("document.querySelector('#outbox table.waiting button').click(); true")
    browser.wait_for("window.__asked", what="the question")
    assert item in browser.eval("window.__asked")
    deadline = time.monotonic() + 20  # only stops a hung test
    while httpx.get(f"{server.url}/status", timeout=10).json()["waiting"]:
        assert time.monotonic() < deadline, "the cancel button did not cancel the item"
        time.sleep(0.05)
    browser.wait_for(
        "document.querySelector('#outbox table.waiting') === null", what="the list to empty"
    )
