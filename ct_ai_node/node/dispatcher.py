"""Spool -> rules -> queue: turn complete series into jobs, and close finished parents.

Called on a timer by the node (apscheduler). Each tick:

1. every series that is receiving (or got new instances after it was routed) and is
   complete by the quiet-time rule is routed by the pure rules; each action becomes a
   job (``analyse`` or ``forward``) with an idempotency key, so a tick that runs twice
   (or a restart between enqueue and the series update) never makes a second job;
2. every parent job in ``sending`` whose ``deliver`` children are all final is closed:
   ``done`` when each child is done, ``failed`` (with the child's reason) otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import pydicom

from ct_ai_node.config import NodeConfig
from ct_ai_node.jobqueue import JobState
from ct_ai_node.rules.completeness import check_ready
from ct_ai_node.rules.routing import RoutedAction, describe_action, facts_from_datasets, route
from ct_ai_node.spool import SeriesRecord, Spool

logger = logging.getLogger(__name__)

FINAL = {JobState.DONE, JobState.FAILED, JobState.DEAD}


@dataclass
class TickReport:
    routed: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)


def _needs_routing(rec: SeriesRecord) -> bool:
    if rec.state in ("receiving", "complete"):
        return True
    # routed or discarded, and instances arrived afterwards: a new generation of the series
    return rec.state in ("routed", "discarded") and rec.last_received_at >= rec.updated_at


def _job_payload(rec: SeriesRecord, action: RoutedAction) -> dict:
    return {
        "series_key": rec.key,
        "rule": action.rule,
        "action": action.action,
        "pipeline": action.pipeline,
        "lungs": action.lungs,
        "destinations": list(action.destinations),
        "instance_count": rec.instance_count,
        "calling_ae": rec.calling_ae,
        "notify_not_analysed": action.notify_not_analysed,
    }


class Dispatcher:
    def __init__(self, config: NodeConfig, spool: Spool, queue, clock: Callable[[], float] = time.time):
        self.config = config
        self.spool = spool
        self.queue = queue
        self.clock = clock

    def tick(self) -> TickReport:
        report = TickReport()
        for rec in self.spool.series():
            if _needs_routing(rec):
                try:
                    self._route_series(rec, report)
                except Exception:  # one bad series must not stop the others
                    logger.exception("routing series %s failed", rec.key)
        report.closed = self.close_parents()
        return report

    def _first_header(self, rec: SeriesRecord) -> pydicom.Dataset | None:
        for path in self.spool.instance_paths(rec.key):
            try:
                return pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as exc:  # noqa: BLE001 - try the next file
                logger.warning("series %s: unreadable header in %s: %s", rec.key, path.name, exc)
        return None

    def _route_series(self, rec: SeriesRecord, report: TickReport) -> None:
        check = check_ready(rec.last_received_at, rec.released_at, self.clock(),
                            self.config.completeness.quiet_time_s)
        if not check.ready:
            return
        header = self._first_header(rec)
        if header is None:
            logger.warning("series %s: no readable instance; left in the spool", rec.key)
            self.spool.set_series_state(rec.key, "discarded")
            return
        facts = facts_from_datasets([header], rec.calling_ae, rec.called_ae, rec.caller_host)
        # the spool counts instances; the header list here is just the first one
        facts = type(facts)(**{**facts.__dict__, "instance_count": rec.instance_count})
        decision = route(self.config.rules, self.config.routing, facts)
        generation = f"{rec.instance_count}@{rec.last_received_at:.3f}"
        for line in decision.explanation:
            logger.debug("series %s: %s", rec.key, line)
        for action in decision.actions:
            logger.info("series %s (%d instances from %s) complete, %s: %s", rec.key, rec.instance_count,
                        rec.calling_ae, check.reason, describe_action(action))
            if action.action == "discard":
                continue
            job_id = self.queue.enqueue(
                action.action, _job_payload(rec, action),
                key=f"{action.action}:{rec.key}:{action.rule}:{generation}",
                max_attempts=self.config.retry.max_attempts,
            )
            report.jobs.append(job_id)
        self.spool.set_series_state(rec.key, "routed" if decision.work else "discarded")
        report.routed.append(rec.key)

    def close_parents(self) -> list[int]:
        closed = []
        for parent in self.queue.list(state=JobState.SENDING, limit=1000):
            children = self.queue.children(parent.id)
            if not children or any(c.state not in FINAL for c in children):
                continue
            bad = [c for c in children if c.state != JobState.DONE]
            if bad:
                reasons = "; ".join(f"{c.payload.get('destination')}: {c.last_error}" for c in bad)
                self.queue.mark_failed(parent.id, f"delivery failed: {reasons}")
                logger.warning("job %d failed: %d of %d deliveries failed", parent.id, len(bad), len(children))
            else:
                self.queue.complete(parent.id)
                logger.info("job %d done: results delivered to %d destination(s)", parent.id, len(children))
            closed.append(parent.id)
        return closed
