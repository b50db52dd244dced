"""Prometheus metrics of the node (``/metrics`` of the web app, :mod:`ct_ai_node.web.app`):
jobs by kind and state, deliveries by destination and state, series and instances in the
spool by state, free space where the spool is.
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
        deliveries = GaugeMetricFamily("ctai_deliveries", "Deliveries (results, notices, forwarded series) by "
                                       "destination and state", labels=["destination", "state"])
        by_dest: dict[tuple[str, str], int] = {}
        for job in self.queue.list(kind="deliver", limit=100_000):
            key = (str(job.payload.get("destination", "")), str(job.state))
            by_dest[key] = by_dest.get(key, 0) + 1
        for (dest, state), n in sorted(by_dest.items()):
            deliveries.add_metric([dest, state], n)
        yield deliveries
        by_state: dict[str, int] = {}
        instances: dict[str, int] = {}
        for rec in self.spool.series():
            by_state[rec.state] = by_state.get(rec.state, 0) + 1
            instances[rec.state] = instances.get(rec.state, 0) + rec.instance_count
        for state, n in sorted(by_state.items()):
            series.add_metric([state], n)
        yield series
        inst = GaugeMetricFamily("ctai_instances", "Instances in the spool by the state of their series",
                                 labels=["state"])
        for state, n in sorted(instances.items()):
            inst.add_metric([state], n)
        yield inst
        yield GaugeMetricFamily("ctai_spool_free_bytes", "Free space where the spool is",
                                value=self.spool.free_mb() * 2**20)
