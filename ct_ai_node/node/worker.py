"""Queue -> analysis / sending: what a worker process does with one job.

Job kinds (payloads are written by the dispatcher):

``analyse``  run ``analyze_folder`` on the series (in the spool, or fetched from the ingress
             node by a worker on another host: ``node/series_fetch.py``) into ``outbox/job-<id>``,
             then one ``deliver`` child per destination; the parent waits in ``sending``
             until the dispatcher closes it. Re-claimed after a crash, it re-runs the
             analysis, or, when its children exist already, only goes back to ``sending``.
``forward``  one ``deliver`` child per destination with the spool files themselves.
``deliver``  send the listed files to one destination; a failure is retried with backoff
             by the queue and ends in ``dead`` with its reason after ``max_attempts``.
``notify``   send one notification (webhook or e-mail) made by ``node/notifier.py``; retried
             like a delivery.

A worker holds a lease on its job and renews it from a thread while the job runs, so a
long analysis is not taken over, while a crashed worker's job is picked up again.
Deliveries are queued in the worker's lane (``workers.lane``): only workers that see the
same outbox send them, since the result files lie on that host's disk.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from ct_ai_node.config import DEFAULT_LUNGS, DEFAULT_PIPELINE, NodeConfig
from ct_ai_node.jobqueue import Job, JobState, LeaseLost
from ct_ai_node.logs import configure_logging, series_ref
from ct_ai_node.node.history import PatientHistory
from ct_ai_node.node.revisions import RevisionLog, instance_fingerprint
from ct_ai_node.stop_signals import StopSignals

logger = logging.getLogger(__name__)

KINDS = ("analyse", "forward", "deliver", "notify")
#: a parent in ``sending`` is closed by the dispatcher, not by a worker: it keeps a long
#: lease so that no worker claims it while its deliveries are retried
PARENT_LEASE_S = 365 * 24 * 3600.0
#: exit status of a worker process that ended itself after a job overran workers.job_timeout_s
EXIT_OVERRUN = 70


class _Final(Exception):
    """A failure that another attempt cannot cure: the job ends ``dead`` with this reason."""


class _LeaseKeeper:
    """Renews a job's lease every third of ``lease_s`` until stopped; past ``time_limit_s``
    it stops renewing and calls ``on_overrun`` once (from its own thread: the job's thread
    may be stuck anywhere, even in native code)."""

    def __init__(self, queue, job_id: int, owner: str, lease_s: float, time_limit_s: float = math.inf,
                 on_overrun: Callable[[], None] | None = None):
        self.queue, self.job_id, self.owner, self.lease_s = queue, job_id, owner, lease_s
        self.time_limit_s, self.on_overrun = time_limit_s, on_overrun
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.time_limit_s
        while not self._stop.wait(max(min(self.lease_s / 3, deadline - time.monotonic()), 0.0)):
            if time.monotonic() >= deadline:
                self.lost = True
                if self.on_overrun is not None:
                    self.on_overrun()
                return
            try:
                renewed = self.queue.renew(self.job_id, self.owner, self.lease_s)
            except Exception as exc:  # noqa: BLE001 - the database is away: nobody else can claim meanwhile
                logger.warning("job %d: lease not renewed (%s); trying again", self.job_id, type(exc).__name__)
                continue
            if not renewed:
                self.lost = True
                logger.warning("job %d: lease lost", self.job_id)
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker_lane(config: NodeConfig) -> str:
    """The lane of this host's result files: ``workers.lane``, else host name + outbox folder."""
    import socket

    return config.workers.lane or f"{socket.gethostname()}:{Path(config.storage.outbox_dir).resolve()}"


def analyses_of(config: NodeConfig) -> list[tuple[str, str]]:
    """The (pipeline, lungs) pairs the rules' ``analyse`` actions ask for, in rule order."""
    actions = [*config.rules, config.routing.fallback]
    pairs = [(a.pipeline or DEFAULT_PIPELINE, a.lungs or DEFAULT_LUNGS) for a in actions if a.action == "analyse"]
    return list(dict.fromkeys(pairs))


