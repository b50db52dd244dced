"""Prometheus metrics of the node (``/metrics`` of the web app, :mod:`ct_ai_node.web.app`):
jobs by kind and state, series in the spool by state, free space where the spool is.
No patient data: counts only.
"""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily


class MetricsCollector:
    """Prometheus gauges read from the queue and the spool at each scrape."""

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
        by_state: dict[str, int] = {}
        for rec in self.spool.series():
            by_state[rec.state] = by_state.get(rec.state, 0) + 1
        for state, n in sorted(by_state.items()):
            series.add_metric([state], n)
        yield series
        yield GaugeMetricFamily("ctai_spool_free_bytes", "Free space where the spool is",
                                value=self.spool.free_mb() * 2**20)
