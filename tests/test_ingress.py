"""The Storage SCP against real peers on loopback: DCMTK echoscu/storescu, pynetdicom
SCUs, a subprocess node killed with SIGKILL mid-transfer, idle connects, TLS."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from helpers_dicom import write_ct_series
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from ct_ai_node.ingress import AllowedCaller, ScpSettings, StorageSCP, TlsSettings
from ct_ai_node.ingress.scp import _Whitelist
from ct_ai_node.peers import dcmtk_tool, free_port, nodelay_env, wait_for_port
from ct_ai_node.rules.completeness import whole_series
from ct_ai_node.spool import Spool, series_key

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_series" / "normal"

pytestmark = pytest.mark.skipif(dcmtk_tool("storescu") is None or dcmtk_tool("echoscu") is None,
                                reason="DCMTK (storescu, echoscu) not installed: run `make test`")


def fast_settings(**kw) -> ScpSettings:
    base = dict(ae_title="CTAI", host="127.0.0.1", port=0, allowed_callers=[("PACS", "127.0.0.1")],
                max_associations=4, acse_timeout_s=3, dimse_timeout_s=10, network_timeout_s=10, min_free_mb=50)
    base.update(kw)
    return ScpSettings(**base)


class Node:
    """An in-process SCP + spool, recording on_released calls."""

    def __init__(self, tmp: Path, **kw):
        self.spool = Spool(tmp / "var" / "spool", tmp / "var" / "node.db")
        self.released: list[tuple[str, str, list[str]]] = []
        self.scp = StorageSCP(fast_settings(**kw), self.spool,
                              on_released=lambda ae, host, keys: self.released.append((ae, host, keys))).start()

    def close(self) -> None:
        self.scp.stop()
        self.spool.close()


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    n.close()


def storescu(port: int, paths, aet: str = "PACS", *extra: str) -> subprocess.CompletedProcess:
    cmd = [dcmtk_tool("storescu") or "storescu", "-v", "-aet", aet, "-aec", "CTAI", *extra, "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, env=nodelay_env(), capture_output=True, text=True, timeout=60)


def _nodelay(event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def scu(port: int, aet: str = "PACS", syntaxes=(ExplicitVRLittleEndian,), tls=None):
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage, list(syntaxes))
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title="CTAI", evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
                        tls_args=tls)


def wait_until(cond, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_echoscu(node):
    res = subprocess.run([dcmtk_tool("echoscu") or "echoscu", "-aet", "PACS", "-aec", "CTAI", "127.0.0.1", str(node.scp.port)],
                         env=nodelay_env(), capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


def test_storescu_series_stored_indexed_idempotent_and_released(node):
    sources = sorted(SAMPLE.glob("*.dcm"))
    res = storescu(node.scp.port, sources)
    assert res.returncode == 0, res.stdout + res.stderr
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    key = series_key("PACS", first.StudyInstanceUID, first.SeriesInstanceUID)
    rec = node.spool.get_series(key)
    assert rec.instance_count == len(sources) == 56
    assert wait_until(lambda: node.spool.get_series(key).released_at is not None)
    assert node.released == [("PACS", "127.0.0.1", [key])]
    # the whole series came in this association: completeness may wait less after its release
    rec = node.spool.get_series(key)
    assert rec.release_carried == 56 and whole_series(rec.instance_count, rec.release_carried)
    stored = {pydicom.dcmread(p).SOPInstanceUID: p for p in node.spool.instance_paths(key)}
    for src in sources:
        a = pydicom.dcmread(src)
        b = pydicom.dcmread(stored[a.SOPInstanceUID])
        assert (b.StudyInstanceUID, b.SeriesInstanceUID, b.SOPClassUID) == (
            a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPClassUID)
        assert b.PixelData == a.PixelData and b.file_meta.SourceApplicationEntityTitle == "PACS"

    # the same series again: same files, same count, released again
    res = storescu(node.scp.port, sources)
    assert res.returncode == 0
    assert node.spool.get_series(key).instance_count == 56
    assert len(list(node.spool.series_dir(key).glob("*.dcm"))) == 56
    assert sorted(node.spool.instance_paths(key)) == sorted(stored.values())
    assert wait_until(lambda: len(node.released) == 2)
    # sent again whole: whole again
    assert whole_series(56, node.spool.get_series(key).release_carried)


def test_a_series_stored_over_two_open_associations_is_not_whole_in_either(node):
    """Two associations storing into one series at once: the release of the first is no sign
    that the series is whole (the other is still sending), nor is the second's."""
    sources = sorted(SAMPLE.glob("*.dcm"))
    first = pydicom.dcmread(sources[0], stop_before_pixels=True)
    key = series_key("PACS", first.StudyInstanceUID, first.SeriesInstanceUID)
    a = scu(node.scp.port)
    b = scu(node.scp.port)
    try:
        assert a.is_established and b.is_established
        for i, path in enumerate(sources[:24]):
            assert (a if i % 2 else b).send_c_store(pydicom.dcmread(path)).Status == 0x0000
        a.release()
        assert wait_until(lambda: node.spool.get_series(key).released_at is not None)
        assert node.spool.get_series(key).release_carried is None  # b still stores into it
    finally:
        a.release()
        b.release()
    assert wait_until(lambda: len(node.released) == 2)
    rec = node.spool.get_series(key)
    assert (rec.instance_count, rec.release_carried) == (24, 12)
    assert not whole_series(rec.instance_count, rec.release_carried)


