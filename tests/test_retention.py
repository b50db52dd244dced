"""Retention: the pure plan (what goes, when), the executor on a real spool, queue and
outbox, the SCP making room before it answers 0xA700, and the whole node on loopback
receiving 10 studies into a small spool quota while an undelivered study stays."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pydicom
import pytest
from helpers_dicom import write_ct_series
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from ct_ai_node.config import ConfigError, RetentionSection, parse_config
from ct_ai_node.jobqueue import Job, JobState, SqliteJobQueue
from ct_ai_node.logs import series_ref
from ct_ai_node.node.retention import Retention, plan_retention
from ct_ai_node.peers import dcmtk_tool
from ct_ai_node.spool import InstanceMeta, SeriesRecord, Spool, read_header
from ct_ai_node.spool import store as store_module

H = 3600.0
DAY = 86400.0
POLICY = RetentionSection(delivered_grace_h=1, max_age_days=2)


# -- the pure plan ------------------------------------------------------------------


def rec(key: str, state: str = "routed", received: float = 0.0, updated: float = 10.0, count: int = 3) -> SeriesRecord:
    return SeriesRecord(key=key, path=Path(key), study_instance_uid="1.2", series_instance_uid="1.2.3",
                        calling_ae="PACS", called_ae="CTAI", caller_host="127.0.0.1", modality="CT",
                        first_received_at=received, last_received_at=received, instance_count=count,
                        released_at=None, state=state, updated_at=updated)


def job(id_: int, key: str, state: str = "done", updated: float = 20.0, kind: str = "analyse") -> Job:
    return Job(id=id_, kind=kind, payload={"series_key": key}, key=None, state=JobState(state), attempts=1,
               max_attempts=5, next_run_at=0.0, lease_owner=None, lease_until=None, parent_id=None,
               last_error=None, created_at=0.0, updated_at=updated)


def keys(plan) -> list[str]:
    return [r.key for r in plan.removals]


def test_delivered_series_goes_after_the_grace_period_with_its_outboxes():
    series, jobs = [rec("a")], [job(7, "a", updated=100.0)]
    assert keys(plan_retention(series, jobs, 100.0 + H - 1, POLICY)) == []
    plan = plan_retention(series, jobs, 100.0 + H, POLICY, sizes={"a": (3, 3000)})
    [removal] = plan.removals
    assert (removal.key, removal.reason, removal.job_ids, removal.files, removal.bytes, removal.due) == \
        ("a", "delivered", (7,), 3, 3000, True)
    # grace 0: at once
    assert keys(plan_retention(series, jobs, 100.0, RetentionSection(delivered_grace_h=0))) == ["a"]


def test_every_job_of_a_series_must_be_delivered():
    """Several rules, or a re-analysis: the series goes only once all its jobs are done."""
    series = [rec("a")]
    for other in ("queued", "running", "sending", "failed", "dead"):
        plan = plan_retention(series, [job(1, "a"), job(2, "a", other, kind="forward")], 10 * DAY, POLICY)
        if other in ("failed", "dead"):  # undelivered, older than max_age_days: expired
            assert [(r.key, r.reason) for r in plan.removals] == [("a", "expired")]
        else:  # in progress: never, whatever the age
            assert keys(plan) == [] and plan.kept["a"] == f"job 2 is {other}"
    plan = plan_retention(series, [job(1, "a"), job(2, "a", kind="forward"), job(3, "b")], 10 * DAY, POLICY)
    assert plan.removals[0].job_ids == (1, 2)  # only this series' jobs
    # the grace period counts from the last delivery
    assert keys(plan_retention(series, [job(1, "a", updated=0), job(2, "a", updated=5 * H)], 5.5 * H, POLICY)) == []


def test_undelivered_work_stays_until_max_age_and_forever_without_one():
    series = [rec("failed", updated=1), rec("dead", updated=1)]
    jobs = [job(1, "failed", "failed", updated=1 * DAY), job(2, "dead", "dead", updated=1 * DAY)]
    plan = plan_retention(series, jobs, 2.9 * DAY, POLICY, bytes_needed=10**12)
    assert keys(plan) == [], "undelivered work is never deleted to make room"
    assert plan.kept["failed"].startswith("undelivered (job 1 failed)")
    plan = plan_retention(series, jobs, 3 * DAY, POLICY)
    assert sorted(keys(plan)) == ["dead", "failed"] and {r.reason for r in plan.removals} == {"expired"}
    forever = RetentionSection(delivered_grace_h=1, max_age_days=None)
    assert keys(plan_retention(series, jobs, 1000 * DAY, forever)) == []
    # an admin requeued it and it was delivered: an ordinary delivered series now
    requeued = [rec("failed", updated=1)]
    assert keys(plan_retention(requeued, [job(1, "failed", "done", updated=2.88 * DAY)], 2.9 * DAY, POLICY)) == []
    assert [r.reason for r in plan_retention(requeued, [job(1, "failed", "done", updated=1 * DAY)], 1.5 * DAY,
                                              POLICY).removals] == ["delivered"]


def test_work_in_progress_is_never_touched():
    old = 1000 * DAY
    series = [rec("receiving", "receiving"), rec("complete", "complete"),
              rec("resent", "routed", received=50.0, updated=40.0),  # instances after routing
              rec("resent-discarded", "discarded", received=50.0, updated=50.0)]
    jobs = [job(1, "resent")]
    plan = plan_retention(series, jobs, old, POLICY, bytes_needed=10**12)
    assert keys(plan) == []
    assert plan.kept == {"receiving": "still receiving", "complete": "still complete",
                         "resent": "instances arrived after routing",
                         "resent-discarded": "instances arrived after routing"}


def test_discarded_unroutable_and_jobless_series():
    series = [rec("discarded", "discarded"), rec("unroutable", "failed"), rec("jobless", "routed")]
    plan = plan_retention(series, [], 10 + H, POLICY)
    assert [(r.key, r.reason) for r in plan.removals] == [("discarded", "discarded")]
    assert plan.kept["unroutable"].startswith("undelivered (series failed)")
    assert plan.kept["jobless"].startswith("undelivered (routed, but no job found)")
    assert sorted(keys(plan_retention(series, [], 10 + 2 * DAY, POLICY))) == ["discarded", "jobless", "unroutable"]


def test_making_room_takes_the_oldest_delivered_first_and_only_what_is_needed():
    series = [rec("new", updated=300), rec("old", updated=100), rec("mid", updated=200),
              rec("undelivered", updated=1), rec("discarded", "discarded", updated=250)]
    jobs = [job(1, "new", updated=300), job(2, "old", updated=100), job(3, "mid", updated=200),
            job(4, "undelivered", "dead", updated=0)]
    sizes = {k: (3, 1000) for k in ("new", "old", "mid", "undelivered", "discarded")}
    now = 400.0  # everything is in its grace period
    assert keys(plan_retention(series, jobs, now, POLICY, sizes=sizes)) == []
    plan = plan_retention(series, jobs, now, POLICY, sizes=sizes, bytes_needed=1500)
    assert keys(plan) == ["old", "mid"] and plan.bytes == 2000
    assert all(not r.due for r in plan.removals)
    assert keys(plan_retention(series, jobs, now, POLICY, sizes=sizes, bytes_needed=10**9)) == \
        ["old", "mid", "discarded", "new"]
    # past the grace period: the timer pass takes all of them, making room only what it needs
    due = RetentionSection(delivered_grace_h=0.0)
    assert keys(plan_retention(series, jobs, now, due, sizes=sizes)) == ["old", "mid", "discarded", "new"]
    assert keys(plan_retention(series, jobs, now, due, sizes=sizes, bytes_needed=1)) == ["old"]


def test_config_section_is_typed_and_errors_name_the_field():
    cfg = parse_config({"retention": {"delivered_grace_h": 0.5, "max_age_days": None, "interval_s": 60},
                        "storage": {"max_spool_mb": 500}}, "test")
    assert cfg.retention.max_age_days is None and cfg.retention.enabled and cfg.retention.free_space_first
    assert cfg.storage.max_spool_mb == 500
    defaults = parse_config({}, "test")
    assert (defaults.retention.delivered_grace_h, defaults.retention.max_age_days, defaults.retention.interval_s,
            defaults.storage.max_spool_mb) == (24, 30, 300, None)
    bad = {"retention": {"delivered_grace_h": -1, "interval_s": 0, "enabled": "maybe", "keep": 1},
           "storage": {"max_spool_mb": 0}}
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "test")
    fields = sorted(p.split(":")[0] for p in err.value.problems)
    assert fields == ["retention.delivered_grace_h", "retention.enabled", "retention.interval_s", "retention.keep",
                      "storage.max_spool_mb"], err.value.problems
    with pytest.raises(ConfigError) as err:
        parse_config({"retention": {"delivered_grace_h": 48, "max_age_days": 1}}, "test")
    assert err.value.problems == ["retention.max_age_days: must be at least delivered_grace_h (48 h)"]


# -- the executor on a real spool, queue and outbox ---------------------------------


def meta_of(raw: bytes, calling_ae: str = "PACS") -> InstanceMeta:
    h = read_header(raw)
    return InstanceMeta(h["SOPInstanceUID"], h["SOPClassUID"], h["StudyInstanceUID"], h["SeriesInstanceUID"],
                        h["Modality"], calling_ae, "CTAI", "127.0.0.1", h["TransferSyntaxUID"])


class Site:
    """A spool, a queue on the same database and an outbox, as the node has them."""

    def __init__(self, tmp: Path, policy: RetentionSection, now: float):
        self.now = now
        self.root = tmp / "var"
        self.spool = Spool(self.root / "spool", self.root / "node.db", fsync=False)
        self.queue = SqliteJobQueue(self.root / "node.db", clock=lambda: self.now)
        self.outbox = self.root / "outbox"
        self.retention = Retention(policy, self.spool, self.queue, self.outbox, clock=lambda: self.now)
        self.src = tmp / "src"

    def receive(self, name: str, n: int = 3) -> str:
        written = write_ct_series(self.src / name, n=n, rows=16, cols=16)
        for path in written.paths:
            raw = path.read_bytes()
            key = self.spool.store(raw, meta_of(raw)).series_key
        return key

    def analysed(self, key: str, state: str) -> int:
        """Route the series to one analyse job with results in its outbox, ending in ``state``."""
        job_id = self.queue.enqueue("analyse", {"series_key": key})
        folder = self.outbox / f"job-{job_id}"
        folder.mkdir(parents=True)
        (folder / "seg.dcm").write_bytes(b"\0" * 5000)
        self.spool.set_series_state(key, "routed")
        self.queue.claim(["analyse"], "w", 60)
        if state == "done":
            self.queue.complete(job_id)
        elif state == "dead":
            self.queue.fail(job_id, "delivery refused", retryable=False)
        elif state == "sending":
            self.queue.set_state(job_id, JobState.SENDING)
        return job_id

    def close(self) -> None:
        self.queue.close()
        self.spool.close()


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path, RetentionSection(delivered_grace_h=1, max_age_days=2), now=time.time())
    yield s
    s.close()


def test_run_once_removes_delivered_and_keeps_undelivered(site, caplog):
    delivered = site.receive("delivered")
    undelivered = site.receive("undelivered")
    sending = site.receive("sending")
    done_job = site.analysed(delivered, "done")
    dead_job = site.analysed(undelivered, "dead")
    sending_job = site.analysed(sending, "sending")
    before = site.spool.used_bytes()
    size = site.spool.series_sizes()[delivered][1]
    assert site.retention.run_once().removed == []  # all within the grace period

    site.now += 1.01 * H
    with caplog.at_level(logging.DEBUG, logger="ct_ai_node.node.retention"):
        report = site.retention.run_once()
    assert report.removed == [delivered] and report.spool_bytes == size and report.outbox_bytes == 5000
    assert not site.spool.series_dir(delivered).exists() and site.spool.get_series(delivered) is None
    assert not (site.outbox / f"job-{done_job}").exists()
    assert site.spool.used_bytes() == before - size == site.spool._indexed_bytes()
    for key, job_id in ((undelivered, dead_job), (sending, sending_job)):
        assert len(list(site.spool.series_dir(key).glob("*.dcm"))) == 3
        assert (site.outbox / f"job-{job_id}" / "seg.dcm").is_file()
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name.endswith("retention")]
    assert f"series {series_ref(delivered)} removed (delivered; 3 files, " in info[0]
    assert delivered not in " ".join(info)  # the key holds the tail of the Series Instance UID
    assert all("Test^Patient" not in m and "TEST123456" not in m for m in caplog.messages)

    site.now += 2 * DAY  # past max_age_days: the dead work goes (a warning), the sending one never
    with caplog.at_level(logging.WARNING, logger="ct_ai_node.node.retention"):
        assert site.retention.run_once().removed == [undelivered]
    assert any("undelivered past max_age_days" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    assert site.spool.series_dir(sending).is_dir() and site.spool.get_series(sending) is not None


def test_make_room_frees_delivered_in_grace_never_undelivered(site):
    old, undelivered, young = site.receive("old"), site.receive("undelivered"), site.receive("young")
    site.analysed(undelivered, "dead")
    site.now += 10
    site.analysed(old, "done")
    site.now += 10
    site.analysed(young, "done")
    per_series = site.spool.series_sizes()[old][1]
    quota = site.spool.used_bytes() - per_series // 2  # half a series too much
    report = site.retention.make_room(lambda: site.spool.used_bytes() - quota)
    assert report.removed == [old] and site.spool.used_bytes() <= quota
    # more than the delivered data can give: all of it goes, the undelivered series stays
    report = site.retention.make_room(lambda: site.spool.used_bytes() + 1)
    assert report.removed == [young]
    assert [r.key for r in site.spool.series()] == [undelivered]
    assert site.retention.make_room(lambda: 1).removed == []


def test_removal_never_drops_an_acknowledged_instance(site, monkeypatch):
    key = site.receive("s", n=2)
    site.analysed(key, "done")
    snapshot = site.spool.get_series(key).last_received_at
    raw = sorted((site.src / "s").glob("*.dcm"))[0].read_bytes()
    site.spool.store(raw, meta_of(raw))
    assert not site.spool.remove_series(key, unless_received_after=snapshot)
    assert len(list(site.spool.series_dir(key).glob("*.dcm"))) == 2

    # a store in progress: the removal leaves the series alone
    entered, release = threading.Event(), threading.Event()
    real_write = store_module._write_atomic

    def slow_write(path, data, fsync=True):
        if path.suffix == ".dcm":
            entered.set()
            release.wait(10)
        real_write(path, data, fsync)

    monkeypatch.setattr(store_module, "_write_atomic", slow_write)
    storing = threading.Thread(target=site.spool.store, args=(raw, meta_of(raw)))
    storing.start()
    assert entered.wait(10)
    assert not site.spool.remove_series(key)
    release.set()
    storing.join(10)
    assert site.spool.instance_uids(key) and all(p.is_file() for p in site.spool.instance_paths(key))


# -- the SCP makes room before it refuses -----------------------------------------


def _send(port: int, paths: list[Path], aet: str = "PACS") -> list[int]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="CTAI")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def test_scp_makes_room_before_answering_a700(site):
    from ct_ai_node.ingress import ScpSettings, StorageSCP

    first = site.receive("first", n=4)
    site.analysed(first, "done")  # delivered a moment ago: in its grace period
    size = site.spool.used_bytes()
    settings = ScpSettings(ae_title="CTAI", host="127.0.0.1", port=0, min_free_mb=0, max_spool_mb=1.5 * size / 2**20,
                           acse_timeout_s=5, dimse_timeout_s=10, network_timeout_s=10)
    second = write_ct_series(site.src / "second", n=4, rows=16, cols=16).paths
    third = write_ct_series(site.src / "third", n=4, rows=16, cols=16).paths
    scp = StorageSCP(settings, site.spool, make_room=site.retention.make_room).start()
    try:
        assert _send(scp.port, second) == [0] * 4  # the delivered series made room
        assert site.spool.get_series(first) is None
        # only undelivered data left: the SCP refuses, nothing is deleted
        [second_key] = [r.key for r in site.spool.series()]
        site.analysed(second_key, "sending")
        statuses = _send(scp.port, third)
        assert statuses[-1] == 0xA700 and site.spool.get_series(second_key).instance_count == 4
        assert site.spool.used_bytes() <= settings.max_spool_mb * 2**20
    finally:
        scp.stop()
    # without make_room the quota alone refuses
    site.spool.remove_series(second_key)
    bare = StorageSCP(ScpSettings(**{**settings.__dict__, "max_spool_mb": 0.001}), site.spool).start()
    try:
        assert _send(bare.port, third[:1]) == [0xA700]
    finally:
        bare.stop()


# -- acceptance: the node on loopback -----------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(dcmtk_tool("storescp") is None, reason="DCMTK storescp not installed: run `make test`")
def test_node_receives_ten_studies_into_a_small_spool_and_keeps_undelivered_work(tmp_path):
    """10 studies in a row over C-STORE into a spool quota that holds about 4: each is analysed
    and delivered, none is refused (the oldest delivered series make room), and an earlier
    study whose destination is down keeps its spool files and its outbox."""
    from ct_ai_node.peers import StoreSCP, free_port
    from ct_ai_node.synthetic.dicom_series import write_dicom_series
    from ct_ai_node.synthetic.phantom import generate_phantom
    from node_harness import NodeProcess, node_config

    studies = []
    for i in range(11):  # tiny phantoms: 24 slices of 96x96 (~0.45 MB), a few seconds of analysis each
        folder = tmp_path / "studies" / f"s{i:02d}"
        write_dicom_series(generate_phantom(i, kind="covid", shape=(24, 96, 96), spacing=(5.0, 3.5, 3.5)), folder,
                           patient_id=f"PHANTOM-{i:04d}", patient_name="Phantom^Covid")
        studies.append(sorted(folder.glob("*.dcm")))
    study_mb = sum(p.stat().st_size for p in studies[0]) / 2**20
    with StoreSCP(tmp_path / "pacs").start() as pacs:
        port = free_port()
        config = node_config(
            port,
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                           "ae_title": "STORESCP"},
                          {"name": "down", "kind": "dicom", "host": "127.0.0.1", "port": free_port(),
                           "ae_title": "NOBODY"}],
            rules=[{"name": "ward", "when": [{"calling_ae": {"in": ["WARD"]}}], "action": "analyse",
                    "pipeline": "radlogics", "lungs": "classical", "destinations": ["down"]},
                   {"name": "chest", "when": [{"tag": "Modality", "equals": "CT"}], "action": "analyse",
                    "pipeline": "radlogics", "lungs": "classical", "destinations": ["pacs"]}],
            storage={"root": "./var", "min_free_mb": 0, "max_spool_mb": round(4.3 * study_mb, 2), "fsync": False},
            completeness={"quiet_time_s": 1, "check_interval_s": 0.3},
            retry={"max_attempts": 100, "backoff_initial_s": 1, "backoff_max_s": 3},
            # grace of a day: what goes here goes only to make room; the timer pass runs often and must keep it
            retention={"delivered_grace_h": 24, "interval_s": 1},
        )
        with NodeProcess(tmp_path / "node", config) as node:
            t0 = time.monotonic()
            assert _send(port, studies[0], aet="WARD") == [0] * len(studies[0])  # its destination is down
            statuses = []

            def wait_delivered(n: int) -> None:
                deadline = time.monotonic() + 180
                while sum(j.state == JobState.DONE for j in node.jobs("analyse") if j.payload["rule"] == "chest") < n:
                    assert time.monotonic() < deadline, node.log()[-3000:]
                    time.sleep(0.2)

            for i, files in enumerate(studies[1:], start=1):
                # one study analysed while the next arrives: the spool holds the undelivered
                # study, the one in analysis, the one arriving, and delivered ones to make room from
                wait_delivered(i - 2)
                statuses += _send(port, files)
            wait_delivered(10)
            elapsed = time.monotonic() - t0
            assert statuses == [0] * sum(len(s) for s in studies[1:]), "a C-STORE was refused"
            jobs = node.jobs("analyse")
            ward = [j for j in jobs if j.payload["rule"] == "ward"]
            chest = [j for j in jobs if j.payload["rule"] == "chest"]
            assert len(ward) == 1 and ward[0].state not in (JobState.DONE,), ward
            assert len(chest) == 10 and all(j.state == JobState.DONE for j in chest)
            log = node.log()
            assert "0xA700" not in log

        with Spool(node.root / "spool", node.root / "node.db") as spool:
            remaining = {r.key: r for r in spool.series()}
            used = spool.used_bytes()
        # the undelivered study: spool files and outbox intact
        ward_key = ward[0].payload["series_key"]
        assert ward_key in remaining and remaining[ward_key].instance_count == len(studies[0])
        assert len(list((node.root / "spool" / ward_key).glob("*.dcm"))) == len(studies[0])
        assert (node.root / "outbox" / f"job-{ward[0].id}" / "result.json").is_file()
        # delivered studies made room: the oldest went, spool and outbox, the newest stayed
        removed = [j for j in chest if j.payload["series_key"] not in remaining]
        assert len(removed) >= 5, f"only {len(removed)} delivered series removed"
        assert all(not (node.root / "outbox" / f"job-{j.id}").exists() for j in removed)
        assert chest[-1] in removed and chest[0] not in removed  # jobs come newest first
        assert used <= 4.3 * study_mb * 2**20
        assert log.count("early to make room") == len(removed)
        # every result reached the PACS
        sent = [f for d in node.jobs("deliver") if d.payload["destination"] == "pacs" for f in d.payload["files"]]
        assert len(sent) > 10 * 20 and len(pacs.received()) == len(sent)
    print(f"10 studies received, analysed and delivered in {elapsed:.1f} s; {len(removed)} removed to make room")


# -- a worker host's outbox ----------------------------------------------------------


def test_worker_host_outbox_follows_its_jobs(tmp_path):
    """A worker host keeps results while a job is at work, drops a delivered job's folder
    after the grace period, an undelivered one (or one the queue forgot) after max_age_days."""
    from ct_ai_node.node.retention import plan_outbox_pruning, prune_worker_outbox

    day = 86400.0
    now = 10 * day
    folders = {1: now, 2: now, 3: now, 4: now, 5: now - 3 * day, 6: now}
    jobs = {1: job(1, "a", "done", updated=now - H), 2: job(2, "b", "done", updated=now - H + 1),
            3: job(3, "c", "sending", updated=now - 9 * day), 4: job(4, "d", "dead", updated=now - 2 * day),
            5: None, 6: None}
    assert plan_outbox_pruning(folders, jobs, now, POLICY) == [1, 4, 5]
    assert plan_outbox_pruning(folders, jobs, now, RetentionSection(delivered_grace_h=1, max_age_days=None)) == [1]

    outbox = tmp_path / "outbox"
    queue = SqliteJobQueue(tmp_path / "node.db")
    done = queue.enqueue("analyse", {"series_key": "a"})
    queue.claim(["analyse"], "w", 60)
    queue.complete(done, owner="w")
    running = queue.enqueue("analyse", {"series_key": "b"})
    queue.claim(["analyse"], "w", 60)
    for name in (f"job-{done}", f"fetched-{done}", f"job-{running}", f"fetched-{running}", "notes"):
        (outbox / name).mkdir(parents=True)
    grace0 = RetentionSection(delivered_grace_h=0)
    assert prune_worker_outbox(outbox, queue, grace0) == [done]
    assert sorted(p.name for p in outbox.iterdir()) == sorted([f"job-{running}", f"fetched-{running}", "notes"])
    assert prune_worker_outbox(outbox, queue, RetentionSection(enabled=False, delivered_grace_h=0)) == []
