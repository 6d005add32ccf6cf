"""The status page's alerts card: the last events as a timeline, in headless Chromium.

A stand-in server gives the page a /status with alerts (hostile text included); a screenshot of
the timeline must show each event's dot in its tone. A real server process then shows its own
``cloud_offline`` on the page.
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.test_status_page import (  # noqa: F401 (browser is a fixture)
    HOSTILE,
    Chromium,
    browser,
    chromium_process,
    hostile_status,
    stand_in,
)

pytestmark = pytest.mark.prd200


def alerts_status() -> dict[str, Any]:
    now = datetime.now(UTC)
    ago = [(now - timedelta(minutes=m)).isoformat() for m in (1, 5, 9)]
    status = hostile_status()
    status["alerts"] = {
        "sinks": ["webhook"],
        "events": [
            {"event": "cloud_online", "at": ago[0], "detail": "cloud answers again",
             "subject": "", "status": "sent", "attempts": 1},
            {"event": "dead_letter", "at": ago[1], "detail": HOSTILE, "subject": "ob-1",
             "status": "failed", "attempts": 5},
            {"event": "cloud_offline", "at": ago[2], "detail": "cloud stopped answering",
             "subject": "", "status": "sent", "attempts": 1},
        ],
        "failures": [{"event": "dead_letter", "at": ago[1], "sink": "webhook",
                      "error": "webhook answered 500"}],
        "active": ["dead_letter:ob-1"],
        "pending": 0,
        "suppressed": 0,
    }  # fmt: skip
    return status


@pytest.fixture
def alerts_server() -> Iterator[str]:
    with stand_in(alerts_status()) as url:
        yield url


def paeth(left: int, up: int, corner: int) -> int:
    p = left + up - corner
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
    return left if pa <= pb and pa <= pc else up if pb <= pc else corner


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """Decode an 8-bit RGB or RGBA PNG (what Chromium captures) into (width, height, pixels)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = chunk
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 4 if color == 6 else 3
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up, corner = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (
                    line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)
                ) & 255
        rows.append(line)
        prev = line
    pixels = [tuple(row[x * bpp : x * bpp + 3]) for row in rows for x in range(width)]
    return width, height, pixels  # type: ignore[return-value]


def rgb(css: str) -> tuple[int, int, int]:
    """'rgb(207, 34, 46)' -> (207, 34, 46)."""
    r, g, b = (int(part) for part in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return r, g, b


def count_near(pixels: list[tuple[int, int, int]], color: tuple[int, int, int]) -> int:
    return sum(1 for p in pixels if all(abs(a - b) <= 12 for a, b in zip(p, color, strict=True)))


def timeline_dots(browser: Chromium) -> list[tuple[int, int, int]]:  # noqa: F811
    """The pixels of the timeline's left rule, where each event's dot is painted."""
    box = browser.eval(
        "(() => { const r = document.querySelector('#alerts ol.timeline')"
        ".getBoundingClientRect(); return {x: r.x + window.scrollX - 8, y: r.y + window.scrollY,"
        " width: 18, height: r.height}; })()"
    )
    shot = browser.call(
        "Page.captureScreenshot",
        {"format": "png", "clip": {**box, "scale": 1}, "captureBeyondViewport": True},
    )
    width, height, pixels = png_pixels(base64.b64decode(shot["data"]))
    assert width >= 17 and height > 40, (width, height)
    return pixels


def dot_color(browser: Chromium, n: int) -> tuple[int, int, int]:  # noqa: F811
    return rgb(
        browser.eval(
            f"getComputedStyle(document.querySelectorAll('#alerts li')[{n}], '::before')"
            ".backgroundColor"
        )
    )


def test_the_alerts_timeline_shows_the_last_events_newest_first(
    alerts_server: str,
    browser: Chromium,  # noqa: F811
    tmp_path: Any,
) -> None:
    browser.open(f"{alerts_server}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    items = browser.eval("[...document.querySelectorAll('#alerts li')].map((li) => li.innerText)")
    assert [item.split("\n")[0].split(" ")[:2] for item in items] == [
        ["cloud", "online"],
        ["dead", "letter"],
        ["cloud", "offline"],
    ]
    assert "\n1 min" in items[0] and "\n9 min" in items[2]  # relative times
    assert HOSTILE in items[1] and browser.eval("window.__pwned === undefined") is True
    card = browser.text("#alerts")
    assert "sent to the webhook" in card
    assert "1 delivery failed; the last: dead_letter to the webhook: webhook answered 500" in card

    pixels = timeline_dots(browser)
    ok, bad = dot_color(browser, 0), dot_color(browser, 1)
    assert ok != bad
    assert count_near(pixels, ok) >= 60  # one 12 px dot: about 110 pixels
    assert count_near(pixels, bad) >= 120  # two of them
    browser.screenshot(tmp_path / "status-page-alerts.png")


@pytest.mark.e2e
def test_a_real_server_shows_its_cloud_offline_on_the_page(
    server_factory: Callable[..., Any],
    browser: Chromium,  # noqa: F811
) -> None:
    server = server_factory(
        EVERREACH_ENV="hybrid",
        EVERREACH_CLOUD_KEY="page-alerts-key",
        CLOUD_ENDPOINT=f"http://127.0.0.1:{free_port()}",  # nobody listens
        CONNECTIVITY_INTERVAL_SEC="0.2",
    )
    browser.open(f"{server.url}/", refresh_after_ms=500)  # its own timer, 10x sooner
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    assert "No ALERT_WEBHOOK_URL or ALERT_ACTION" in browser.text("#alerts")
    browser.wait_for(
        "document.querySelector('#alerts li.t-bad') !== null", what="the cloud_offline event"
    )
    assert browser.text("#alerts li").startswith("cloud offline")
    assert "recorded" in browser.text("#alerts li")
    assert httpx.get(f"{server.url}/status", timeout=10).json()["alerts"]["sinks"] == []