def test_series_with_one_sop_uid_on_every_slice_is_received_whole_and_analysed(node, tmp_path):
    """A de-identified export that wrote the same SOP Instance UID on every slice, sent with
    DCMTK storescu: every slice gets success and is kept, and the spool folder analyses
    with all of them (slices identified by position, valid UIDs minted, a warning)."""
    from ct_ai_node.analyze import AnalyzeOptions, analyze_folder

    sources = sorted(SAMPLE.glob("*.dcm"))
    shared = str(pydicom.dcmread(sources[0], stop_before_pixels=True).SOPInstanceUID)
    folder = tmp_path / "export"
    folder.mkdir()
    for i, path in enumerate(sources):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    res = storescu(node.scp.port, sorted(folder.iterdir()))
    assert res.returncode == 0, res.stderr[-2000:]
    key = series_key("PACS", *(str(pydicom.dcmread(sources[0], stop_before_pixels=True).get(k))
                               for k in ("StudyInstanceUID", "SeriesInstanceUID")))
    assert node.spool.get_series(key).instance_count == len(sources)
    doc = analyze_folder(node.spool.series_dir(key), tmp_path / "out",
                         AnalyzeOptions(lungs="classical", device="cpu", parallel_writers=False))
    assert doc.status == "done", doc.reason
    assert len(doc.slice_scores) == len(sources)
    assert len({s.sop_instance_uid for s in doc.slice_scores}) == len(sources)
    assert any("SOPInstanceUID" in w for w in doc.warnings), doc.warnings


