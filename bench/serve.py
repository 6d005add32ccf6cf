"""Serve any ASGI app exactly as ``everreach serve`` serves the project's own.

    python -m bench.serve MODULE:ATTR [--port P] [--log-level L]

``cli.cmd_serve`` builds its ``uvicorn.Config`` around ``local_server.create_app(config)``. Here
a stand-in ``local_server`` module answers that call with ``MODULE:ATTR``, so the baseline of a
benchmark runs under the very flags the shipped server runs under, whatever they become.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def main(argv: list[str]) -> int:
    """Serve ``argv[0]`` with ``everreach serve``'s settings; the rest are ``serve``'s options."""
    if not argv or ":" not in argv[0]:
        print("usage: python -m bench.serve MODULE:ATTR [serve options]", file=sys.stderr)
        return 2
    module_name, attr = argv[0].split(":", 1)
    app = getattr(importlib.import_module(module_name), attr)

    def create_app(config: Any) -> Any:
        return app

    stand_in = types.ModuleType("local_server")
    stand_in.create_app = create_app  # type: ignore[attr-defined]
    sys.modules["local_server"] = stand_in
    import cli

    return cli.main(["serve", *argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
