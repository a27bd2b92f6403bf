#!/usr/bin/env python3
"""A stand-in for the email gateway of examples/notifications.

Listens on 127.0.0.1:8025, prints every POST or PUT it receives (path and body) and answers
with a fixed status, 200 unless another is given:

    python3 examples/notifications/webhook.py         # accepts every notification
    python3 examples/notifications/webhook.py 503     # a gateway that is down
    python3 examples/notifications/webhook.py 400     # a gateway that refuses the request
"""

import http.server
import sys

ADDRESS = ("127.0.0.1", 8025)
STATUS = int(sys.argv[1]) if len(sys.argv) > 1 else 200


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace")
        print(f"{self.command} {self.path} {body}", flush=True)
        self.send_response(STATUS)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_PUT = do_POST

    def log_message(self, format, *args):
        pass  # the line printed above is enough


if __name__ == "__main__":
    print(f"listening on http://{ADDRESS[0]}:{ADDRESS[1]}, answering {STATUS}", flush=True)
    http.server.ThreadingHTTPServer(ADDRESS, Handler).serve_forever()
