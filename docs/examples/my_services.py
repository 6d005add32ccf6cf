"""my_services.py: your own actions, loaded with EVERREACH_SERVICES=my_services."""

from __future__ import annotations

from pathlib import Path

from service_registry import register

SENT = Path("sent.txt")


@register("notes.send")
def send_note(params: dict) -> dict:
    """Append a note to sent.txt: a side effect that must never happen twice."""
    line = f"{params['to']}: {params['text']}"
    with SENT.open("a", encoding="utf-8") as sent:
        sent.write(line + "\n")
    return {"sent": line}


@register("notes.count")
def count_notes(params: dict) -> dict:
    """Count the notes sent so far; read-only, safe to run anywhere, any number of times."""
    if not SENT.exists():
        return {"count": 0}
    return {"count": len(SENT.read_text(encoding="utf-8").splitlines())}
