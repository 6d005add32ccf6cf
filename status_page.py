"""The browser status page served at ``/``: one self-contained HTML document that reads /status.

Everything is inline (no CDN, fonts or images), so the page works on an air-gapped terminal;
the CSS, script and body are kept in status_page.css, .js and .html beside this module, and
the spend forecast chart in status_forecast.js (appended to the one inline script).
The script fetches ``status`` relative to the page (``/status`` when served at ``/``; a path
prefix behind a proxy keeps working), re-renders every 5 s, and on a 401 asks for the
LOCAL_API_TOKEN, which it keeps in ``sessionStorage`` (gone when the tab closes) and sends as
``Authorization: Bearer``. The dead-letter table's "retry" and "drop" buttons ask ``confirm()``
first, then send ``POST outbox/{id}/retry`` or ``DELETE outbox/{id}`` with the same token.
Server text reaches the page only through ``textContent``/``append``;
the page never parses server strings as HTML. A Content-Security-Policy with the hashes of the
one inline script and style forbids any other script, style, frame or outside connection.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

REFRESH_S = 5

# The page's parts live beside this module as plain files (installed as package data), so each
# is edited, linted and reviewed in its own language; they are read once, on first render.
ASSETS_DIR = Path(__file__).resolve().parent


def _asset(name: str) -> str:
    return (ASSETS_DIR / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@functools.cache
def render_status_page() -> str:
    """Return the status page: one HTML document with its CSS and JavaScript inline."""
    style = "\n" + _asset("status_page.css")
    script = "\n" + _asset("status_page.js").replace("__REFRESH_MS__", str(REFRESH_S * 1000))
    script += _asset("status_forecast.js")
    body = _asset("status_page.html")
    csp = (
        f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
        f"connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    )
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        "<title>EverReach status</title>\n"
        f"<style>{style}</style>\n</head>\n<body>\n{body}<script>{script}</script>\n"
        "</body>\n</html>\n"
    )
