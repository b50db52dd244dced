"""One bad instance or series never blocks the node, every C-STORE gets a status, and the
node process always ends after SIGTERM (issue 11).

Real parts throughout: the spool and queue on SQLite, the dispatcher's routing child
process, the Storage SCP on loopback with pynetdicom and DCMTK storescu, and, at the end,
``ct-ai-node serve`` as a process with a DCMTK storescp as the destination.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from helpers_dicom import write_ct_series, write_enhanced_ct
from pydicom.dataelem import RawDataElement
from pydicom.uid import generate_uid

from ct_ai_node.config import NodeConfig
from ct_ai_node.ingress import ScpSettings, StorageSCP
from ct_ai_node.jobqueue import JobState, SqliteJobQueue
from ct_ai_node.logs import series_ref
from ct_ai_node.web.views import dashboard
from ct_ai_node.node.dispatcher import Dispatcher, RouteFailed, implausible_size, route_series
from ct_ai_node.peers import dcmtk_tool, StoreSCP, free_port
from ct_ai_node.spool import InstanceMeta, Spool
from ct_ai_node.spool.dicomfile import read_header
from ct_ai_node.spool.store import instance_file_name
from node_harness import CHEST_RULE, SAMPLE_COVID, NodeProcess, dcmtk, node_config

LONG_UID = "1.2.826.0.1.3680043.8.498." + "1234567890" * 4 + "1234"  # 70 characters
assert len(LONG_UID) == 70

needs_dcmtk = pytest.mark.skipif(dcmtk_tool("storescu") is None or dcmtk_tool("storescp") is None,
                                 reason="DCMTK not installed (make test installs it)")


# -- bad instances on disk -------------------------------------------------------------------

def absurd_frames(folder: Path) -> Path:
    """An Enhanced CT whose header claims 2**31 frames over 4 frames of pixel data (issue 11)."""
    written = write_enhanced_ct(folder, n=4, rows=16, cols=16, name="absurd")
    ds = pydicom.dcmread(written.paths[0])
    ds.NumberOfFrames = 2**31
    ds.save_as(written.paths[0], enforce_file_format=True)
    return written.paths[0]


def absurd_rows(folder: Path) -> Path:
    """A CT image whose header claims 65535 rows over 16x16 pixels."""
    written = write_ct_series(folder, n=1, rows=16, cols=16, description="Rows 65535", series_number=9)
    ds = pydicom.dcmread(written.paths[0])
    ds.Rows = 65535
    ds.save_as(written.paths[0], enforce_file_format=True)
    return written.paths[0]


def store_file(spool: Spool, path: Path, calling_ae: str = "PACS") -> str:
    hdr = read_header(path)
    meta = InstanceMeta(hdr["SOPInstanceUID"], hdr["SOPClassUID"], hdr["StudyInstanceUID"], hdr["SeriesInstanceUID"],
                        hdr["Modality"], calling_ae, "CTAI", "127.0.0.1", hdr["TransferSyntaxUID"])
    return spool.store(path.read_bytes(), meta).series_key


# -- routers injected into the dispatcher (module level: they run in its child process) -------

def _description(paths) -> str | None:
    try:
        return pydicom.dcmread(paths[0], stop_before_pixels=True).get("SeriesDescription")
    except Exception:  # noqa: BLE001 - route_series says what is wrong with it
        return None


def hang_on_hang_series(config, rec, paths):
    """Routes like the node, except that a series described "HANG" never finishes (a busy loop,
    like the per-frame loop over 2**31 frames)."""
    if _description(paths) == "HANG":
        while True:
            pass
    return route_series(config, rec, paths)


def raise_on_boom_series(config, rec, paths):
    if _description(paths) == "EAT":
        # 3 GB, zero-filled lazily: without the routing process's memory cap this would succeed
        return len(bytearray(3 * 2**30))
    if _description(paths) == "BOOM":
        raise ValueError("Test^Patient is not a value we print")  # a message that may hold patient data
    return route_series(config, rec, paths)


def grow_while_routing(config, rec, paths):
    """A sender adds an instance to the series while the dispatcher routes it."""
    if rec.instance_count == 1:
        ds = pydicom.dcmread(paths[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        extra = paths[0].parent.parent / "extra.dcm"
        ds.save_as(extra, enforce_file_format=True)
        with Spool(config.storage.spool_dir, config.storage.db_path, fsync=False) as spool:
            store_file(spool, extra)
    return route_series(config, rec, paths)


def _config(tmp_path: Path, route_timeout_s: float = 1.0) -> NodeConfig:
    return NodeConfig.model_validate({
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 10, "fsync": False},
        "completeness": {"quiet_time_s": 1, "check_interval_s": 1, "route_timeout_s": route_timeout_s},
        "destinations": [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": 4242, "ae_title": "PACS"}],
        "rules": [{"name": "ct-forward", "when": [{"tag": "Modality", "equals": "CT"}], "action": "forward",
                   "destinations": ["pacs"]}],
    })


@pytest.fixture
def parts(tmp_path):
    config = _config(tmp_path)
    spool = Spool(config.storage.spool_dir, config.storage.db_path, fsync=False)
    queue = SqliteJobQueue(config.storage.db_path)
    yield config, spool, queue
    queue.close()
    spool.close()


def _later() -> float:
    return time.time() + 100  # every series is past its quiet time


def test_a_series_whose_routing_never_ends_fails_and_the_others_are_routed(parts, tmp_path):
    config, spool, queue = parts
    keys = {}
    for name in ("first", "HANG", "last"):
        written = write_ct_series(tmp_path / name, n=2, rows=16, cols=16, description=name)
        for path in written.paths:
            keys[name] = store_file(spool, path)
    dispatcher = Dispatcher(config, spool, queue, clock=_later, router=hang_on_hang_series)
    try:
        started = time.monotonic()
        report = dispatcher.tick()
        took = time.monotonic() - started
        assert report.failed == [keys["HANG"]]
        assert sorted(report.routed) == sorted([keys["first"], keys["last"]])
        assert len(report.jobs) == 2 and {j.kind for j in queue.list()} == {"forward"}
        assert took < 30, took  # 1 s for the bad series, plus starting the routing process twice
        bad = spool.get_series(keys["HANG"])
        assert bad.state == "failed" and "longer than 1 s" in bad.reason, bad

        # not tried again every tick: the next tick has nothing to do, quickly
        started = time.monotonic()
        again = dispatcher.tick()
        assert (again.failed, again.routed, again.jobs) == ([], [], [])
        assert time.monotonic() - started < 5

        # new instances are a new generation: tried once more (and still bounded)
        extra = write_ct_series(tmp_path / "more", n=1, rows=16, cols=16, description="HANG",
                                series_uid=bad.series_instance_uid, study_uid=bad.study_instance_uid)
        assert store_file(spool, extra.paths[0]) == keys["HANG"]
        assert dispatcher.tick().failed == [keys["HANG"]]
        # and the routing process that replaced the killed one still routes good series
        good = write_ct_series(tmp_path / "good", n=1, rows=16, cols=16, description="good")
        good_key = store_file(spool, good.paths[0])
        assert dispatcher.tick().routed == [good_key]
    finally:
        dispatcher.close()


def test_raising_implausible_and_unreadable_series_fail_with_a_reason(parts, tmp_path, caplog):
    config, spool, queue = parts
    keys = {}
    boom = write_ct_series(tmp_path / "boom", n=1, rows=16, cols=16, description="BOOM")
    keys["boom"] = store_file(spool, boom.paths[0])
    keys["eat"] = store_file(spool, write_ct_series(tmp_path / "eat", n=1, rows=16, cols=16,
                                                    description="EAT").paths[0])
    keys["frames"] = store_file(spool, absurd_frames(tmp_path / "frames"))
    keys["rows"] = store_file(spool, absurd_rows(tmp_path / "rows"))
    unreadable = write_ct_series(tmp_path / "unreadable", n=1, rows=16, cols=16, description="unreadable")
    keys["unreadable"] = store_file(spool, unreadable.paths[0])
    spool.instance_paths(keys["unreadable"])[0].write_bytes(b"not DICOM at all")
    keys["good"] = store_file(spool, write_ct_series(tmp_path / "good", n=1, rows=16, cols=16).paths[0])

    dispatcher = Dispatcher(config, spool, queue, clock=_later, router=raise_on_boom_series)
    try:
        with caplog.at_level(logging.INFO, logger="ct_ai_node"):
            report = dispatcher.tick()
    finally:
        dispatcher.close()
    # logs above DEBUG name series by a hash, and leave reasons (free text) on the series
    uid_tails = [spool.get_series(k).series_instance_uid[-12:] for k in keys.values()]
    assert caplog.records and all(r.levelno >= logging.INFO for r in caplog.records)
    for text in ("BOOM", "EAT", "Test^Patient", *uid_tails):
        assert text not in caplog.text, text
    assert report.routed == [keys["good"]]
    assert sorted(report.failed) == sorted(k for name, k in keys.items() if name != "good")
    reasons = {name: spool.get_series(key).reason for name, key in keys.items()}
    assert reasons["good"] is None
    assert "raised ValueError" in reasons["boom"] and "Test^Patient" not in reasons["boom"]
    assert "needs more than 1024 MB" in reasons["eat"]
    assert "2147483648 frame(s) of 16x16x16 bits" in reasons["frames"]
    assert "65535x16" in reasons["rows"]
    assert "readable DICOM header" in reasons["unreadable"]
    assert all("\n" not in r for r in reasons.values() if r)

    # the administrator sees them on the web app's dashboard (by hashed reference) with the reason
    data = dashboard(config, queue, spool, lambda: {})
    assert data["series_by_state"] == {"failed": 5, "routed": 1}
    assert {s["series"]: s["reason"] for s in data["failed_series"]} == {
        series_ref(k): reasons[n] for n, k in keys.items() if n != "good"}


def test_a_series_released_whole_completes_after_the_short_release_wait(parts, tmp_path):
    """Issue 15: the association that carried every instance of a series is taken as its end
    after 0.5 s; one that carried part of it waits the usual 2 s for the rest."""
    config, spool, queue = parts
    config = config.model_copy(update={"completeness": config.completeness.model_copy(update={"quiet_time_s": 20})})
    keys = {}
    for name in ("whole", "part"):
        for path in write_ct_series(tmp_path / name, n=12, rows=16, cols=16, description=name).paths:
            keys[name] = store_file(spool, path)
    spool.mark_released("PACS", "127.0.0.1", keys.values(), carried={keys["whole"]: 12, keys["part"]: 6})
    released = spool.get_series(keys["part"]).released_at
    now = [released + 0.6]
    dispatcher = Dispatcher(config, spool, queue, clock=lambda: now[0])
    try:
        report = dispatcher.tick()
        assert report.routed == [keys["whole"]]
        assert report.next_ready_at == pytest.approx(released + 2.0, abs=1e-6)  # when the node ticks next
        now[0] = released + 1.99
        assert dispatcher.tick().routed == []
        now[0] = released + 2.0
        assert dispatcher.tick().routed == [keys["part"]]
    finally:
        dispatcher.close()


def test_an_instance_that_arrives_while_its_series_is_routed_is_not_lost(parts, tmp_path):
    config, spool, queue = parts
    key = store_file(spool, write_ct_series(tmp_path / "s", n=1, rows=16, cols=16).paths[0])
    dispatcher = Dispatcher(config, spool, queue, clock=_later, router=grow_while_routing)
    try:
        first = dispatcher.tick()
        assert first.routed == [key] and spool.get_series(key).state == "receiving"
        second = dispatcher.tick()  # the series with both instances: a new generation, a new job
        assert second.routed == [key] and spool.get_series(key).state == "routed"
        assert sorted(j.payload["instance_count"] for j in queue.list()) == [1, 2]
        assert dispatcher.tick().routed == []
    finally:
        dispatcher.close()


def test_stop_while_a_series_hangs_returns_the_tick_without_failing_it(parts, tmp_path):
    config, spool, queue = parts
    config = config.model_copy(update={"completeness": config.completeness.model_copy(
        update={"route_timeout_s": 600})})
    key = store_file(spool, write_ct_series(tmp_path / "hang", n=1, rows=16, cols=16, description="HANG").paths[0])
    dispatcher = Dispatcher(config, spool, queue, clock=_later, router=hang_on_hang_series)
    ticking = threading.Thread(target=dispatcher.tick, daemon=True)
    ticking.start()
    time.sleep(3)  # the child is started and spinning on the series
    assert ticking.is_alive()
    dispatcher.close()
    ticking.join(10)
    assert not ticking.is_alive()
    assert spool.get_series(key).state == "receiving"  # stopping says nothing about the series


def test_implausible_size_is_pure_and_spares_sane_headers(tmp_path):
    sane = pydicom.dcmread(write_enhanced_ct(tmp_path / "sane", n=4, rows=16, cols=16).paths[0])
    size = 4 * 16 * 16 * 2 + 2000
    assert implausible_size(sane, size) is None
    sane.NumberOfFrames = 2**31
    assert "2147483648 frame(s)" in implausible_size(sane, size)
    # as read from a file whose IS value is not a number (pydicom raises when it is accessed)
    sane._dict[0x00280008] = RawDataElement(pydicom.tag.Tag(0x00280008), "IS", 4, b"many", 0, False, True)
    assert "not a number" in implausible_size(sane, size)
    compressed = pydicom.Dataset()
    compressed.file_meta = pydicom.dataset.FileMetaDataset()
    compressed.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    compressed.Rows = compressed.Columns = 512
    compressed.NumberOfFrames = 300
    assert implausible_size(compressed, 100_000) is None  # 300 well-compressed frames fit
    compressed.NumberOfFrames = 2**31
    assert "compressed" in implausible_size(compressed, 100_000)
    assert implausible_size(pydicom.Dataset(), 10) is None  # no pixel description (SR, KO)
    with pytest.raises(RouteFailed, match="readable"):
        route_series(_config(tmp_path), None, [])


def test_spool_keeps_the_reason_and_migrates_an_old_database(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as con:  # the series table as it was before the failed state
        con.execute("CREATE TABLE series (key TEXT PRIMARY KEY, study_instance_uid TEXT NOT NULL,"
                    " series_instance_uid TEXT NOT NULL, calling_ae TEXT NOT NULL, called_ae TEXT NOT NULL,"
                    " caller_host TEXT NOT NULL, modality TEXT NOT NULL, first_received_at REAL NOT NULL,"
                    " last_received_at REAL NOT NULL, instance_count INTEGER NOT NULL DEFAULT 0, released_at REAL,"
                    " state TEXT NOT NULL DEFAULT 'receiving', updated_at REAL NOT NULL)")
    with Spool(tmp_path / "spool", db) as spool:
        key = store_file(spool, write_ct_series(tmp_path / "s", n=1, rows=16, cols=16).paths[0])
        spool.set_series_state(key, "failed", "header claims too much")
        assert (spool.get_series(key).state, spool.get_series(key).reason) == ("failed", "header claims too much")
        spool.set_series_state(key, "routed")
        assert spool.get_series(key).reason is None


def test_file_names_of_long_and_odd_uids_are_safe_and_distinct():
    names = {uid: instance_file_name(uid) for uid in
             (LONG_UID, LONG_UID[:-1] + "5", "1.2.3", "../../etc/passwd", "1.2.3/4", "1.2.3\x00", " 1.2")}
    assert names["1.2.3"] == "1.2.3.dcm"
    assert len(set(names.values())) == len(names)
    for name in names.values():
        assert "/" not in name and "\x00" not in name and not name.startswith(".") and len(name) < 100


# -- every C-STORE gets a status -------------------------------------------------------------

@pytest.fixture
def scp(tmp_path):
    spool = Spool(tmp_path / "var" / "spool", tmp_path / "var" / "node.db", fsync=False)
    settings = ScpSettings(ae_title="CTAI", host="127.0.0.1", port=0, acse_timeout_s=5, dimse_timeout_s=10,
                           network_timeout_s=10, min_free_mb=10)
    server = StorageSCP(settings, spool).start()
    yield server
    server.stop()
    spool.close()


def _with_sop_uid(src: Path, dst: Path, uid: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# a pynetdicom sender in its own process: the SCP in this one must not profit from its settings
_SCU = textwrap.dedent("""
    import json, sys
    import pydicom
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    # pynetdicom refuses to *send* a UID over 64 characters; a sender in the wild does not
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1"])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="CTAI")
    statuses = []
    for path in sys.argv[2:]:
        try:
            answer = assoc.send_c_store(pydicom.dcmread(path))
        except RuntimeError:  # the association is gone: no status for this one
            answer = None
        statuses.append(int(answer.Status) if answer is not None and "Status" in answer else None)
    established = assoc.is_established
    if established:
        assoc.release()
    print(json.dumps({"statuses": statuses, "established": established}))