class Worker:
    def __init__(self, config: NodeConfig, owner: str | None = None, queue=None, spool=None):
        from ct_ai_node.jobqueue.factory import open_queue, shared_target
        from ct_ai_node.node.series_fetch import SeriesSource

        self.config = config
        self.owner = owner or f"worker-{os.getpid()}"
        st = config.storage
        self.queue = queue or open_queue(config)
        self.source = SeriesSource(config, spool)
        self.revisions = RevisionLog(shared_target(config), config.queue.reconnect_s)
        self.history = PatientHistory(shared_target(config), config.queue.reconnect_s)
        self.outbox = Path(st.outbox_dir)
        self.lane = worker_lane(config)
        self.lease_s = float(config.workers.lease_s)
        #: a worker process ends itself after a job overran its time (the node replaces it);
        #: in-process (tests, tools) only the job is failed
        self.exit_on_overrun = False
        self._waiting_parent: int | None = None
        #: a JobLogHandler keeping the lines logged during each job (worker processes)
        self.job_log = None
        #: the networks, kept loaded from one series to the next (a ModelCache; made on first
        #: use, so that a worker that only delivers never imports torch)
        self._models = None

    def models(self):
        if self._models is None:
            from ct_ai_node.pipeline.model_cache import ModelCache

            self._models = ModelCache()
        return self._models

    def _options(self, pipeline: str | None, lungs: str | None):
        """The analysis options of a job (or of a rule, for the warm-up)."""
        from ct_ai_node.analyze import AnalyzeOptions

        return AnalyzeOptions(pipeline=pipeline or DEFAULT_PIPELINE, lungs=lungs or DEFAULT_LUNGS,
                              device=self.config.workers.device)

    def warm_up(self) -> None:
        """Build the networks of every analysis the rules ask for and run them once on a small
        phantom, before the first series (their one-time costs stay out of its time). A
        failure here is logged; the analysis itself then says what is wrong."""
        from ct_ai_node.analyze import resolve_device

        for pipeline, lungs in analyses_of(self.config):
            opts = self._options(pipeline, lungs)  # what the jobs of that rule will ask for
            try:
                seconds = self.models().warm_up(opts.pipeline, opts.lungs, opts.infection, resolve_device(opts.device),
                                              opts.weights_dir)
            except Exception as exc:  # noqa: BLE001 - the first job reports it with its reason
                logger.warning("warm-up of %s failed: %s", pipeline, " ".join(str(exc).split())[:200])
                continue
            logger.info("%s networks (lungs %s) loaded and warmed up in %.1f s", pipeline, lungs, seconds)

    # -- loop --------------------------------------------------------------------------

    def run_once(self, kinds=KINDS) -> Job | None:
        job = self.queue.claim(kinds, self.owner, self.lease_s, lanes=[self.lane])
        if job is None:
            return None
        if self.job_log is not None:
            self.job_log.job_id = job.id
        try:
            return self._run(job)
        finally:
            if self.job_log is not None:
                self.job_log.job_id = None

    def _run(self, job: Job) -> Job:
        logger.info("job %d (%s) claimed by %s, attempt %d of %d", job.id, job.kind, self.owner,
                    job.attempts, job.max_attempts)
        self._waiting_parent = None
        try:
            with _LeaseKeeper(self.queue, job.id, self.owner, self.lease_s,
                              self.config.workers.job_timeout_s, lambda: self._overrun(job)):
                getattr(self, f"_{job.kind}")(job)
            if self._waiting_parent is not None:  # after the keeper stopped: it would shorten it
                self.queue.renew(self._waiting_parent, self.owner, PARENT_LEASE_S)
        except LeaseLost as exc:
            logger.warning("job %d: %s", job.id, exc)
        except _Final as exc:
            logger.error("job %d failed for good (reason on the job)", job.id)
            self._fail(job, str(exc), retryable=False)
        except Exception as exc:  # noqa: BLE001 - any failure becomes a retry, never a dead worker
            # the message may quote header values: on the job (its page), DEBUG here
            logger.error("job %d failed: %s (message on the job)", job.id, type(exc).__name__)
            logger.debug("job %d failed", job.id, exc_info=True)
            self._fail(job, f"{type(exc).__name__}: {exc}", retryable=True)
        return job

    def run_forever(self, stop: threading.Event | StopSignals | None = None, idle_s: float = 0.5,
                    updates=None) -> None:
        """Take jobs until ``stop`` is set (an Event, or the process's StopSignals). Between
        jobs, the newest configuration on ``updates`` (a queue the node puts edited
        configurations on) replaces this worker's (destinations, rules)."""
        stop = stop or threading.Event()
        parent = os.getppid()
        while not stop.is_set():
            if os.getppid() != parent:  # the node died: do not go on alone
                logger.warning("node process gone; worker %s stops", self.owner)
                return
            if updates is not None:
                self._take_update(updates)
            try:
                job = self.run_once()
            except Exception as exc:  # noqa: BLE001 - the queue's database is away: wait, then ask again
                logger.error("worker %s cannot reach the job queue (%s); trying again", self.owner,
                             " ".join(str(exc).split())[:200])
                stop.wait(max(idle_s, 5.0))
                continue
            if job is None:
                stop.wait(idle_s)

    def _take_update(self, updates) -> None:
        import queue as queue_module

        config = None
        try:
            while True:
                config = updates.get_nowait()
        except queue_module.Empty:
            pass
        if config is not None:
            self.config = config
            logger.info("worker %s: new configuration (%d destination(s))", self.owner, len(config.destinations))

    def _overrun(self, job: Job) -> None:
        """The job ran past ``workers.job_timeout_s``: fail it for good (with its notice), then,
        in a worker process, exit so that the node starts a fresh worker; the stuck thread
        cannot be stopped any other way."""
        limit = self.config.workers.job_timeout_s
        logger.error("job %d (%s) still running after %.0f s (workers.job_timeout_s): failed", job.id, job.kind,
                     limit)
        recorder = threading.Thread(target=self._fail, daemon=True, args=(
            job, f"{job.kind} did not finish within workers.job_timeout_s ({limit:.0f} s)", False))
        recorder.start()
        recorder.join(60)  # the notice reads the source again: bounded, the exit must come
        if self.exit_on_overrun:
            logging.shutdown()
            os._exit(EXIT_OVERRUN)

    def _fail(self, job: Job, reason: str, retryable: bool) -> None:
        if job.kind == "analyse" and (not retryable or job.attempts >= job.max_attempts):
            # the last attempt: the notice is queued before the job goes dead, so a crash in
            # between still leaves it queued (the claim then marks the job dead)
            why = reason.removeprefix("analysis failed: ")
            self._not_analysed(job, f"the analysis failed ({job.attempts} attempt(s)): {why}")
        try:
            self.queue.fail(job.id, reason, retryable=retryable, owner=self.owner)
        except LeaseLost:
            logger.warning("job %d: lease lost before recording its failure", job.id)
            logger.debug("job %d: unrecorded failure: %s", job.id, reason)

    # -- kinds -------------------------------------------------------------------------

    def _enqueue_deliveries(self, job: Job, destinations, files: list[Path], notice: bool = False) -> None:
        """One ``deliver`` child per destination, keyed ``deliver:`` (results) or ``notice:``
        (a not-analysed notice) + job + destination, so a second call adds nothing."""
        extra = {"notice": True} if notice else {}
        for name in destinations:
            self.queue.enqueue("deliver", {"destination": name, "files": [str(p) for p in files],
                                           "series_key": job.payload.get("series_key"), **extra},
                               key=f"{'notice' if notice else 'deliver'}:{job.id}:{name}", parent_id=job.id,
                               max_attempts=self.config.retry.max_attempts, priority=job.priority,
                               lane=self.lane)

    def _start_deliveries(self, job: Job, files: list[Path]) -> None:
        destinations = job.payload.get("destinations") or []
        if not destinations:
            self.queue.complete(job.id, owner=self.owner)
            logger.info("job %d done: no destination configured", job.id)
            return
        self._enqueue_deliveries(job, destinations, files)
        self.queue.set_state(job.id, JobState.SENDING, owner=self.owner)
        self._waiting_parent = job.id

    def _analyse(self, job: Job) -> None:
        from ct_ai_node.analyze import analyze_folder

        # analysed before a crash: only the sending is left (notice deliveries do not count:
        # after a crash the analysis runs again and decides again)
        if any(not c.payload.get("notice") for c in self.queue.children(job.id)):
            self.queue.set_state(job.id, JobState.SENDING, owner=self.owner)
            self._waiting_parent = job.id
            return
        key = job.payload["series_key"]
        out = self.outbox / f"job-{job.id}"
        _clear_outbox(out)  # a half-written earlier attempt; a notice on its way stays
        scratch = self.outbox / f"fetched-{job.id}"
        prior_scratch = self.outbox / f"prior-{job.id}"
        try:
            source, _, uids = self._open_series(job, scratch)
            options = self._options(job.payload.get("pipeline"), job.payload.get("lungs"))
            # the same instances again -> the same revision and result UIDs; changed -> the next
            fingerprint = instance_fingerprint(uids)
            plan = self.revisions.plan(key, options.pipeline, fingerprint)
            options.revision, options.predecessor = plan.revision, plan.predecessor
            options.priors = self._prior_lookup(job, options, prior_scratch)
            start = time.perf_counter()
            doc = analyze_folder(source, out, options, models=self.models())
            seconds = time.perf_counter() - start
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(prior_scratch, ignore_errors=True)
        self._keep_summary(job)
        if doc.status == "done":
            self.revisions.record(key, options.pipeline, plan.revision, fingerprint, _report_in(out), job.id)
        if doc.status == "rejected":
            # the series cannot be analysed: final, with the reason on the job and in result.json;
            # the notice's deliveries (children) go on after the job is final
            self._not_analysed(job, doc.reason or "refused by the analysis")
            self.queue.mark_failed(job.id, f"not analysed: {doc.reason}")
            logger.info("job %d: series %s not analysed (reason on the job)", job.id, series_ref(key))
            logger.debug("job %d: series %s not analysed: %s", job.id, key, doc.reason)
            return
        if doc.status != "done":
            self._fail(job, f"analysis failed: {doc.reason}", retryable=True)
            return
        logger.info("job %d: analysis done in %.1f s: %s, p=%.3f, %d objects, revision %d", job.id, seconds,
                    doc.label, doc.probability or 0.0, len(doc.outputs), plan.revision)
        self._start_deliveries(job, [out / name for name in doc.outputs])

    def _prior_lookup(self, job: Job, options, scratch: Path):
        """The job's comparison with a prior study (its rule's ``prior``; jobs queued before
        rules had it: none)."""
        from dataclasses import replace

        from ct_ai_node.analyze import analyze_folder
        from ct_ai_node.node.priors import PriorLookup

        mode = job.payload.get("prior") or "off"
        if mode == "off":
            return None
        settings = self.config.priors
        if mode == "history":
            return PriorLookup(self.history, settings, options.pipeline, job_id=job.id)
        from ct_ai_node.config import PRIOR_SOURCE_KINDS
        from ct_ai_node.ingress.prior_retrieve import prior_source

        try:
            peer = self.config.destination(job.payload.get("prior_source") or "")
        except KeyError:
            peer = None
        if peer is None or peer.kind not in PRIOR_SOURCE_KINDS:  # changed since the job was queued
            logger.warning("job %d: prior source %r is no DICOM or DICOMweb destination now; history only", job.id,
                           job.payload.get("prior_source"))
            return PriorLookup(self.history, settings, options.pipeline, job_id=job.id)
        query = prior_source(peer, self.config.node.ae_title, settings.query_timeout_s)
        # the prior: the same networks, no result objects, no comparison of its own
        prior_options = replace(options, priors=None, findings_only=True, revision=1, predecessor=None)

        def analyse_prior(folder: Path):
            return analyze_folder(folder, scratch / "result", prior_options, models=self.models())

        return PriorLookup(self.history, settings, options.pipeline, "query", query, analyse_prior, scratch,
                           job.id)

    def _keep_summary(self, job: Job) -> None:
        """The result's summary in the shared database: the ingress node's web app shows it
        even when this worker runs on another host."""
        from ct_ai_node.result import read_result

        summary = read_result(self.outbox, job.id) if self.job_log is not None else None
        if summary is None:
            return
        try:
            self.job_log.log.set_summary(job.id, summary)
        except Exception as exc:  # noqa: BLE001 - only the web app's view of it is missing
            logger.warning("job %d: result summary not kept (%s)", job.id, type(exc).__name__)

    def _not_analysed(self, job: Job, reason: str) -> None:
        """Write the "AI analysis not performed: <reason>" SC + SR into the job's outbox
        folder and queue one ``deliver`` child per destination (key ``notice:<job>:<name>``:
        once per job, retried and dead-lettered like results). Never raises: the job's own
        failure must be recorded whatever happens here."""
        destinations = job.payload.get("destinations") or []
        if job.payload.get("notify_not_analysed") is False or not destinations:
            return
        try:
            if any(c.payload.get("notice") for c in self.queue.children(job.id)):
                return  # queued before (a crash, a requeue): its files stay as they were sent
            files = self._write_notice(job, reason)
            if not files:
                return
            self._enqueue_deliveries(job, destinations, files, notice=True)
            logger.info("job %d: not-analysed notice queued for %s", job.id, ", ".join(destinations))
        except Exception:  # noqa: BLE001 - see above
            logger.exception("job %d: the not-analysed notice could not be queued", job.id)

    def _write_notice(self, job: Job, reason: str) -> list[Path]:
        import json

        import pydicom

        from ct_ai_node.output_folder import write_dataset
        from ct_ai_node.writers.notice import algorithm_for_pipeline, build_notice

        header = None
        scratch = self.outbox / f"fetched-{job.id}"
        try:
            _, paths, _ = self.source.open(job.payload, scratch)
        except Exception as exc:  # noqa: BLE001 - no header, no notice; the job's own failure stands
            logger.warning("job %d: the series cannot be read again (%s): no not-analysed notice", job.id,
                           type(exc).__name__)
            paths = []
        for path in paths:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                break
            except Exception:  # noqa: BLE001 - try the next file
                continue
        shutil.rmtree(scratch, ignore_errors=True)
        if header is None:
            logger.warning("job %d: no readable instance left: no not-analysed notice", job.id)
            return []
        pipeline = job.payload.get("pipeline") or "radlogics"
        notice = build_notice(header, reason, algorithm_for_pipeline(pipeline), pipeline)
        out = self.outbox / f"job-{job.id}"
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name, ds in notice.named():
            write_dataset(ds, out / name)
            files.append(out / name)
        # result.json (written by the analysis, or not when it raised) names the notice too
        doc_path = out / "result.json"
        try:
            doc = json.loads(doc_path.read_text())
        except (OSError, ValueError):
            doc = {"status": "failed", "reason": reason}
        doc["notice_outputs"] = notice.sop_classes()
        tmp = out / ".result.json.tmp"
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, doc_path)
        return files

    def _open_series(self, job: Job, scratch: Path) -> tuple[Path, list[Path], list[str]]:
        """The job's series as files (``SeriesSource``); a fetch that cannot succeed fails the
        job for good with its reason."""
        from ct_ai_node.node.series_fetch import FetchError

        try:
            return self.source.open(job.payload, scratch)
        except FetchError as exc:
            if exc.retryable:
                raise
            raise _Final(str(exc)) from exc

    def _forward(self, job: Job) -> None:
        # a fetched copy is what the deliveries send: it stays in the job's outbox folder
        _, files, _ = self._open_series(job, self.outbox / f"job-{job.id}" / "series")
        if not files:
            self.queue.mark_failed(job.id, "nothing to forward: the series has no instances in the spool")
            return
        self._start_deliveries(job, files)

    def destination(self, name: str):
        from ct_ai_node.egress import destination_from_config

        cfg = self.config.destination(name)
        if cfg.kind == "dicom":
            cfg = cfg.model_copy(update={"calling_ae_title": cfg.calling_ae(self.config.node.ae_title)})
        return destination_from_config(cfg)

    def _deliver(self, job: Job) -> None:
        from ct_ai_node.egress import DestinationError

        name = job.payload["destination"]
        files = [Path(p) for p in job.payload["files"]]
        missing = [p for p in files if not p.is_file()]
        if missing:
            self._fail(job, f"{len(missing)} result file(s) missing, e.g. {missing[0].name}", retryable=False)
            return
        try:
            report = self.destination(name).send(files)
        except DestinationError as exc:
            state = self.queue.fail(job.id, str(exc), retryable=exc.retryable, owner=self.owner)
            logger.warning("job %d: delivery to %s failed (%s): %s", job.id, name, state, exc)
            return
        self.queue.complete(job.id, owner=self.owner)
        logger.info("job %d: %d object(s) delivered to %s in %.2f s", job.id, report.total, name, report.seconds)

    def _notify(self, job: Job) -> None:
        from ct_ai_node.node.notifier import send

        name = job.payload["notification"]
        try:
            note = self.config.notification(name)
        except KeyError:  # removed from the configuration since: nothing to send it with
            self._fail(job, f"notification {name!r} is no longer configured", retryable=False)
            return
        outcome = send(note, job.payload["subject"], job.payload["text"], job.payload.get("fields", {}))
        self.queue.complete(job.id, owner=self.owner)
        logger.info("job %d: notification %s (%s) sent: %s", job.id, name, job.payload.get("event"), outcome)


