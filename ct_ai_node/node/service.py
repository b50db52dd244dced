"""The node: Storage SCP + dispatcher on a timer + worker processes.

``ct-ai-node serve --config FILE`` and ``ct-ai-node demo`` run a :class:`Node`.
The SCP only writes to the spool (fast, never blocked by inference); the
dispatcher (an apscheduler job in this process) turns complete series into
jobs; workers are separate processes that claim jobs from the durable queue.
After a crash, ``start()`` recovers the spool and the queue hands out again any
job whose worker stopped renewing its lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ct_ai_node.config import NodeConfig
from ct_ai_node.node.worker_pool import WorkerPool

logger = logging.getLogger(__name__)


def scp_settings(config: NodeConfig):
    from ct_ai_node.ingress import AllowedCaller, ScpSettings, TlsSettings

    n = config.node
    tls = None
    if config.tls is not None:
        tls = TlsSettings(cert=Path(config.tls.cert), key=Path(config.tls.key),
                          ca=Path(config.tls.ca) if config.tls.ca else None,
                          require_client_cert=config.tls.require_client_cert)
    return ScpSettings(
        ae_title=n.ae_title, host=n.host, port=n.port,
        allowed_callers=[AllowedCaller(c.ae_title or "*", c.host) for c in config.allowed_callers],
        max_associations=n.max_associations, acse_timeout_s=n.acse_timeout_s,
        dimse_timeout_s=n.dimse_timeout_s, network_timeout_s=n.network_timeout_s,
        min_free_mb=config.storage.min_free_mb, max_spool_mb=config.storage.max_spool_mb, tls=tls,
    )


class Node:
    def __init__(self, config: NodeConfig, *, workers: int | None = None, log_level: int = logging.INFO,
                 config_path: Path | None = None, config_base: Path | None = None):
        """``config_path``: the file ``config`` was loaded from (resolved against
        ``config_base``, default the current folder); the web app edits it. None: the
        configuration cannot be edited while the node runs."""
        from ct_ai_node.jobqueue.factory import open_queue
        from ct_ai_node.node.dispatcher import Dispatcher
        from ct_ai_node.node.retention import Retention
        from ct_ai_node.spool import Spool

        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.config_base = Path(config_base) if config_base is not None else Path.cwd()
        st = config.storage
        for folder in (st.spool_dir, st.outbox_dir):
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.spool = Spool(st.spool_dir, st.db_path, fsync=st.fsync)
        self.queue = open_queue(config)
        self.dispatcher = Dispatcher(config, self.spool, self.queue, log_level=log_level)
        self.retention = Retention(config.retention, self.spool, self.queue, st.outbox_dir)
        self.n_workers = config.workers.count if workers is None else workers
        self.log_level = log_level
        self.scp = None
        self.feed = None
        self.web = None
        self.notifier = None
        self._scheduler = None
        #: the patient history, for forgetting old findings (node/history.py); opened by _retain
        self._history = None
        self.workers = WorkerPool(config, self.n_workers, log_level)
        self._stopping = threading.Event()

    @property
    def port(self) -> int:
        return self.scp.port if self.scp is not None else self.config.node.port

    def start(self) -> "Node":
        from apscheduler.schedulers.background import BackgroundScheduler

        from ct_ai_node.ingress import StorageSCP

        report = self.spool.recover()
        logger.info("spool recovered: %s", report)
        # before a 0xA700 the SCP has retention delete the oldest delivered series
        self.scp = StorageSCP(scp_settings(self.config), self.spool, on_released=self._released,
                              make_room=self.retention.make_room).start()
        logger.info("listening as %s on %s:%d", self.config.node.ae_title, self.config.node.host, self.scp.port)
        self.workers.start()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self._tick, "interval", seconds=self.config.completeness.check_interval_s,
                                max_instances=1, coalesce=True, id="dispatch")
        from ct_ai_node.node.notifier import Notifier

        self.notifier = Notifier(lambda: self.config, self.queue, self.spool, self.config.storage.db_path)
        self._scheduler.add_job(self._notify, "interval", seconds=self.config.completeness.check_interval_s,
                                max_instances=1, coalesce=True, id="notify")
        if self.config.orthanc_feed is not None:
            from ct_ai_node.ingress.orthanc_feed import OrthancFeed

            st = self.config.storage
            self.feed = OrthancFeed(self.config.orthanc_feed, self.spool, st.db_path,
                                    called_ae=self.config.node.ae_title, min_free_mb=st.min_free_mb,
                                    max_spool_mb=st.max_spool_mb, make_room=self.retention.make_room)
            self._scheduler.add_job(self._follow_orthanc, "interval", seconds=self.config.orthanc_feed.poll_s,
                                    max_instances=1, coalesce=True, id="orthanc-feed")
        if self.config.retention.enabled:
            self._scheduler.add_job(self._retain, "interval", seconds=self.config.retention.interval_s,
                                    max_instances=1, coalesce=True, id="retention")
        self._scheduler.start()
        if self.config.web is not None:
            from ct_ai_node.web.server import WebServer

            from ct_ai_node.node.config_store import ConfigStore

            store = (ConfigStore(self.config_path, self.config_base, self.config, self.reconfigure)
                     if self.config_path is not None else None)
            self.web = WebServer(self.config, self.services, lambda: self.config, store,
                                 self.retention.make_room).start()
            web = self.config.web
            logger.info("web app on http://%s:%d/%s", web.host, self.web.port,
                        " (no users configured: open to this machine only)" if web.open else "")
        return self

    def services(self) -> dict[str, dict]:
        """What runs, for the web app's dashboard and /healthz: name -> {up, detail}."""
        n = self.config.node
        alive = self.workers.alive
        scheduler = self._scheduler is not None and self._scheduler.running and not self._stopping.is_set()
        ret = self.config.retention
        feed = {}
        if self.feed is not None:
            where = self.config.orthanc_feed.url
            feed = {"Orthanc feed": {"up": scheduler and self.feed.last_error is None,
                                     "detail": f"{where}: {self.feed.last_error}" if self.feed.last_error
                                     else f"{where}, change {self.feed.position()}"}}
        return {
            "DICOM listener": {"up": self.scp is not None and not self._stopping.is_set(),
                               "detail": f"{n.ae_title} on port {self.port}{' (TLS)' if self.config.tls else ''}"},
            "workers": {"up": alive == self.n_workers,
                        "detail": (f"{alive} of {self.n_workers} running, device {self.config.workers.device}"
                                   if self.n_workers else "none on this host (ct-ai-node worker elsewhere)")},
            "dispatcher": {"up": scheduler, "detail": f"checks every {self.config.completeness.check_interval_s:g} s"},
            "retention": {"up": scheduler or not ret.enabled,
                          "detail": f"every {ret.interval_s:g} s" if ret.enabled else "off"},
            **feed,
        }

    def reconfigure(self, config: NodeConfig) -> None:
        """Apply an edited configuration without a restart: rules and routing from the
        dispatcher's next tick, allowed callers for the next association, destinations for
        each worker's next job. Sections that need a restart must be unchanged
        (``config_edit.restart_needed``)."""
        from ct_ai_node.config_edit import restart_needed

        changed = restart_needed(self.config, config)
        if changed:
            raise ValueError(f"{', '.join(changed)}: changing these needs a restart of the node")
        self.config = config
        self.dispatcher.reconfigure(config)
        if self.scp is not None:
            self.scp.set_allowed_callers(scp_settings(config).allowed_callers)
        self.workers.reconfigure(config)
        logger.info("configuration applied: %s", config.summary())

    def _released(self, calling_ae: str, host: str, keys) -> None:
        """An association that stored instances ended: its series are complete after the
        release wait (the shorter one when it carried a whole series), so the dispatcher's
        next tick is pulled to that moment instead of coming up to ``check_interval_s``
        later. A series that needs the longer wait sets the tick after (``_tick``)."""
        c = self.config.completeness
        self._pull_tick(time.time() + min(c.quiet_time_s, c.whole_series_release_wait_s, c.release_wait_s))

    def _pull_tick(self, at: float) -> None:
        """Run the dispatch tick at ``at`` (time.time()) if that is sooner than planned (the
        same single tick job: ticks never overlap)."""
        from datetime import datetime

        scheduler = self._scheduler
        job = scheduler.get_job("dispatch") if scheduler is not None and scheduler.running else None
        if job is None:
            return
        when = datetime.fromtimestamp(at + RELEASE_TICK_MARGIN_S, scheduler.timezone)
        try:
            if job.next_run_time is None or job.next_run_time > when:
                job.modify(next_run_time=when)
        except Exception:  # noqa: BLE001 - the job just ran or the node stops: the interval tick comes anyway
            logger.debug("dispatch tick not moved", exc_info=True)

    def _tick(self) -> None:
        try:
            report = self.dispatcher.tick()
        except Exception:  # the timer must keep running
            logger.exception("dispatcher tick failed")
            return
        if report.next_ready_at is not None:  # a series completes before the next interval tick
            self._pull_tick(report.next_ready_at)

    def _notify(self) -> None:
        web = self.config.web
        base_url = f"http://{web.host}:{self.web.port if self.web else web.port}" if web is not None else None
        try:
            self.notifier.tick(base_url)
        except Exception:  # the timer must keep running
            logger.exception("notification pass failed")

    def _follow_orthanc(self) -> None:
        try:  # the pulled series are released: the dispatcher's next tick routes them
            self.feed.poll_once()
        except Exception as exc:  # Orthanc away or the spool full: the position stays, poll again
            self.feed.last_error = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            logger.warning("Orthanc feed: %s", self.feed.last_error)

    def _retain(self) -> None:
        try:
            self.retention.run_once()
        except Exception:  # the timer must keep running
            logger.exception("retention pass failed")
        days = self.config.priors.history_days
        if days is None:
            return
        try:
            if self._history is None:  # opened once, on the first pass (a connection of its own)
                from ct_ai_node.jobqueue.factory import shared_target
                from ct_ai_node.node.history import PatientHistory

                self._history = PatientHistory(shared_target(self.config), self.config.queue.reconnect_s)
            forgotten = self._history.forget_older_than(days * 86400)
            if forgotten:
                logger.info("retention: %d study finding(s) older than priors.history_days forgotten", forgotten)
        except Exception:  # noqa: BLE001 - as above
            logger.exception("history pruning failed")

    def tick_now(self) -> None:
        self._tick()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self.web is not None:
            self.web.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        self.dispatcher.close()  # a tick waiting on a slow series returns now
        if self.feed is not None:
            self.feed.close()
        if self.scp is not None:
            self.scp.stop()
        self.workers.stop(timeout_s)
        logger.info("node stopped")

    def __enter__(self) -> "Node":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until SIGTERM / SIGINT, then stop cleanly, and in bounded time: a thread that
        is still stuck afterwards (or a stop() that hangs) ends the process after a log line."""
        from ct_ai_node.stop_signals import StopSignals

        with StopSignals() as stop:
            self.start()
            try:
                stop.wait()
            finally:
                watchdog = threading.Timer(STOP_DEADLINE_S, _force_exit,
                                           args=(f"stopping took longer than {STOP_DEADLINE_S:g} s",))
                watchdog.daemon = True
                watchdog.start()
                self.stop()
                _exit_if_threads_stuck(STUCK_THREAD_GRACE_S)
                watchdog.cancel()


#: a pulled tick comes this much after the series is due (it is then surely ready)
RELEASE_TICK_MARGIN_S = 0.05
#: stop() waits up to 10 s for workers and for associations each; beyond this, something hangs
STOP_DEADLINE_S = 45.0
#: after stop(), how long other non-daemon threads get to end before the process exits anyway
STUCK_THREAD_GRACE_S = 3.0


def _force_exit(why: str) -> None:
    logger.error("%s; ending the process now", why)
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(1)


def _exit_if_threads_stuck(grace_s: float) -> None:
    """Python joins every non-daemon thread at exit, forever: one stuck in native code or a
    loop (a pool thread of apscheduler running a tick) would keep the stopped node alive."""
    deadline = time.monotonic() + grace_s
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]
    if stuck:
        _force_exit(f"node stopped but thread(s) {', '.join(stuck)} still run")
