"""The status page at ``/``: its HTML, and the page as headless Chromium renders it.

The browser tests drive Chromium over the DevTools protocol (a websocket on loopback) against
real server processes; they skip without Chromium locally and fail under CI=true.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from status_page import REFRESH_S, render_status_page
from tests.conftest import service_missing

pytestmark = pytest.mark.prd200

TOKEN = "page-test-token-456"
HOSTILE = '<img src=x onerror="window.__pwned=1">'


# -- the document ---------------------------------------------------------------------------------


def test_page_is_one_self_contained_document():
    html = render_status_page()
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>")
    assert not re.search(r"<link|<iframe|<img|@import|url\(", html)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    # The SVG namespace is a name (createElementNS), never fetched; no other URL is in the page.
    names = html.replace('"http://www.w3.org/2000/svg"', "")
    assert "http://" not in names and "https://" not in names
    assert html.count("<script>") == 1 and html.count("<style>") == 1


def test_page_never_parses_text_as_html():
    html = render_status_page()
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ):
        assert sink not in html


def test_csp_allows_exactly_the_inline_script_and_style():
    html = render_status_page()

    def group(pattern: str) -> str:
        match = re.search(pattern, html, re.S)
        assert match is not None, pattern
        return match.group(1)

    csp = group(r'http-equiv="Content-Security-Policy" content="([^"]+)"')
    script = group(r"<script>(.*)</script>")
    style = group(r"<style>(.*)</style>")

    def sha(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert f"script-src 'sha256-{sha(script)}'" in csp
    assert f"style-src 'sha256-{sha(style)}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_script_fetches_status_with_the_session_token_every_5_seconds():
    html = render_status_page()
    assert REFRESH_S == 5 and "const REFRESH_MS = 5000;" in html
    assert 'const STATUS_URL = "status";' in html  # relative: /status when served at /
    assert 'headers["Authorization"] = "Bearer " + token' in html
    assert "sessionStorage.getItem(TOKEN_KEY)" in html and "response.status === 401" in html


# -- in a browser ---------------------------------------------------------------------------------


class Chromium:
    """Headless Chromium driven over the DevTools protocol (flat sessions, one page)."""

    def __init__(self, proc: subprocess.Popen[bytes], ws: Any) -> None:
        self.proc = proc
        self.ws = ws
        self.session: str | None = None
        self.context: str | None = None
        self._id = 0

    @classmethod
    def launch(cls, profile: Path) -> Chromium:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            service_missing("chromium (Debian package chromium)")
        assert binary is not None
        from websockets.sync.client import connect

        proc = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30  # only stops a hung test
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("chromium did not start its DevTools endpoint")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        return cls(proc, connect(f"ws://127.0.0.1:{port}{path}", max_size=None))

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, page: bool = True
    ) -> dict[str, Any]:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if page and self.session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply["result"])

    def open(self, url: str, *, refresh_after_ms: int | None = None) -> None:
        """Open ``url`` in a new tab; ``refresh_after_ms``: the page's own refresh timer (a
        ``setTimeout`` of REFRESH_S) fires after that many ms, so a test need not wait 5 s."""
        where = {"browserContextId": self.context} if self.context else {}
        target = self.call("Target.createTarget", {"url": "about:blank", **where}, page=False)
        self.session = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, page=False
        )["sessionId"]
        if refresh_after_ms is not None:
            self.call("Page.enable")  # addScriptToEvaluateOnNewDocument needs it
            self.call(
                "Page.addScriptToEvaluateOnNewDocument",
                {
                    "source": f"""(() => {{
                        const setTimeout = window.setTimeout;
                        window.setTimeout = (callback, ms, ...args) => setTimeout(
                            callback, ms === {REFRESH_S * 1000} ? {refresh_after_ms} : ms, ...args);
                    }})();"""
                },
            )
        self.call("Page.navigate", {"url": url})
        self.wait_for(
            f"location.href === {json.dumps(url)} && document.readyState !== 'loading'",
            what=f"{url} to load",
        )

    def eval(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, what: str, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s  # only stops a hung test
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.eval("document.body ? document.body.innerText : ''")
                pytest.fail(f"gave up waiting for {what}; the page shows:\n{body}")
            time.sleep(0.05)

    def text(self, selector: str) -> str:
        return str(self.eval(f"document.querySelector({json.dumps(selector)}).innerText"))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def chromium_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    chromium = Chromium.launch(tmp_path_factory.mktemp("chromium") / "profile")
    yield chromium
    chromium.close()


@pytest.fixture
def browser(chromium_process: Chromium) -> Iterator[Chromium]:
    """One Chromium for the session; each test gets a browser context of its own (storage,
    cache and tabs, like a fresh profile), disposed at its end."""
    reply = chromium_process.call("Target.createBrowserContext", page=False)
    chromium_process.context, chromium_process.session = reply["browserContextId"], None
    yield chromium_process
    where = {"browserContextId": chromium_process.context}
    chromium_process.context = chromium_process.session = None
    chromium_process.call("Target.disposeBrowserContext", where, page=False)


def counts_row(browser: Chromium, action: str) -> dict[str, str]:
    """The dispatch-counts row of ``action`` as {column header: cell text}."""
    return dict(
        browser.eval(f"""(() => {{
        const table = document.querySelector("#counts table");
        if (!table) return null;
        const heads = [...table.querySelectorAll("th")].map((th) => th.textContent);
        const row = [...table.querySelectorAll("tbody tr")]
            .find((tr) => tr.cells[0].textContent === {json.dumps(action)});
        return row ? Object.fromEntries([...row.cells].map((td, i) => [heads[i], td.textContent]))
                   : null;
    }})()""")
        or {}
    )


@pytest.mark.e2e
def test_page_shows_env_and_dispatch_counts_and_refreshes_itself(server_factory, browser, tmp_path):
    server = server_factory()
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.headers["content-type"].startswith("text/html")
    for _ in range(2):
        httpx.post(f"{server.url}/dispatch", json={"action": "system.echo"}, timeout=10)

    browser.open(f"{server.url}/", refresh_after_ms=500)  # its own timer, 10x sooner
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    assert "env local" in browser.text("#badges")
    assert counts_row(browser, "system.echo") == {
        "action": "system.echo",
        "local": "2",
        "total": "2",
    }
    assert "$0.00" in browser.text("#cost") and "$400.00" in browser.text("#cost")
    assert "daily_routine" in browser.text("#jobs")
    assert browser.eval("document.querySelector('#login').hidden") is True
    browser.screenshot(tmp_path / "status-page.png")

    httpx.post(f"{server.url}/dispatch", json={"action": "system.echo"}, timeout=10)
    browser.wait_for(
        "(() => { const r = [...document.querySelectorAll('#counts tbody tr')]"
        ".find((tr) => tr.cells[0].textContent === 'system.echo');"
        " return r && r.cells[1].textContent === '3'; })()",
        what="the next automatic refresh to show 3 dispatches",
    )


@pytest.mark.e2e
def test_page_asks_for_the_token_on_401_and_keeps_it_for_the_tab(server_factory, browser):
    server = server_factory(LOCAL_API_TOKEN=TOKEN)
    browser.open(f"{server.url}/")
    browser.wait_for("!document.getElementById('login').hidden", what="the token form")
    assert browser.eval("document.getElementById('main').hidden") is True

    submit = (
        "(() => { document.getElementById('token').value = {token};"
        " document.getElementById('login').requestSubmit(); return true; })()"
    )
    browser.eval(submit.replace("{token}", json.dumps("wrong-token")))
    browser.wait_for(
        "!document.getElementById('login-error').hidden", what="the refused-token message"
    )
    assert "refused" in browser.text("#login-error")

    browser.eval(submit.replace("{token}", json.dumps(TOKEN)))
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    assert "env local" in browser.text("#badges")
    assert browser.eval("sessionStorage.getItem('everreach.local_api_token')") == TOKEN

    browser.call("Page.reload")
    browser.wait_for(
        "document.readyState === 'complete' && !document.getElementById('main').hidden",
        what="the status after reload",
    )
    assert browser.eval("document.getElementById('login').hidden") is True


def hostile_status() -> dict[str, Any]:
    return {
        "env": "hybrid",
        "version": HOSTILE,
        "uptime_sec": 90061,
        "online": False,
        "offline_mode": True,
        "connectivity": {"online": False, "last_error": HOSTILE},
        "dispatch_counts": {HOSTILE: {"cloud": 5}, "dm.send": {"outbox": 2, "cloud": 7}},
        "circuits": {"local": {"content.generate": "open"}, "cloud": "half_open"},
        "cost": {
            "month": "2026-03",
            "timezone": "UTC",
            "spent_usd": "391.50",
            "reserved_usd": "4.00",
            "remaining_usd": "4.50",
            "soft_cap_usd": "380.00",
            "hard_cap_usd": "400.00",
            "soft_cap_reached": True,
            "hard_cap_reached": False,
            "by_action": {"dm.send": "300.00", HOSTILE: "91.50"},
            "store": "postgres",
            "healthy": True,
            "error": None,
        },
        "outbox": {"depth": 2, "dead_letters": 1, "oldest_pending_at": "2026-03-01T05:00:00Z"},
        "dead_letters": [{"id": "ob-1", "action": "dm.send", "attempts": 8, "error": HOSTILE}],
        "cache": {"entries": 3, "ttl_sec": 3600},
        "scheduler": {
            "timezone": "UTC",
            "replica_lock": "redis",
            "jobs": [
                {
                    "id": "nightly",
                    "action": "system.heartbeat",
                    "trigger": HOSTILE,
                    "next_run_time": "2099-01-01T06:00:00+00:00",
                    "runs": 4,
                    "mirrored": True,
                    "last_outcome": "ok",
                }
            ],
            "mirror": {"enabled": True, "count": 1, "last_error": None},
        },
        "bus": {
            "backend": "redis",
            "redis_configured": True,
            "redis_connected": True,
            "backlog": 0,
            "last_error": HOSTILE,
        },
        "routes": {"source": "route_table.json", "entries": 47},
        "actions": ["dm.send"],
    }


@contextlib.contextmanager
def stand_in(status: dict[str, Any]) -> Iterator[str]:
    """A stand-in server on loopback: the page at ``/``, ``status`` at every other path."""
    page = render_status_page().encode()
    answer = json.dumps(status).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, kind = (page, "text/html") if self.path == "/" else (answer, "application/json")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def hostile_server() -> Iterator[str]:
    """A stand-in server whose /status carries HTML in every free-text field."""
    with stand_in(hostile_status()) as url:
        yield url


def test_page_shows_server_text_as_text_never_as_html(hostile_server, browser, tmp_path):
    browser.open(f"{hostile_server}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    assert browser.eval("document.querySelectorAll('img').length") == 0
    assert browser.eval("window.__pwned === undefined") is True
    body = browser.text("body")
    assert body.count(HOSTILE) >= 6  # shown literally wherever it appeared
    assert "soft cap reached" in browser.text("#badges")
    assert "1 dead letter" in browser.text("#badges")
    assert counts_row(browser, "dm.send") == {
        "action": "dm.send",
        "cloud": "7",
        "outbox": "2",
        "total": "9",
    }
    width = browser.eval("document.querySelector('#cost .fill.spent').style.width")
    assert float(width.rstrip("%")) == pytest.approx(97.875)
    assert "open" in browser.text("#circuits") and "half_open" in browser.text("#circuits")
    browser.screenshot(tmp_path / "status-page-busy.png")


# -- readable numbers and the dead-letter buttons -------------------------------------------------

DEAD_ID = "3f2a9c1e-7d44-4b8e-9a0f-1c2d3e4f5a6b"
DEAD_ERROR = "cloud_unavailable: the cloud answered 503 five times in a row; gave up after 5 tries"


def busy_status() -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta

    ago = (datetime.now(UTC) - timedelta(seconds=42)).isoformat()
    status = hostile_status() | {"version": "1", "offline_mode": False}
    status["connectivity"] = {
        "online": True,
        "offline_mode": False,
        "consecutive_failures": 0,
        "offline_after": 3,
        "last_probe_at": ago,
        "last_probe_ok": True,
        "last_change_at": ago,
        "since_change_s": 51.171272968999915,
        "endpoint": "http://127.0.0.1:9090",
    }
    status["dispatch_counts"] = {"dm.send": {"cloud": 4, "unknown_action": 1, "timeout": 2}}
    status["dead_letters"] = [
        {"id": DEAD_ID, "action": "dm.send", "attempts": 5, "error": DEAD_ERROR}
    ]
    status["cloud_missing_handlers"] = {"research.keyword": 3}
    status["bus"]["last_error"] = None
    status["cost"]["by_action"] = {"dm.send": "300.00"}
    status["scheduler"]["jobs"][0]["trigger"] = "cron 0 6 * * *"
    return status


@pytest.fixture
def busy_server() -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    """A stand-in server: the page, a busy /status, and a record of outbox requests."""
    page = render_status_page().encode()
    status = json.dumps(busy_status()).encode()
    seen: list[tuple[str, str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self, body: bytes, kind: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self.answer(*((page, "text/html") if self.path == "/" else (status,)))

        def do_POST(self) -> None:
            seen.append(("POST", self.path, self.headers.get("Authorization")))
            self.answer(b'{"ok": true}')

        def do_DELETE(self) -> None:
            seen.append(("DELETE", self.path, self.headers.get("Authorization")))
            self.answer(b'{"ok": true}')

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_page_shows_failures_by_error_code_and_readable_times(busy_server, browser, tmp_path):
    url, _ = busy_server
    browser.open(f"{url}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    assert counts_row(browser, "dm.send") == {
        "action": "dm.send",
        "cloud": "4",
        "✗ timeout": "2",
        "✗ unknown action": "1",
        "total": "7",
    }
    body = browser.text("body")
    assert "error error" not in body and "error_error" not in body
    circuits = browser.text("#circuits")
    pairs = dict(
        browser.eval(
            "[...document.querySelectorAll('#circuits dt')]"
            ".map((dt) => [dt.textContent, dt.nextElementSibling.textContent])"
        )
    )
    assert "51.17" not in circuits and pairs["since change"] == "51 s"
    assert re.fullmatch(r"4\d s ago", pairs["last probe"]) and pairs["last probe ok"] == "yes"
    assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:", body)  # no raw ISO times
    assert "cloud has no handler for research.keyword (3 calls)" in circuits
    assert "cloud lacks 1 handler" in browser.text("#badges")
    browser.screenshot(tmp_path / "status-page-readable.png")


def test_dead_letters_show_a_short_id_the_action_and_the_whole_error(busy_server, browser):
    url, _ = busy_server
    browser.open(f"{url}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    row = browser.eval(
        "[...document.querySelectorAll('#outbox table.dead tbody td')].map((td) => td.innerText)"
    )
    assert row[:3] == ["3f2a9c1e…", "dm.send", "5"] and row[4] == DEAD_ERROR
    assert browser.eval("document.querySelector('#outbox code.id').title") == DEAD_ID
    # nothing hides behind a scrollbar: the table fits its card
    assert browser.eval("document.querySelector('#outbox .scroll table.dead') === null") is True
    assert browser.eval(
        "(() => { const t = document.querySelector('#outbox table.dead');"
        " return t.scrollWidth <= document.querySelector('#outbox').clientWidth; })()"
    )
    assert browser.eval("document.querySelectorAll('#outbox button').length") == 2


def test_dead_letter_buttons_ask_first_then_call_the_outbox_endpoints(busy_server, browser):
    url, seen = busy_server
    browser.open(f"{url}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    browser.eval(f"sessionStorage.setItem('everreach.local_api_token', {json.dumps(TOKEN)})")
    click = "document.querySelector('#outbox button.{0}').click(); true"
    browser.eval("window.confirm = () => false; true")
    browser.eval(click.format("drop"))
    browser.eval(click.format("retry"))
    browser.eval("window.confirm = (q) => { window.__asked = q; return true; }; true")
    browser.eval(click.format("retry"))
    browser.wait_for("window.__asked", what="the question")
    assert DEAD_ID in browser.eval("window.__asked")
    browser.eval(click.format("drop"))
    deadline = time.monotonic() + 20  # only stops a hung test
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == [
        ("POST", f"/outbox/{DEAD_ID}/retry", f"Bearer {TOKEN}"),
        ("DELETE", f"/outbox/{DEAD_ID}", f"Bearer {TOKEN}"),
    ]


# -- the spend forecast chart ---------------------------------------------------------------------

SOFT_CAP_RGB = (0x9A, 0x67, 0x00)  # --warn and --bad of the light theme
HARD_CAP_RGB = (0xCF, 0x22, 0x2E)
CHART = "#cost svg.forecast"


def png_pixels(data: bytes) -> tuple[int, list[list[tuple[int, int, int]]]]:
    """Width and RGB rows of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header, idat = (
            (body, idat) if kind == b"IHDR" else (header, idat + body * (kind == b"IDAT"))
        )
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    size = 3 if colour == 2 else 4
    raw, stride, prev = zlib.decompress(idat), width * size, bytearray(width * size)
    rows = []
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a, b = line[i - size] if i >= size else 0, prev[i]
            c = prev[i - size] if i >= size else 0
            p = a + b - c
            pred = (
                a
                if abs(p - a) <= min(abs(p - b), abs(p - c))
                else b
                if abs(p - b) <= abs(p - c)
                else c
            )
            line[i] = (line[i] + (0, a, b, (a + b) // 2, pred)[kind]) & 0xFF
        rows.append([tuple(line[i : i + 3]) for i in range(0, stride, size)])
        prev = line
    return width, rows  # type: ignore[return-value]


def coloured(row: list[tuple[int, int, int]], rgb: tuple[int, int, int], x0: int, x1: int) -> int:
    """How many pixels of ``row[x0:x1]`` are ``rgb`` (give or take 6 per channel)."""
    return sum(all(abs(p - q) <= 6 for p, q in zip(px, rgb, strict=True)) for px in row[x0:x1])


def march_forecast() -> dict[str, Any]:
    """cost.forecast as /status gives it: 9 days of March, 3 with spend, both caps this month."""
    daily = ["0.00", "10.00", "20.00", "0.00", "0.00", "0.00", "0.00", "0.00", "6.00"]
    return {
        "as_of": "2026-03-09",
        "month_end": "2026-03-31",
        "spent_usd": "36.00",
        "pace_usd_per_day": "3.71",
        "projected_usd": "117.71",
        "soft_cap_usd": "50.00",
        "hard_cap_usd": "60.00",
        "soft_cap_date": "2026-03-13",
        "hard_cap_date": "2026-03-16",
        "pace_days": 7,
        "daily_usd": daily,
    }


@pytest.fixture
def forecast_server() -> Iterator[str]:
    """A stand-in server whose /status carries a March forecast that passes both caps."""
    status = busy_status()
    status["cost"] |= {
        "spent_usd": "36.00",
        "reserved_usd": "0.00",
        "remaining_usd": "24.00",
        "soft_cap_usd": "50.00",
        "hard_cap_usd": "60.00",
        "soft_cap_reached": False,
        "by_action": {"research.keyword": "36.00"},
        "forecast": march_forecast(),
    }
    page, body = render_status_page().encode(), json.dumps(status).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data, kind = (page, "text/html") if self.path == "/" else (body, "application/json")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def chart_facts(browser: Chromium) -> dict[str, Any]:
    return dict(
        browser.eval(f"""(() => {{
        const svg = document.querySelector({json.dumps(CHART)});
        const box = (n) => {{ const r = n.getBoundingClientRect();
                             return [r.left, r.top, r.right, r.bottom]; }};
        return {{
            bars: svg.querySelectorAll("rect.day").length,
            points: svg.querySelector("polyline.spent").getAttribute("points").split(" ").length,
            caps: [...svg.querySelectorAll("line.cap")].map((l) =>
                [l.getAttribute("class"), l.dataset.usd, box(l)]),
            chart: box(svg),
            card: document.querySelector("#cost").clientWidth,
            text: document.querySelector("#cost .forecast-text").textContent,
        }};
    }})()""")
    )


def test_page_draws_the_forecast_with_both_caps_as_lines(forecast_server, browser, tmp_path):
    browser.open(f"{forecast_server}/")
    browser.wait_for(f"document.querySelector({json.dumps(CHART)}) !== null", what="the chart")
    facts = chart_facts(browser)
    assert facts["bars"] == 3  # the three days with spend
    assert facts["points"] == 10  # the 1st's start, then the end of each of the 9 days
    assert [(cls, usd) for cls, usd, _ in facts["caps"]] == [("cap soft", "50"), ("cap hard", "60")]
    soft_box, hard_box = facts["caps"][0][2], facts["caps"][1][2]
    assert hard_box[1] < soft_box[1]  # the higher cap is drawn higher
    assert facts["chart"][2] - facts["chart"][0] <= facts["card"]  # fits its card
    assert facts["text"] == (
        "Projected $117.71 by 31 Mar at $3.71/day (the last 7 days' pace); "
        "soft cap 13 Mar; hard cap 16 Mar."
    )
    assert browser.eval("window.__pwned === undefined") is True

    width, rows = png_pixels(browser.screenshot(tmp_path / "status-page-forecast.png").read_bytes())
    assert width == 1280  # one CSS pixel per screenshot pixel
    for rgb, (left, top, right, bottom) in ((SOFT_CAP_RGB, soft_box), (HARD_CAP_RGB, hard_box)):
        x0, x1 = round(left), round(right)
        on_line = max(coloured(rows[y], rgb, x0, x1) for y in range(int(top), int(bottom) + 1))
        assert on_line >= (x1 - x0) // 3, f"too few {rgb} pixels along the cap line: {on_line}"
        above = coloured(rows[int(top) - 8], rgb, x0, x1)
        assert above == 0, f"{rgb} pixels away from the line: {above}"


def test_page_without_a_forecast_draws_no_chart(hostile_server, browser):
    browser.open(f"{hostile_server}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    assert browser.eval(f"document.querySelector({json.dumps(CHART)}) === null") is True
    assert "$391.50" in browser.text("#cost")


@pytest.mark.e2e
def test_page_draws_the_ledgers_spend_of_today_against_the_caps(server_factory, browser, tmp_path):
    from datetime import UTC, datetime
    from decimal import Decimal

    from tests.test_cost_ledger import seed_ledger

    now = datetime.now(UTC)
    data = tmp_path / "seeded" / "data"
    seed_ledger(
        data, [(now, Decimal("20")), (now, Decimal("10"))], f"{now:%Y-%m}"
    )  # at most $30 a day: never $1000 this month
    server = server_factory(
        DATA_DIR=str(data), EVERREACH_TZ="UTC", MONTHLY_COST_CAP="1000", COST_SOFT_CAP="20"
    )
    browser.open(f"{server.url}/")
    browser.wait_for(f"document.querySelector({json.dumps(CHART)}) !== null", what="the chart")
    facts = chart_facts(browser)
    assert facts["bars"] == 1  # only today has spend
    assert facts["points"] == now.day + 1
    assert [(cls, usd) for cls, usd, _ in facts["caps"]] == [
        ("cap soft", "20"),
        ("cap hard", "1000"),
    ]
    assert f"soft cap {now.day} {now:%b}; hard cap not this month." in facts["text"]
    assert browser.eval(f"document.querySelector('{CHART} rect.day title').textContent") == (
        f"day {now.day}: $30.00"
    )
    browser.screenshot(tmp_path / "status-page-forecast-live.png")


@pytest.mark.e2e
def test_page_shows_each_rate_limit_and_its_deferred_work(server_factory, browser, tmp_path):
    limits = tmp_path / "limits.json"
    limits.write_text(json.dumps({"dm.send": {"max": 1, "per_sec": 3600}}))
    server = server_factory(RATE_LIMITS_PATH=str(limits), EVERREACH_SERVICES="tests.e2e_services")
    codes = [
        httpx.post(f"{server.url}/dispatch", json={"action": "dm.send"}, timeout=10).status_code
        for _ in range(3)
    ]
    assert codes == [200, 202, 202]
    browser.open(f"{server.url}/")
    browser.wait_for("!document.getElementById('main').hidden", what="the status to render")
    row = browser.eval("""(() => {
        const heads = [...document.querySelectorAll("#rate-limits th")].map((th) => th.textContent);
        const tr = document.querySelector("#rate-limits tbody tr");
        return tr ? Object.fromEntries([...tr.cells].map((td, i) => [heads[i], td.textContent]))
                  : null;
    })()""")
    assert row["limit"] == "dm.send"
    assert row["used / max"] == "1 / 1"
    assert row["window"] == "1 h"
    assert row["deferred"] == "2"
    assert row["next free"].startswith("in ")
    browser.screenshot(tmp_path / "status-page-rate-limits.png")
