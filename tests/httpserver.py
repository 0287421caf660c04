"""A real HTTP server on 127.0.0.1 for download tests and the download benchmark.

Routes map a path to a behaviour; every GET is counted per path so tests can assert what was
fetched (and what a resumed run did not fetch again).
"""

from __future__ import annotations

import collections
import http.server
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    delay: float = 0.0  # seconds before the response starts (a slow server)
    fail_first: int = 0  # answer 500 to this many requests before succeeding
    content_type: str = "application/octet-stream"


@dataclass
class ImageServer:
    routes: dict[str, Route] = field(default_factory=dict)
    hits: collections.Counter = field(default_factory=collections.Counter)
    latency: float = 0.0  # added to every response
    url: str = ""

    def __post_init__(self):
        lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                with lock:
                    server.hits[self.path] += 1
                    n = server.hits[self.path]
                route = server.routes.get(self.path)
                time.sleep(server.latency + (route.delay if route else 0.0))
                if route is None:
                    return self._send(404, b"not found", "text/plain")
                if n <= route.fail_first:
                    return self._send(500, b"try again", "text/plain")
                self._send(route.status, route.body, route.content_type)

            def _send(self, status, body, content_type):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to do

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
