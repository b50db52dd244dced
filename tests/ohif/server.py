"""Serve the prebuilt OHIF viewer and proxy ``/dicom-web/`` to Orthanc, on one origin.

One origin for the viewer and the DICOMweb server: no CORS in the way, and the
bulk-data URIs Orthanc builds from the ``Host`` header point back through this proxy.
Static files come from OHIF's ``dist/`` (any unknown path is the single-page app's
``index.html``); ``/app-config.js`` is the deployment's (deployment/ohif/app-config.js: this origin + /dicom-web).
"""

from __future__ import annotations

import http.client
import logging
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
#: the deployment's own app config (its DICOMweb root is the page's origin + /dicom-web)
APP_CONFIG = HERE.parent.parent / "deployment" / "ohif" / "app-config.js"
TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript",
         ".css": "text/css", ".json": "application/json", ".svg": "image/svg+xml"}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade"}


def app_config() -> bytes:
    return APP_CONFIG.read_bytes()


class ViewerServer:
    """``ThreadingHTTPServer`` on a free loopback port, in a daemon thread."""

    def __init__(self, dist: Path, orthanc_port: int):
        self.dist = Path(dist).resolve()
        self.orthanc_port = orthanc_port
        self.requests: list[tuple[str, int]] = []  # (path, status) of proxied calls, for failure messages
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet: the test prints what matters
                logger.debug("viewer server: " + fmt, *args)

            def do_GET(self):
                path = urlsplit(self.path).path
                if path.startswith("/dicom-web/") or path.startswith("/wado"):
                    owner._proxy(self)
                elif path == "/app-config.js":
                    self._send(200, app_config(), "text/javascript")
                else:
                    owner._static(self, path)

            def _send(self, status: int, body: bytes, ctype: str):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self._handler = Handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-viewer-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ViewerServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def _static(self, h: BaseHTTPRequestHandler, path: str) -> None:
        target = (self.dist / path.lstrip("/")).resolve()
        if not target.is_file() or self.dist not in target.parents:
            target = self.dist / "index.html"  # single-page app: the router reads the path
        body = target.read_bytes()
        ctype = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        h._send(200, body, ctype)

    def _proxy(self, h: BaseHTTPRequestHandler) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.orthanc_port, timeout=120)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            conn.request("GET", h.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            self.requests.append((h.path, 502))
            h._send(502, f"Orthanc unreachable: {exc}".encode(), "text/plain")
            return
        finally:
            conn.close()
        self.requests.append((h.path, resp.status))
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
