"""Spool -> rules -> queue: turn complete series into jobs, and close finished parents.

Called on a timer by the node (apscheduler). Each tick:

1. every parent job in ``sending`` whose ``deliver`` children are all final is closed:
   ``done`` when each child is done, ``failed`` (with the child's reason) otherwise;
2. every series that is receiving (or got new instances after it was routed or failed)
   and is complete by the quiet-time rule is routed by the pure rules; each action becomes
   a job (``analyse`` or ``forward``) with an idempotency key, so a tick that runs twice
   (or a restart between enqueue and the series update) never makes a second job.

Routing a series reads its first header, and a hostile or broken header can make that
take forever or eat all memory (an Enhanced CT claiming 2**31 frames sent the per-frame
loop round for 13 minutes and held every later tick up). So routing runs in a child
process (:class:`RouterProcess`, memory-capped) under ``completeness.route_timeout_s``:
a series that takes longer, raises, or whose header is implausible ends ``failed`` with
a one-line reason (status page, ``/status``) and is not tried again until new instances
arrive; the child is killed and replaced, and the tick goes on with the next series.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pydicom

from ct_ai_node.config import PRIORITIES, NodeConfig
from ct_ai_node.jobqueue import JobState
from ct_ai_node.logs import configure_logging, series_ref
from ct_ai_node.rules.completeness import check_ready, whole_series
from ct_ai_node.rules.routing import RoutedAction, RoutingDecision, describe_action, facts_from_datasets, route
from ct_ai_node.spool import SeriesRecord, Spool

logger = logging.getLogger(__name__)

FINAL = {JobState.DONE, JobState.FAILED, JobState.DEAD}
#: address space the routing child may add to what its imports took (one header needs a few MB)
ROUTER_MEMORY_MB = 1024
#: the child's start (spawn + imports, ~0.6 s) is not counted in a series' time
ROUTER_START_TIMEOUT_S = 120.0
#: deflate cannot shrink data more than about 1:1032
_DEFLATE_MAX_RATIO = 1100
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
_DEFLATED = "1.2.840.10008.1.2.1.99"


class RouteFailed(Exception):
    """This series cannot be routed; the message is the one-line reason kept with it."""


class DispatcherStopped(Exception):
    """The node is stopping: the series in hand is left as it is."""


#: routes one series: (config, series record, its instance files) -> decision; raises RouteFailed
Router = Callable[[NodeConfig, SeriesRecord, list[Path]], RoutingDecision]


@dataclass
class TickReport:
    routed: list[str] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    #: the earliest time (clock) a series still receiving is complete if nothing more arrives
    next_ready_at: float | None = None


def _needs_routing(rec: SeriesRecord) -> bool:
    if rec.state in ("receiving", "complete"):
        return True
    # routed, discarded or failed, and instances arrived afterwards: a new generation of the series
    return rec.state in ("routed", "discarded", "failed") and rec.last_received_at >= rec.updated_at


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
        # a worker on another host fetches the series by these (node/series_fetch.py)
        "study_uid": rec.study_instance_uid,
        "series_uid": rec.series_instance_uid,
        "priority": action.priority,
        "prior": action.prior,
        "prior_source": action.prior_source,
    }


# -- the default router (runs in the child process) ----------------------------------------

def _int(ds: pydicom.Dataset, keyword: str, default: int | None) -> int | None:
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def implausible_size(ds: pydicom.Dataset, file_size: int) -> str | None:
    """Why the pixel data the header claims cannot be in a file of ``file_size`` bytes, or None.

    Pure: a header that claims 2**31 frames, or 65535 rows over a few kB of pixel data,
    would send later stages into loops and allocations sized by the claim.
    """
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    frames = _int(ds, "NumberOfFrames", 1)
    if frames is None or rows is None or cols is None:
        return "NumberOfFrames, Rows or Columns is not a number"
    if frames < 0 or rows < 0 or cols < 0:
        return "NumberOfFrames, Rows or Columns is negative"
    if not rows or not cols:
        return None  # no image pixel description: nothing to check
    spp = max(_int(ds, "SamplesPerPixel", 1) or 1, 1)
    bits = max(_int(ds, "BitsAllocated", 16) or 16, 1)
    needed = math.ceil(max(frames, 1) * rows * cols * spp * bits / 8)
    syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", "") or "")
    claim = f"{frames} frame(s) of {rows}x{cols}x{bits} bits"
    if syntax in _NATIVE_SYNTAXES or not syntax:
        if needed > file_size:
            return f"header claims {claim} ({needed / 2**20:.0f} MB of pixel data) in a {file_size / 2**20:.2f} MB file"
    elif syntax == _DEFLATED:
        if needed > file_size * _DEFLATE_MAX_RATIO:
            return f"header claims {claim} ({needed / 2**20:.0f} MB) in a {file_size / 2**20:.2f} MB deflated file"
    elif frames * 8 > file_size:  # encapsulated: at least one 8-byte item header per frame
        return f"header claims {claim} (compressed) in a {file_size / 2**20:.2f} MB file"
    return None


def route_series(config: NodeConfig, rec: SeriesRecord, paths: list[Path]) -> RoutingDecision:
    """The default router: the first readable header -> facts -> the configured rules."""
    header, path = None, None
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
            break
        except Exception as exc:  # noqa: BLE001 - try the next file
            logger.debug("series %s: unreadable header in %s: %s", rec.key, path.name, exc)
    if header is None or path is None:
        raise RouteFailed(f"none of its {len(paths)} instance(s) has a readable DICOM header")
    problem = implausible_size(header, path.stat().st_size)
    if problem:
        raise RouteFailed(problem)
    facts = facts_from_datasets([header], rec.calling_ae, rec.called_ae, rec.caller_host)
    # the spool counts instances; the header list here is just the first one
    facts = replace(facts, instance_count=rec.instance_count)
    return route(config.rules, config.routing, facts)


# -- the child process ---------------------------------------------------------------------

def _limit_memory(extra_mb: int) -> None:
    try:
        import resource

        with open("/proc/self/statm") as f:
            now = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = now + extra_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, ImportError):
        pass  # not Linux: the time bound still holds


def _router_main(conn, config: NodeConfig, router: Router, memory_mb: int, log_level: int) -> None:
    from ct_ai_node.node.worker import _die_with_parent

    _die_with_parent()
    configure_logging(log_level, "%(asctime)s router %(levelname)s %(name)s: %(message)s")
    _limit_memory(memory_mb)
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the node is gone
        if request is None:
            return
        rec, paths = request
        try:
            answer = ("ok", router(config, rec, paths))
        except RouteFailed as exc:
            answer = ("failed", str(exc))
        except MemoryError:
            answer = ("failed", f"reading its header needs more than {memory_mb} MB")
        except Exception as exc:  # noqa: BLE001 - any error is this series' problem
            # the message may quote header values (patient data): only the place goes in the reason
            where = traceback.extract_tb(exc.__traceback__)[-1]
            answer = ("failed", f"routing raised {type(exc).__name__} in {Path(where.filename).name}:{where.name}"
                      " (details in the node log at DEBUG)")
            logger.debug("series %s: routing raised", rec.key, exc_info=True)
        conn.send(answer)


class RouterProcess:
    """Runs a :data:`Router` in a child process, one series at a time, each under a deadline.

    A series that overruns gets its child killed (SIGKILL: a loop in pydicom cannot be
    interrupted otherwise) and the next call starts a new one. ``close()`` may be called
    from another thread while a call waits: the call then raises ``DispatcherStopped``.
    """

    def __init__(self, config: NodeConfig, router: Router = route_series, *, memory_mb: int = ROUTER_MEMORY_MB,
                 log_level: int = logging.WARNING):
        # handed to the child pickled (through a pipe), not as JSON: a JSON dump masks secrets
        self._config = config
        self._router = router
        self._memory_mb = memory_mb
        self._log_level = log_level
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with SCP threads
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self._closed = False

    def _start(self):
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_router_main, name="ctai-router", daemon=True,
                                 args=(child, self._config, self._router, self._memory_mb, self._log_level))
        proc.start()
        child.close()
        with self._lock:
            if self._closed:
                proc.kill()
                raise DispatcherStopped()
            self._proc, self._conn = proc, parent
        if not parent.poll(ROUTER_START_TIMEOUT_S) or self._recv(parent)[0] != "ready":
            self._discard(proc, parent)
            if self._closed:
                raise DispatcherStopped()
            # not the series' fault: the tick leaves it for the next one
            raise RuntimeError(f"the routing process did not start (exit code {proc.exitcode})")
        return proc, parent

    @staticmethod
    def _recv(conn):
        try:
            return conn.recv()
        except (EOFError, OSError):
            return ("died", None)

    def _discard(self, proc, conn) -> None:
        with self._lock:
            if self._proc is proc:
                self._proc = self._conn = None
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        conn.close()

    def route(self, rec: SeriesRecord, paths: list[Path], timeout_s: float) -> RoutingDecision:
        with self._lock:
            if self._closed:
                raise DispatcherStopped()
            proc, conn = self._proc, self._conn
        if proc is None or not proc.is_alive():
            if proc is not None:
                self._discard(proc, conn)
            proc, conn = self._start()
        try:
            conn.send((rec, paths))
        except OSError:  # the child died between two series: once more with a new one
            self._discard(proc, conn)
            proc, conn = self._start()
            conn.send((rec, paths))
        answered = conn.poll(timeout_s)
        if self._closed:
            raise DispatcherStopped()
        if not answered:
            self._discard(proc, conn)
            raise RouteFailed(f"routing took longer than {timeout_s:g} s (header reading abandoned)")
        kind, value = self._recv(conn)
        if kind == "died":
            self._discard(proc, conn)
            if self._closed:
                raise DispatcherStopped()
            raise RouteFailed(f"the routing process ended (exit code {proc.exitcode}) while reading this series")
        if kind == "failed":
            raise RouteFailed(value)
        return value

    def close(self) -> None:
        """Kill the child; safe to call from any thread, more than once."""
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(5)


# -- the dispatcher --------------------------------------------------------------------------

class Dispatcher:
    """``router``: how one series is routed (default :func:`route_series`); it runs in a
    :class:`RouterProcess`, so it must be picklable (a module-level function)."""

    def __init__(self, config: NodeConfig, spool: Spool, queue, clock: Callable[[], float] = time.time,
                 router: Router = route_series, log_level: int = logging.WARNING):
        self.config = config
        self.spool = spool
        self.queue = queue
        self.clock = clock
        self.router = RouterProcess(config, router, log_level=log_level)
        self._router_fn, self._log_level = router, log_level
        self._pending: NodeConfig | None = None
        self._stopped = False

    def reconfigure(self, config: NodeConfig) -> None:
        """Route with ``config`` from the next tick on (the tick in progress finishes with
        the rules it started with; the routing process is restarted with the new ones)."""
        self._pending = config

    def _take_pending(self) -> None:
        config, self._pending = self._pending, None
        if config is not None:
            self.config = config
            old, self.router = self.router, RouterProcess(config, self._router_fn, log_level=self._log_level)
            old.close()
            logger.info("routing with the new configuration (%d rule(s))", len(config.rules))

    def tick(self) -> TickReport:
        self._take_pending()
        report = TickReport()
        report.closed = self.close_parents()
        for rec in self.spool.series():
            if self._stopped:
                break
            if _needs_routing(rec):
                try:
                    self._route_series(rec, report)
                except DispatcherStopped:
                    break
                except Exception as exc:  # the queue or the database: try again next tick
                    logger.error("routing series %s failed (%s); trying again on the next tick", series_ref(rec.key),
                                 type(exc).__name__)
                    logger.debug("series %s: routing failed", rec.key, exc_info=True)
        return report

    def close(self) -> None:
        """Stop routing (the tick in progress returns soon) and end the routing process."""
        self._stopped = True
        self.router.close()

    def completeness(self, rec: SeriesRecord):
        """Whether ``rec`` is complete now (``rules.completeness``): the shorter release wait
        when the released association carried the whole series."""
        c = self.config.completeness
        whole = whole_series(rec.instance_count, rec.release_carried)
        return check_ready(rec.last_received_at, rec.released_at, self.clock(), c.quiet_time_s, c.release_wait(whole))

    def _route_series(self, rec: SeriesRecord, report: TickReport) -> None:
        # the list this tick started from may be many seconds old (a slow series before this one)
        rec = self.spool.get_series(rec.key)
        if rec is None or not _needs_routing(rec):
            return  # removed or routed meanwhile
        check = self.completeness(rec)
        if not check.ready:
            if report.next_ready_at is None or check.ready_at < report.next_ready_at:
                report.next_ready_at = check.ready_at
            return
        started = time.monotonic()
        try:
            decision = self.router.route(rec, self.spool.instance_paths(rec.key),
                                         self.config.completeness.route_timeout_s)
        except RouteFailed as exc:
            reason = " ".join(str(exc).split())[:300] or "routing failed"
            self._set_state(rec, "failed", reason)
            report.failed.append(rec.key)
            # the reason may quote header values (a series description): kept on the series, DEBUG here
            logger.warning("series %s (%d instances from %s) failed after %.1f s (reason on the series)",
                           series_ref(rec.key), rec.instance_count, rec.calling_ae, time.monotonic() - started)
            logger.debug("series %s failed: %s", rec.key, reason)
            return
        generation = f"{rec.instance_count}@{rec.last_received_at:.3f}"
        for line in decision.explanation:
            logger.debug("series %s: %s", rec.key, line)
        for action in decision.actions:
            logger.info("series %s (%d instances from %s) complete, %s: %s", series_ref(rec.key), rec.instance_count,
                        rec.calling_ae, check.reason, describe_action(action))
            if action.action == "discard":
                continue
            job_id = self.queue.enqueue(
                action.action, _job_payload(rec, action),
                key=f"{action.action}:{rec.key}:{action.rule}:{generation}",
                max_attempts=self.config.retry.max_attempts, priority=PRIORITIES[action.priority],
            )
            report.jobs.append(job_id)
        self._set_state(rec, "routed" if decision.work else "discarded")
        report.routed.append(rec.key)

    def _set_state(self, rec: SeriesRecord, state: str, reason: str | None = None) -> None:
        try:
            self.spool.set_series_state(rec.key, state, reason)
            now = self.spool.get_series(rec.key)
        except KeyError:
            return  # removed meanwhile (retention)
        # an instance that came while the series was being routed is older than the state change,
        # so it would not count as new: a new generation is routed once the series is quiet again
        if now is not None and (now.instance_count, now.last_received_at) != (rec.instance_count,
                                                                               rec.last_received_at):
            logger.info("series %s: instances arrived while it was routed; it will be routed again",
                        series_ref(rec.key))
            self.spool.set_series_state(rec.key, "receiving")

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
