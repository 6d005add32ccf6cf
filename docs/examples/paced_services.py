"""paced_services.py: an action with a side effect (EVERREACH_SERVICES=paced_services)."""

from __future__ import annotations

from pathlib import Path

from service_registry import register


@register("notes.send")
def send_note(params: dict) -> dict:
    """Append the recipient to sent.txt: a side effect, so over its limit it waits its turn."""
    with Path("sent.txt").open("a", encoding="utf-8") as sent:
        sent.write(params["to"] + "\n")
    return {"sent": params["to"]}
