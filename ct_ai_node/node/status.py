"""The node's status page and metrics over HTTP (read-only, from the node's database).

``GET /``         a small HTML page for the administrator: jobs by state, recent jobs
                  with their errors, series in the spool by state, series that could
                  not be routed (``failed``) with the reason.
``GET /status``   the same as JSON.
``GET /metrics``  Prometheus text format (prometheus-client): jobs by kind and state,
                  series by state, spool free space.

Patient data never appears: series are shown by their spool key (a hash of the
UIDs and the caller's AE title), jobs by rule and destination.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)


def snapshot(queue, spool, limit: int = 30) -> dict:
    """Everything the page shows, as plain data."""
    series = spool.series()
    by_state: dict[str, int] = {}
    for rec in series:
        by_state[rec.state] = by_state.get(rec.state, 0) + 1
    jobs = [{"id": j.id, "kind": j.kind, "state": str(j.state), "attempts": j.attempts,
             "max_attempts": j.max_attempts, "parent": j.parent_id,
             "about": j.payload.get("destination") or j.payload.get("rule") or "",
             "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.updated_at)),
             "error": j.last_error or ""} for j in queue.list(limit=limit)]
    failed = sorted((r for r in series if r.state == "failed"), key=lambda r: r.updated_at, reverse=True)
    failed_series = [{"series": r.key, "instances": r.instance_count, "caller": r.calling_ae,
                      "updated": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.updated_at)),
                      "reason": r.reason or ""} for r in failed[:limit]]
    return {"jobs_by_state": queue.counts(), "series_by_state": by_state, "spool_free_mb": round(spool.free_mb()),
            "recent_jobs": jobs, "failed_series": failed_series}


class _Collector:
    def __init__(self, queue, spool):
        self.queue, self.spool = queue, spool

    def collect(self):
        jobs = GaugeMetricFamily("ctai_jobs", "Jobs in the queue by kind and state", labels=["kind", "state"])
        counts: dict[tuple[str, str], int] = {}
        for job in self.queue.list(limit=100_000):
            key = (job.kind, str(job.state))
            counts[key] = counts.get(key, 0) + 1
        for (kind, state), n in sorted(counts.items()):
            jobs.add_metric([kind, state], n)
        yield jobs
        series = GaugeMetricFamily("ctai_series", "Series in the spool by state", labels=["state"])
        for state, n in snapshot(self.queue, self.spool, limit=0)["series_by_state"].items():
            series.add_metric([state], n)
        yield series
        yield GaugeMetricFamily("ctai_spool_free_bytes", "Free space where the spool is",
                                value=self.spool.free_mb() * 2**20)


def _page(data: dict) -> str:
    def table(rows: list[dict], cols: list[str]) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                       for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    counts = ", ".join(f"{k} {v}" for k, v in data["jobs_by_state"].items() if v) or "none"
    series = ", ".join(f"{k} {v}" for k, v in data["series_by_state"].items()) or "none"
    return ("<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='5'>"
            "<title>ct-ai-node status</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
            "text-align:left}tr:nth-child(even){background:#eee}</style></head><body>"
            f"<h1>ct-ai-node</h1><p>Jobs: {html.escape(counts)}</p><p>Series in the spool: {html.escape(series)}; "
            f"free space {data['spool_free_mb']} MB</p><h2>Recent jobs</h2>"
            + table(data["recent_jobs"], ["id", "kind", "state", "attempts", "about", "parent", "updated", "error"])
            + ("<h2>Series that could not be routed</h2>"
               + table(data["failed_series"], ["series", "instances", "caller", "updated", "reason"])
               if data["failed_series"] else "")
            + "<p>Re-run a job: <code>ct-ai-node jobs requeue ID --config FILE</code></p></body></html>")


class StatusServer:
    """A background HTTP server (127.0.0.1 unless configured otherwise)."""

    def __init__(self, queue, spool, host: str = "127.0.0.1", port: int = 8080):
        registry = CollectorRegistry()
        registry.register(_Collector(queue, spool))
        lock = threading.Lock()  # one SQLite connection per object: one request at a time

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                try:
                    with lock:
                        if self.path == "/metrics":
                            body, ctype = generate_latest(registry), "text/plain; version=0.0.4"
                        elif self.path == "/status":
                            body, ctype = json.dumps(snapshot(queue, spool)).encode(), "application/json"
                        elif self.path in ("/", "/index.html"):
                            body, ctype = _page(snapshot(queue, spool)).encode(), "text/html; charset=utf-8"
                        else:
                            self.send_error(404, "not found")
                            return
                except Exception as exc:  # the page must never take the node down
                    logger.warning("status page: %s", exc)
                    self.send_error(500, "status unavailable")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):  # requests at DEBUG, not on stderr
                logger.debug("status %s", fmt % args)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="status-http", daemon=True)

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
