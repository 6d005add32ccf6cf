"""The browser status page served at ``/``: one self-contained HTML document that reads /status."""

from __future__ import annotations


def render_status_page() -> str:
    return "<!doctype html><title>EverReach</title><p>status page</p>"
