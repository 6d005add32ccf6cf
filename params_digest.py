"""A stable digest of an action's params: equal data, equal digest.

The offline cache keys its entries by it, and the serving side ties an idempotency key to the
request it was first used with (the same key with other params is refused).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(value: Any) -> str:
    """Serialise ``value`` with sorted keys and no spaces: equal data, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def params_hash(params: Mapping[str, Any]) -> str:
    """Return the SHA-256 hex digest of ``params`` as canonical JSON."""
    return hashlib.sha256(canonical_json(dict(params)).encode("utf-8")).hexdigest()
