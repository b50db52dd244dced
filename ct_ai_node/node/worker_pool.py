"""The worker processes of one host: started, replaced when they die, given edited
configurations, stopped. ``Node`` runs a pool beside its listener; ``ct-ai-node worker`` runs
a pool alone (a worker host: no listener, no dispatcher, docs/scale-out.md)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time

from ct_ai_node.config import NodeConfig

logger = logging.getLogger(__name__)

#: how often the pool looks for a worker process that ended
SUPERVISE_EVERY_S = 2.0


class WorkerPool:
    def __init__(self, config: NodeConfig, count: int, log_level: int = logging.INFO, name: str | None = None,
                 housekeeping=None, housekeeping_s: float = 300.0):
        """``housekeeping``: called every ``housekeeping_s`` from the supervisor thread (a
        worker host prunes its outbox with it; errors are logged, never fatal)."""
        self.config = config
        self.count = count
        self.log_level = log_level
        #: owners are ``<name>-w<index>``: the node's AE title, or the worker host's name
        self.name = name or config.node.ae_title
        self._procs: list[multiprocessing.Process] = []
        self._updates: dict[int, object] = {}  # worker index -> its queue of edited configurations
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a process with SCP threads
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._housekeeping = housekeeping
        self._housekeeping_s = housekeeping_s

    def start(self) -> "WorkerPool":
        for i in range(self.count):
            self._procs.append(self._spawn(i))
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
        self._supervisor.start()
        return self

    @property
    def alive(self) -> int:
        return sum(p.is_alive() for p in self._procs)

    @property
    def processes(self) -> list[multiprocessing.Process]:
        return list(self._procs)

    def _spawn(self, index: int) -> multiprocessing.Process:
        from ct_ai_node.node.worker import worker_process_main

        # not daemonic: a worker forks its heat-map writer; it dies with its parent
        # (PDEATHSIG) and stop() ends it
        owner = f"{self.name}-w{index}"
        updates = self._ctx.Queue()
        # N workers on C cores get C/N torch threads each: more would only fight over the cores
        threads = max(1, (os.cpu_count() or 1) // max(1, self.count))
        proc = self._ctx.Process(target=worker_process_main, name=owner,
                                 args=(self.config, owner, self.log_level, updates, threads))
        proc.start()
        self._updates[index] = updates
        return proc

    def reconfigure(self, config: NodeConfig) -> None:
        """Each worker takes ``config`` before its next job."""
        self.config = config
        for updates in self._updates.values():
            updates.put(config)

    def _supervise(self) -> None:
        # a worker that died (killed by the OOM killer, a crash in native code) is replaced;
        # its job comes back to the queue when the lease runs out
        next_housekeeping = time.monotonic()
        while not self._stopping.wait(SUPERVISE_EVERY_S):
            for i, proc in enumerate(self._procs):
                if not proc.is_alive() and not self._stopping.is_set():
                    logger.warning("worker %s ended (exit code %s); starting a new one", proc.name, proc.exitcode)
                    self._procs[i] = self._spawn(i)
            if self._housekeeping is not None and time.monotonic() >= next_housekeeping:
                next_housekeeping = time.monotonic() + self._housekeeping_s
                try:
                    self._housekeeping()
                except Exception:  # noqa: BLE001 - e.g. the database away: next time
                    logger.exception("housekeeping failed")

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self._procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs.clear()

    def serve_forever(self) -> None:
        """Run until SIGTERM / SIGINT (``ct-ai-node worker``), then stop the workers."""
        from ct_ai_node.stop_signals import StopSignals

        with StopSignals() as stop:
            self.start()
            logger.info("%d worker(s) started (%s, device %s)", self.count, self.name, self.config.workers.device)
            try:
                stop.wait()
            finally:
                self.stop()
                logger.info("workers stopped")
