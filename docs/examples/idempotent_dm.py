"""A handler that sends once per idempotency key, however often its request is replayed."""

from __future__ import annotations

from service_registry import current_idempotency_key, register

SENT: dict[str, dict] = {}  # stands in for the platform's own record of what it sent


@register("dm.send")
async def send_dm(params: dict) -> dict:
    key = current_idempotency_key()  # the same on every retry and replay of this request
    if key is not None and key in SENT:
        return SENT[key]  # already sent: answer as the first time, send nothing
    answer = {"sent_to": params["to"]}  # the real send goes here, tagged with ``key``
    if key is not None:
        SENT[key] = answer
    return answer
