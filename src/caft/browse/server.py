"""The `caft browse` web server: the standard library's http.server, bound to 127.0.0.1 only.

Routes: GET / (and /app.js, /app.css: the page, read from the package into memory at start, so
no request path ever reaches the file system), GET /api/candidates, GET /api/state, POST
/api/selection. A request whose Host is not this server's (DNS rebinding) is refused, and a save
must be a same-origin JSON POST, so another web page open in the browser cannot write the selection.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from caft.errors import CaftError

from .review import Review

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY_BYTES = 2_000_000
STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere: no CDN, no web fonts, no remote images.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    """{url path: (bytes, content type)} for the files in caft/browse/static."""
    folder = resources.files("caft.browse") / "static"
    pages: dict[str, tuple[bytes, str]] = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in STATIC_TYPES:
            pages["/" + item.name] = (item.read_bytes(), STATIC_TYPES[suffix])
    if "/index.html" not in pages:
        raise CaftError(f"The browse page is missing from the installed package ({folder}).")
    pages["/"] = pages["/index.html"]
    return pages


class BrowseServer(ThreadingHTTPServer):
    """Serves one Review on http://127.0.0.1:PORT/ (port 0: a free one)."""

    daemon_threads = True

    def __init__(self, review: Review, port: int = 0):
        self.review = review
        self.static = load_static()
        self.candidates_json = json.dumps(review.candidates_payload()).encode()
        try:
            super().__init__((HOST, port), _Handler)
        except OSError as error:
            raise CaftError(
                f"Cannot listen on {HOST}:{port} ({error.strerror}): pass another --port, or "
                "--port 0 for a free one."
            ) from error

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def allowed_hosts(self) -> set[str]:
        return {f"{HOST}:{self.port}", f"localhost:{self.port}"}


class _Handler(BaseHTTPRequestHandler):
    server: BrowseServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path == "/api/candidates":
            self._send(HTTPStatus.OK, self.server.candidates_json, "application/json")
        elif path == "/api/state":
            self._send_json(HTTPStatus.OK, self.server.review.state())
        elif path in self.server.static:
            body, content_type = self.server.static[path]
            self._send(HTTPStatus.OK, body, content_type)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"Not found: {path}"})

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        path = urlsplit(self.path).path
        if path != "/api/selection":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"Not found: {path}"})
            return
        payload = self._read_json_body()
        if payload is None:
            return
        try:
            state = self.server.review.save(payload)
        except CaftError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except OSError as error:
            logger.error("browse: save failed: %s", error)
            self._send_json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": f"Could not write the selection: {error}"},
            )
        else:
            self._send_json(HTTPStatus.OK, state)

    def _read_json_body(self):
        """The posted JSON, or None after answering with the reason it was refused."""
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc not in self.server.allowed_hosts():
            self._send_json(HTTPStatus.FORBIDDEN, {"error": f"Cross-origin save refused: {origin}"})
            return None
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != "application/json":
            self._send_json(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                {"error": "Send the selection as Content-Type: application/json."},
            )
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY_BYTES:
            self._send_json(
                HTTPStatus.BAD_REQUEST,
                {"error": f"Expected a JSON body of 1 to {MAX_BODY_BYTES} bytes."},
            )
            return None
        try:
            return json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"Invalid JSON: {error}"})
            return None

    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        if host in self.server.allowed_hosts():
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": f"Unexpected Host header {host!r}."})
        return False

    def _send_json(self, status: HTTPStatus, data) -> None:
        self._send(status, json.dumps(data).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:  # an unread request body must not be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        logger.debug("browse: %s %s", self.address_string(), format % args)