def test_compressed_data_kept_as_sent(node, tmp_path):
    """JPEG Lossless via storescu and RLE via pynetdicom: stored in the transfer syntax sent."""
    src = write_ct_series(tmp_path / "src", n=3, rows=64, cols=64, shuffle_names=False)
    sent = []
    if shutil.which("dcmcjpeg"):
        jpeg = tmp_path / "jpeg.dcm"
        subprocess.run(["dcmcjpeg", "+e1", str(src.paths[0]), str(jpeg)], check=True, capture_output=True)
        res = storescu(node.scp.port, [jpeg], "PACS", "-xs")  # propose JPEG Lossless
        assert res.returncode == 0, res.stdout + res.stderr
        sent.append(pydicom.dcmread(jpeg))
    ds = pydicom.dcmread(src.paths[1])
    ds.compress(RLELossless)
    assoc = scu(node.scp.port, syntaxes=(RLELossless,))
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    sent.append(ds)
    key = series_key("PACS", src.study_instance_uid, src.series_instance_uid)
    stored = {d.SOPInstanceUID: d for d in map(pydicom.dcmread, node.spool.instance_paths(key))}
    for s in sent:
        got = stored[s.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == s.file_meta.TransferSyntaxUID
        assert got.PixelData == s.PixelData


def test_caller_not_in_whitelist_is_rejected(node):
    res = storescu(node.scp.port, sorted(SAMPLE.glob("*.dcm"))[:3], "WRONG")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr
    assert node.spool.series() == [] and not list(node.spool.spool_dir.iterdir())


def test_host_mismatch_is_rejected(tmp_path):
    n = Node(tmp_path, allowed_callers=[AllowedCaller("PACS", "10.254.254.254")])
    try:
        res = storescu(n.scp.port, sorted(SAMPLE.glob("*.dcm"))[:3])
        assert res.returncode != 0 and "Association Rejected" in res.stdout + res.stderr
        assert n.spool.series() == []
    finally:
        n.close()


def test_whitelist_rules():
    w = _Whitelist([AllowedCaller("PACS", "localhost"), AllowedCaller("*", "10.0.0.7"), AllowedCaller("CT1", None)])
    assert w.allows("PACS", "127.0.0.1") and w.allows("PACS", "::ffff:127.0.0.1")
    assert not w.allows("PACS", "10.0.0.8")
    assert w.allows("ANY", "10.0.0.7") and w.allows("CT1", "192.168.1.1") and not w.allows("CT2", "192.168.1.1")
    assert _Whitelist([]).allows("WHOEVER", "1.2.3.4")


def test_refuses_with_a700_before_disk_is_full(tmp_path):
    n = Node(tmp_path, min_free_mb=10**9)
    try:
        ds = pydicom.dcmread(sorted(SAMPLE.glob("*.dcm"))[0])
        assoc = scu(n.scp.port)
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0xA700
        assoc.release()
        assert n.spool.series() == [] and not list(n.spool.spool_dir.rglob("*.dcm"))
    finally:
        n.close()


def test_unparseable_dataset_fails_with_c000(node):
    ds = pydicom.dcmread(sorted(SAMPLE.glob("*.dcm"))[0])
    del ds.SeriesInstanceUID
    assoc = scu(node.scp.port)
    status = assoc.send_c_store(ds).Status
    assoc.release()
    assert 0xC000 <= status <= 0xCFFF
    assert node.spool.series() == []


def test_abort_marks_released_and_tcp_nodelay_is_set(node, tmp_path):
    src = write_ct_series(tmp_path / "src", n=2, rows=32, cols=32)
    assoc = scu(node.scp.port)
    assert assoc.send_c_store(pydicom.dcmread(src.paths[0])).Status == 0
    # the accepted socket of this association has TCP_NODELAY
    (acceptor,) = node.scp._server.active_associations
    assert acceptor.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assoc.abort()
    key = series_key("PACS", src.study_instance_uid, src.series_instance_uid)
    assert wait_until(lambda: node.released == [("PACS", "127.0.0.1", [key])])
    assert node.spool.get_series(key).released_at is not None


def test_idle_connects_do_not_starve_real_callers(node):
    idle = [socket.create_connection(("127.0.0.1", node.scp.port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        t = time.monotonic()
        res = subprocess.run([dcmtk_tool("echoscu") or "echoscu", "-aet", "PACS", "-aec", "CTAI", "127.0.0.1", str(node.scp.port)],
                             env=nodelay_env(), capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr
        assert time.monotonic() - t < 3
    finally:
        for s in idle:
            s.close()


def test_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    n = Node(tmp_path, tls=TlsSettings(cert, key, None, require_client_cert=False))
    try:
        silent = socket.create_connection(("127.0.0.1", n.scp.port))  # no handshake: must not block others
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        assoc = scu(n.scp.port, tls=(ctx, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(pydicom.dcmread(sorted(SAMPLE.glob("*.dcm"))[0])).Status == 0
        assoc.release()
        assert len(n.spool.series()) == 1
        plain = scu(n.scp.port)  # no TLS: no association
        assert not plain.is_established
        silent.close()
    finally:
        n.close()


# ---- the subprocess node: SIGKILL mid-transfer, restart, recover ------------------------------

def start_node(root: Path, port: int, fsync: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ct_ai_node.ingress", "--root", str(root), "--port", str(port), "--host",
           "127.0.0.1", "--allow", "PACS@127.0.0.1", "--min-free-mb", "50", "--acse-timeout", "5"]
    if not fsync:
        cmd.append("--no-fsync")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_port(port, 30, proc)
    return proc


def stop_node(proc: subprocess.Popen) -> str:
    """SIGTERM; the node must exit 0 within 20 s (else it is killed and the test fails)."""
    proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=20)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
        pytest.fail(f"the node did not stop on SIGTERM:\n{out}")
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
def test_sigkill_mid_transfer_loses_nothing_acknowledged(tmp_path, fsync):
    """Without fsync too: a crash of the node (not of the machine) loses nothing acknowledged."""
    src = write_ct_series(tmp_path / "src", n=100, rows=256, cols=256)
    root, port = tmp_path / "var", free_port()
    proc = start_node(root, port, fsync)
    try:
        _sigkill_then_recover(proc, src, root, port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sigkill_then_recover(proc: subprocess.Popen, src, root: Path, port: int) -> None:
    statuses: dict[str, int | None] = {}
    ok = threading.Event()

    def killer():
        # wait for ~40 acknowledged instances, then kill at a random point of the next ones
        if wait_until(lambda: sum(s == 0 for s in statuses.values()) >= 40, 30):
            time.sleep(random.uniform(0, 0.01))
            proc.send_signal(signal.SIGKILL)
            ok.set()

    threading.Thread(target=killer, daemon=True).start()
    assoc = scu(port)
    assert assoc.is_established
    assoc.dimse_timeout = 3  # the peer dies: do not wait long for its answer
    for path in src.paths:
        ds = pydicom.dcmread(path)
        try:
            rsp = assoc.send_c_store(ds) if assoc.is_established else None
        except Exception:  # noqa: BLE001 - the peer died under us
            rsp = None
        statuses[ds.SOPInstanceUID] = getattr(rsp, "Status", None)
    assoc.release()
    proc.wait(10)
    assert ok.is_set() and proc.returncode == -signal.SIGKILL
    acked = {uid for uid, s in statuses.items() if s == 0}
    assert 40 <= len(acked) < 100

    restarted = start_node(root, port)  # recover() runs before the SCP listens
    out = stop_node(restarted)
    assert "recovery:" in out, out
    with Spool(root / "spool", root / "node.db") as spool:
        key = series_key("PACS", src.study_instance_uid, src.series_instance_uid)
        indexed = set(spool.instance_uids(key))
        assert acked <= indexed
        assert spool.get_series(key).instance_count == len(indexed)
        for path in spool.instance_paths(key):
            assert pydicom.dcmread(path).SOPInstanceUID in indexed
        assert not list(spool.spool_dir.rglob("*.tmp"))


def test_subprocess_node_receives_a_study_without_stalls(tmp_path):
    """100 slices of 512x512 (50 MB) through storescu: a delayed-ACK stall per
    instance would add ~4 s; the transfer itself takes well under 1 s here."""
    src = write_ct_series(tmp_path / "src", n=100, rows=512, cols=512, shuffle_names=False)
    root, port = tmp_path / "var", free_port()
    proc = start_node(root, port)
    try:
        t = time.monotonic()
        res = storescu(port, ["+sd", src.paths[0].parent])
        elapsed = time.monotonic() - t
        assert res.returncode == 0, res.stdout + res.stderr
        assert elapsed < 4.0, f"{elapsed:.1f} s for 100 slices"
    finally:
        stop_node(proc)
    with Spool(root / "spool", root / "node.db") as spool:
        (rec,) = spool.series()
        assert rec.instance_count == 100 and rec.released_at is not None
