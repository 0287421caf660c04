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
    fail_first: int = 0  # answer fail_status to this many requests before succeeding
    content_type: str = "application/octet-stream"
    fail_status: int = 500
    fail_headers: dict = field(default_factory=dict)  # e.g. {"Retry-After": "1"}
    headers: dict = field(default_factory=dict)  # extra or replaced headers ({"Content-Length": "abc"})
    drip: float = 0.0  # send the body a byte at a time, this many seconds apart
    redirect: str = ""  # answer 302 to this path
    fail_body: bytes = b"try again"  # what a failed answer says (an S3 error's XML)
    cut_first: int = 0  # after fail_first, this many answers send half the body and drop the connection


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
                    return self._send(route.fail_status, route.fail_body, "text/plain", route.fail_headers)
                if n <= route.fail_first + route.cut_first:
                    self.close_connection = True
                    return self._send(route.status, route.body[: len(route.body) // 2], route.content_type,
                                      {"Content-Length": str(len(route.body))})
                if route.redirect:
                    return self._send(302, b"", "text/plain", {"Location": route.redirect})
                self._send(route.status, route.body, route.content_type, route.headers, route.drip)

            def _send(self, status, body, content_type, headers=None, drip=0.0):
                headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    if not drip:
                        self.wfile.write(body)
                    for i in range(len(body) if drip else 0):
                        self.wfile.write(body[i: i + 1])
                        self.wfile.flush()
                        time.sleep(drip)
                except (BrokenPipeError, ConnectionResetError, OSError):
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
