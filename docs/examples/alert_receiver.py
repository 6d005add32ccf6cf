"""A webhook receiver for ALERT_WEBHOOK_URL: prints one line per alert it is sent.

python docs/examples/alert_receiver.py 9099
ALERT_WEBHOOK_URL=http://127.0.0.1:9099/alerts everreach serve
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def line(alert: dict[str, Any]) -> str:
    """One alert as a line: when, which instance, the event and what happened."""
    return f"{alert['at']} {alert['instance']} {alert['event']}: {alert['detail']}"


class AlertHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        alert = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        print(line(alert), flush=True)
        self.send_response(204)  # any 2xx: delivered; 5xx or 429: retried; other 4xx: given up
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # no access log: the alerts are the output
        pass


def main(argv: list[str]) -> None:
    port = int(argv[1]) if len(argv) > 1 else 9099
    ThreadingHTTPServer(("127.0.0.1", port), AlertHandler).serve_forever()


if __name__ == "__main__":
    main(sys.argv)