def _clear_outbox(out: Path) -> None:
    """Remove what an earlier attempt left in ``out``, except notice files whose deliveries
    may still be reading them (rewritten with the same content if needed again)."""
    from ct_ai_node.writers.notice import SC_FILE, SR_FILE

    if not out.is_dir():
        return
    for path in out.iterdir():
        if path.name in (SC_FILE, SR_FILE):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _report_in(out: Path):
    """The main SR written into ``out`` (what a later revision replaces), None without one."""
    import pydicom

    from ct_ai_node.writers.common import ReportRef

    path = out / "sr.dcm"
    if not path.is_file():
        return None
    return ReportRef.of(pydicom.dcmread(path, stop_before_pixels=True))


def worker_process_main(config: NodeConfig, owner: str, log_level: int = logging.INFO, updates=None,
                        threads: int | None = None) -> None:
    """Entry point of a worker process (spawned by the node; ``config`` arrives pickled,
    secrets included, which a JSON dump would mask; so do edited ones on ``updates``).
    ``threads``: CPU threads for torch (the pool shares the cores among its workers)."""
    import signal

    _die_with_parent()
    if threads:
        import torch

        torch.set_num_threads(threads)
    configure_logging(log_level, f"%(asctime)s {owner} %(levelname)s %(name)s: %(message)s")
    # SIGTERM stops the loop; SIGINT is ignored (the node stops its workers itself)
    stop = StopSignals((signal.SIGTERM,), ignored=(signal.SIGINT,)).install()
    _preload()
    worker = Worker(config, owner)
    worker.warm_up()
    worker.exit_on_overrun = True
    from ct_ai_node.node.job_log import JobLog, JobLogHandler

    from ct_ai_node.jobqueue.factory import shared_target

    worker.job_log = JobLogHandler(JobLog(shared_target(config)), owner)
    logging.getLogger("ct_ai_node").addHandler(worker.job_log)
    worker.run_forever(stop, updates=updates)


def _preload() -> None:
    """Import torch, MONAI and the pipelines now (3-5 s), not inside the first job's time."""
    import ct_ai_node.analyze  # noqa: F401
    from ct_ai_node.pipeline.methods import available_pipelines

    available_pipelines()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the node process dies, as if the node were one process."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