""")


def test_70_character_uid_gets_a_status_from_pynetdicom_and_dcmtk(scp, tmp_path):
    import json

    written = write_ct_series(tmp_path / "src", n=3, rows=16, cols=16)
    long_file = _with_sop_uid(written.paths[0], tmp_path / "long" / "a.dcm", LONG_UID)
    odd_file = _with_sop_uid(written.paths[1], tmp_path / "odd" / "b.dcm", "1.2.3.abc")

    sent = subprocess.run([sys.executable, "-c", _SCU, str(scp.port), str(long_file), str(odd_file),
                           str(written.paths[2])], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr[-2000:]
    result = json.loads(sent.stdout.strip().splitlines()[-1])
    # 70 characters: stored (flagged in the log; the loader mints valid UIDs); "1.2.3.abc" is no
    # UID at all: refused with a status; and the association survived both
    assert result == {"statuses": [0x0000, 0xC000, 0x0000], "established": True}, sent.stderr[-2000:]

    spool = scp.spool
    key = spool.series()[0].key
    stored = {p.name: p for p in spool.instance_paths(key)}
    assert instance_file_name(LONG_UID) in stored
    assert str(pydicom.dcmread(stored[instance_file_name(LONG_UID)]).SOPInstanceUID) == LONG_UID

    if dcmtk_tool("storescu"):
        # DCMTK cuts the request's UID to 64 characters; the data set keeps all 70
        other = _with_sop_uid(written.paths[0], tmp_path / "dcmtk" / "c.dcm", LONG_UID[:-1] + "7")
        sent = dcmtk("storescu", "-v", "-aet", "PACS", "-aec", "CTAI", "127.0.0.1", str(scp.port), str(other),
                     timeout=60)
        assert sent.returncode == 0, sent.stderr[-2000:]
        assert "Received Store Response (Success)" in sent.stdout + sent.stderr
        assert instance_file_name(LONG_UID[:-1] + "7") in {p.name for p in spool.instance_paths(key)}


# -- a stuck thread cannot keep the stopped node alive ----------------------------------------

def test_a_stuck_thread_does_not_keep_the_process_alive(tmp_path):
    script = textwrap.dedent("""
        import logging, threading, time
        from ct_ai_node.node.service import _exit_if_threads_stuck
        logging.basicConfig(level=logging.INFO)
        threading.Thread(target=lambda: time.sleep(3600), name="stuck-tick").start()
        _exit_if_threads_stuck(0.5)
        print("not reached")
    """)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 1 and "not reached" not in done.stdout
    assert "stuck-tick" in done.stderr and "ending the process" in done.stderr


# -- the node as a process ---------------------------------------------------------------------

@pytest.mark.slow
@needs_dcmtk
def test_bad_series_fail_fast_others_are_delivered_and_sigterm_ends_the_node(tmp_path):
    """Sent first, an Enhanced CT claiming 2**31 frames, a CT claiming 65535 rows, and an instance
    with a 70-character UID; then a chest CT (analysed) and an MR series (forwarded). The bad ones
    end failed within seconds, the others are delivered, and SIGTERM ends the process in 10 s."""
    bad = tmp_path / "bad"
    absurd_frames(bad / "frames")
    absurd_rows(bad / "rows")
    long_src = write_ct_series(tmp_path / "long-src", n=1, rows=16, cols=16, description="long uid", series_number=4)
    _with_sop_uid(long_src.paths[0], bad / "long" / "long.dcm", LONG_UID)
    mr = tmp_path / "mr"
    write_ct_series(mr, n=3, rows=16, cols=16, modality="MR", description="MR head", study_uid=generate_uid())

    with StoreSCP(tmp_path / "pacs").start() as pacs:
        port = free_port()
        config = node_config(
            port,
            destinations=[{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.port,
                           "ae_title": "STORESCP"}],
            rules=[{**CHEST_RULE, "destinations": ["pacs"]},
                   {"name": "mr", "when": [{"tag": "Modality", "equals": "MR"}], "action": "forward",
                    "destinations": ["pacs"]}],
            completeness={"quiet_time_s": 1, "check_interval_s": 0.5, "route_timeout_s": 5},
            web={"host": "127.0.0.1", "port": (status_port := free_port())},
        )
        node = NodeProcess(tmp_path / "node", config).start()
        try:
            for folder in (bad / "frames", bad / "rows", bad / "long", SAMPLE_COVID, mr):
                sent = dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(folder))
                assert sent.returncode == 0, sent.stderr[-1000:]
            sent_at = time.monotonic()

            deadline = time.monotonic() + 60
            status = {}
            while time.monotonic() < deadline:
                status = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=10).json()
                if len(status["failed_series"]) >= 2:
                    break
                time.sleep(0.3)
            assert len(status["failed_series"]) == 2, (status, node.log()[-3000:])
            assert time.monotonic() - sent_at < 30  # seconds, not the 13 minutes of issue 11
            reasons = " | ".join(s["reason"] for s in status["failed_series"])
            assert "2147483648 frame(s)" in reasons and "65535x16" in reasons

            analysed = node.wait_jobs("analyse", 1)
            forwarded = node.wait_jobs("forward", 1)
            assert [j.state for j in analysed + forwarded] == [JobState.DONE, JobState.DONE], analysed + forwarded
            assert analysed[0].payload["instance_count"] == 56  # routed once complete, not mid-transfer
            node.wait_jobs("deliver", 2)
            outputs = list((node.root / "outbox" / f"job-{analysed[0].id}").glob("*.dcm"))
            received = [pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.received()]
            assert sum(d.Modality == "MR" for d in received) == 3
            assert len(received) == len(outputs) + 3 and len(outputs) > 10
            with Spool(node.root / "spool", node.root / "node.db") as spool:
                states = sorted((r.instance_count, r.state) for r in spool.series())
            # the long-UID instance was stored; as a 1-instance CT it matches no rule
            assert states == [(1, "discarded"), (1, "failed"), (1, "failed"), (3, "routed"), (56, "routed")]

            node.proc.terminate()
            started = time.monotonic()
            code = node.proc.wait(10)  # raises TimeoutExpired if the node hangs
            assert time.monotonic() - started < 10
            log = node.log()
            assert "node stopped" in log and "ending the process" not in log, log[-3000:]
            assert code == 0
        finally:
            node.stop()


@needs_dcmtk
def test_the_release_of_an_association_brings_the_dispatch_tick_forward(tmp_path):
    """With a long check interval (30 s) a series is still routed right after the release
    wait: the release pulls the dispatcher's tick to that moment."""
    from ct_ai_node.config import NodeConfig
    from ct_ai_node.node import Node
    from node_harness import dcmtk, node_config

    port = free_port()
    config = NodeConfig.model_validate(node_config(
        port, destinations=[], rules=[{"name": "all-ct", "when": [{"tag": "Modality", "equals": "CT"}],
                                       "action": "analyse"}],
        storage={"root": str(tmp_path / "var"), "min_free_mb": 100},
        completeness={"quiet_time_s": 20, "check_interval_s": 30},
        workers={"count": 0, "device": "cpu"}))
    folder = tmp_path / "ct"
    write_ct_series(folder, n=3, rows=16, cols=16)
    node = Node(config, log_level=logging.WARNING).start()
    try:
        time.sleep(1)  # the first tick (at start + 30 s) is far away
        sent_at = time.monotonic()
        assert dcmtk("storescu", "-aec", "CTAI", "+sd", "127.0.0.1", str(port), str(folder)).returncode == 0
        while not node.queue.list(kind="analyse") and time.monotonic() - sent_at < 15:
            time.sleep(0.1)
        routed_after = time.monotonic() - sent_at
    finally:
        node.stop()
    assert node.queue.list(kind="analyse"), "not routed within 15 s"
    assert routed_after < 10, routed_after  # release wait 2 s; without the pull, the 30 s tick
