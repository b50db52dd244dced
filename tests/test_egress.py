"""Egress against real peers on loopback: DCMTK storescp, Orthanc (DICOM, DICOMweb, REST),
and a small pynetdicom SCP for the error paths (called-AE check, failure statuses,
a reply that never comes)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from ct_ai_node import peers
from ct_ai_node.egress import (
    Destination,
    DestinationError,
    DicomDestination,
    OrthancDestination,
    SendReport,
    StowDestination,
    classify_status,
    destination_from_config,
)
from ct_ai_node.egress.stow import StowDestination as _Stow, multipart_related

SERIES = Path(__file__).resolve().parent.parent / "sample_series" / "normal"
ALL = sorted(SERIES.glob("*.dcm"))
FEW = ALL[:6]

needs_orthanc = pytest.mark.skipif(not Path("/usr/sbin/Orthanc").exists() and not peers.tool_available("Orthanc"),
                                   reason="Orthanc not installed")
needs_storescp = pytest.mark.skipif(not peers.tool_available("storescp"), reason="DCMTK storescp not installed")


def sop_uids(paths) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


@pytest.fixture(scope="module")
def orthanc_peer(tmp_path_factory):
    if not (Path("/usr/sbin/Orthanc").exists() or peers.tool_available("Orthanc")):
        pytest.skip("Orthanc not installed")
    with peers.Orthanc(tmp_path_factory.mktemp("orthanc")).start() as peer:
        yield peer


@pytest.fixture()
def orthanc(orthanc_peer):
    """The module's Orthanc, emptied for each test."""
    api = orthanc_peer.api()
    api.delete_all_content()
    yield orthanc_peer
    api.close()


def orthanc_sop_uids(peer) -> set[str]:
    ids = httpx.get(f"{peer.url}/instances", timeout=10).json()
    return {httpx.get(f"{peer.url}/instances/{i}/simplified-tags", timeout=10).json()["SOPInstanceUID"]
            for i in ids}


def orthanc_count(peer) -> int:
    return len(httpx.get(f"{peer.url}/instances", timeout=10).json())


# -- a pynetdicom SCP for the error paths ---------------------------------------------

class StrictSCP:
    """Storage SCP that rejects a wrong called AE title; ``statuses`` maps SOP Instance
    UID -> status to answer (default 0x0000); ``stall`` UIDs get their reply late once."""

    def __init__(self, ae_title="STRICT", sop_classes=(CTImageStorage,),
                 syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)):
        self.port = peers.free_port()
        self.statuses: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.received: list[str] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.add_supported_context(Verification)
        for sop in sop_classes:
            ae.add_supported_context(sop, list(syntaxes))
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event):
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            delay = self.stall.pop(uid, 0)
        if delay:
            time.sleep(delay)  # the sender's DIMSE timeout fires first: the reply is "lost"
            return 0x0000
        with self._lock:
            self.received.append(uid)
        return self.statuses.get(uid, 0x0000)

    def close(self):
        self.server.shutdown()


@pytest.fixture()
def strict_scp():
    scp = StrictSCP()
    yield scp
    scp.close()


# -- DICOM C-STORE --------------------------------------------------------------------

@needs_storescp
def test_dicom_to_storescp_and_resend(tmp_path):
    with peers.StoreSCP(tmp_path / "in").start() as scp:
        dest = DicomDestination("pacs", "127.0.0.1", scp.port, scp.ae_title)
        assert isinstance(dest, Destination)
        report = dest.send(ALL)
        assert isinstance(report, SendReport)
        assert report.sent == len(ALL) == 56 and report.already_present == 0
        assert report.bytes_sent == sum(p.stat().st_size for p in ALL)
        assert report.seconds < 20  # no delayed-ACK stall (TCP_NODELAY)
        assert len(scp.received()) == 56
        assert sop_uids(scp.received()) == sop_uids(ALL)
        # re-send: same SOP Instance UIDs, the SCP keeps one file each
        assert dest.send(ALL).sent == 56
        assert len(scp.received()) == 56


@needs_orthanc
def test_dicom_to_orthanc_and_resend(orthanc):
    dest = DicomDestination("pacs", "127.0.0.1", orthanc.dicom_port, orthanc.ae_title, calling_ae_title="CTAI")
    report = dest.send(ALL)
    assert report.sent == 56 and report.destination == "pacs"
    assert orthanc_sop_uids(orthanc) == sop_uids(ALL)
    dest.send(ALL[:10])
    assert orthanc_count(orthanc) == 56


def test_dicom_wrong_called_ae_is_not_retryable(strict_scp):
    dest = DicomDestination("pacs", "127.0.0.1", strict_scp.port, "NOTSTRICT")
    with pytest.raises(DestinationError) as err:
        dest.send(FEW)
    assert err.value.retryable is False
    assert "called AE title not recognised" in str(err.value) and "\n" not in str(err.value)
    assert strict_scp.received == []
    # the right AE title goes through
    assert DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT").send(FEW).sent == len(FEW)


def test_dicom_sop_class_not_supported_is_not_retryable():
    scp = StrictSCP(sop_classes=())  # Verification only
    try:
        with pytest.raises(DestinationError) as err:
            DicomDestination("pacs", "127.0.0.1", scp.port, "STRICT").send(FEW)
        assert err.value.retryable is False and "no presentation context" in str(err.value)
    finally:
        scp.close()


@pytest.mark.parametrize("status, retryable", [(0xA700, True), (0x0110, True), (0xA900, False),
                                               (0xC000, False), (0x0124, False)])
def test_dicom_failure_status(strict_scp, status, retryable):
    uids = sorted(sop_uids(FEW))
    strict_scp.statuses[uids[0]] = status
    with pytest.raises(DestinationError) as err:
        DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT").send(FEW)
    assert err.value.retryable is retryable
    assert f"0x{status:04X}" in str(err.value)


def test_dicom_duplicate_and_warning_statuses(strict_scp):
    uids = sorted(sop_uids(FEW))
    strict_scp.statuses[uids[0]] = 0x0111
    strict_scp.statuses[uids[1]] = 0xB000
    report = DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT").send(FEW)
    assert (report.sent, report.already_present, report.warnings) == (len(FEW) - 1, 1, 1)


def test_dicom_lost_reply_resumes_on_new_association(strict_scp):
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in FEW}
    third = str(dcmread(FEW[2], stop_before_pixels=True).SOPInstanceUID)
    strict_scp.stall[third] = 2.0
    dest = DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT", timeout_s=1)
    report = dest.send(FEW)
    assert report.sent == len(FEW)
    assert set(strict_scp.received) == set(by_uid)  # the stalled one arrived on the resend

    # with no resume left, a lost reply is a retryable error
    strict_scp.stall[third] = 2.0
    no_resume = DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT", timeout_s=1, resume_attempts=0)
    with pytest.raises(DestinationError) as err:
        no_resume.send(FEW)
    assert err.value.retryable is True and "reply lost after 2 of 6" in str(err.value)


@pytest.mark.parametrize("peer_syntax,decoded", [(ExplicitVRLittleEndian, 0), (ImplicitVRLittleEndian, 6)])
def test_files_go_as_their_bytes_unless_the_peer_takes_only_another_syntax(monkeypatch, peer_syntax, decoded):
    """Issue 15: a Part-10 file in a syntax the peer accepted goes out undecoded; a peer that
    takes only implicit VR gets the explicit-VR files converted (read, then encoded again)."""
    import ct_ai_node.egress.dicom as egress_dicom

    assert {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in FEW} == {
        ExplicitVRLittleEndian}
    reads = []
    real_read = egress_dicom._read
    monkeypatch.setattr(egress_dicom, "_read", lambda path, **kw: reads.append(path) or real_read(path, **kw))
    scp = StrictSCP(syntaxes=(peer_syntax,))
    try:
        report = DicomDestination("pacs", "127.0.0.1", scp.port, "STRICT").send(FEW)
    finally:
        scp.close()
    assert report.sent == len(FEW) and sorted(scp.received) == sorted(sop_uids(FEW))
    assert len(reads) == decoded


def test_over_long_uid_is_offered_to_the_peer(tmp_path, strict_scp):
    """An instance stored with a 70-character SOP Instance UID (the SCP accepts those) is
    forwarded with the peer's status, not refused by the sender's own UID check."""
    ds = dcmread(FEW[0])
    long_uid = "1.2.826.0.1.3680043.8.498." + "1" * 44
    assert len(long_uid) == 70
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = long_uid
    path = tmp_path / "long.dcm"
    ds.save_as(path)
    report = DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT").send([path])
    assert report.sent == 1
    assert strict_scp.received == [long_uid]


def test_unreadable_file_is_not_retryable(tmp_path, strict_scp):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(DestinationError) as err:
        DicomDestination("pacs", "127.0.0.1", strict_scp.port, "STRICT").send([*FEW[:1], bad])
    assert err.value.retryable is False and "bad.dcm" in str(err.value)


# -- destination down -----------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda port: DicomDestination("down", "127.0.0.1", port, "PACS", timeout_s=3),
    lambda port: StowDestination("down", f"http://127.0.0.1:{port}/dicom-web", timeout_s=3),
    lambda port: OrthancDestination("down", f"http://127.0.0.1:{port}", timeout_s=3),
], ids=["dicom", "stow", "orthanc"])
def test_destination_down_is_retryable_and_quick(make):
    dest = make(peers.free_port())
    started = time.monotonic()
    with pytest.raises(DestinationError) as err:
        dest.send(FEW)
    assert time.monotonic() - started < 5
    assert err.value.retryable is True
    assert str(err.value).startswith("down: ") and "\n" not in str(err.value)


# -- STOW-RS --------------------------------------------------------------------------

@needs_orthanc
def test_stow_to_orthanc_and_resend(orthanc):
    dest = StowDestination("web", orthanc.dicomweb_url, batch_mb=1)  # ~4 files a request
    report = dest.send(ALL[:12])
    assert report.sent == 12
    assert orthanc_sop_uids(orthanc) == sop_uids(ALL[:12])
    again = dest.send(ALL[:12])
    assert again.total == 12
    assert orthanc_count(orthanc) == 12


@needs_orthanc
def test_stow_wrong_url_is_not_retryable(orthanc):
    with pytest.raises(DestinationError) as err:
        StowDestination("web", f"{orthanc.url}/no-such-root").send(FEW[:1])
    assert err.value.retryable is False and "HTTP 404" in str(err.value)


def test_multipart_body():
    body, content_type = multipart_related([b"AAA", b"BB"], boundary="xyz")
    assert content_type == 'multipart/related; type="application/dicom"; boundary=xyz'
    assert body == (b"--xyz\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n"
                    b"--xyz\r\nContent-Type: application/dicom\r\n\r\nBB\r\n--xyz--\r\n")


def _failed(*codes):
    return {"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [c]}} for c in codes]},
            "00081199": {"vr": "SQ", "Value": [{}]}}


@pytest.mark.parametrize("status, doc, outcome", [
    (200, None, (3, 0, 0)),
    (200, {"00081199": {"vr": "SQ", "Value": [{}, {}, {}]}}, (3, 0, 0)),
    (202, {"00081199": {"vr": "SQ", "Value": [{"00081196": {"vr": "US", "Value": [0xB000]}}, {}, {}]}}, (3, 0, 1)),
    (409, _failed(0x0111), (1, 1, 0)),
    (202, _failed(0xA700), True),
    (409, _failed(0xA900), False),
    (409, _failed(0xA700, 0xC000), False),
    (409, None, False),
    (500, None, True), (503, None, True), (429, None, True),
    (400, None, False), (401, None, False), (413, None, False),
])
def test_stow_response_classification(status, doc, outcome):
    dest = _Stow("web", "http://x/dicom-web")
    rsp = httpx.Response(status, json=doc) if doc is not None else httpx.Response(status)
    batch = [Path("a"), Path("b"), Path("c")]
    if isinstance(outcome, tuple):
        assert dest._outcome(rsp, batch) == outcome
    else:
        with pytest.raises(DestinationError) as err:
            dest._outcome(rsp, batch)
        assert err.value.retryable is outcome


def test_classify_status():
    assert [classify_status(s) for s in (0x0000, 0x0111, 0x0001, 0xB007, 0xA701, 0x0213, 0xA900, 0xC211, 0x0122)] \
        == ["ok", "already", "warning", "warning", "retry", "retry", "fatal", "fatal", "fatal"]


# -- Orthanc REST ---------------------------------------------------------------------

@needs_orthanc
def test_orthanc_rest_and_resend(orthanc):
    dest = OrthancDestination("orthanc-rest", orthanc.url)
    report = dest.send(FEW)
    assert (report.sent, report.already_present) == (len(FEW), 0)
    assert orthanc_sop_uids(orthanc) == sop_uids(FEW)
    again = dest.send(FEW)
    assert (again.sent, again.already_present) == (0, len(FEW))
    assert orthanc_count(orthanc) == len(FEW)


@needs_orthanc
def test_orthanc_rest_bad_file_is_not_retryable(orthanc, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(DestinationError) as err:
        OrthancDestination("orthanc-rest", orthanc.url).send([bad])
    assert err.value.retryable is False and "HTTP 400" in str(err.value)


# -- factory --------------------------------------------------------------------------

def test_destination_from_config():
    dicom = destination_from_config(SimpleNamespace(
        name="pacs", kind="dicom", host="127.0.0.1", port=4242, ae_title="ORTHANC", calling_ae_title="NODE",
        url=None, username=None, password=None))
    assert isinstance(dicom, DicomDestination)
    assert (dicom.name, dicom.host, dicom.port, dicom.ae_title, dicom.calling_ae_title, dicom.timeout_s) == \
        ("pacs", "127.0.0.1", 4242, "ORTHANC", "NODE", 30)

    stow = destination_from_config({"name": "web", "kind": "stow", "url": "http://h:8042/dicom-web/",
                                    "username": "u", "password": "p", "timeout_s": 5})
    assert isinstance(stow, StowDestination)
    assert (stow.url, stow.auth, stow.timeout_s) == ("http://h:8042/dicom-web", ("u", "p"), 5)

    rest = destination_from_config(SimpleNamespace(name="r", kind="orthanc", url="http://h:8042"))
    assert isinstance(rest, OrthancDestination) and rest.username is None

    with pytest.raises(ValueError, match="unknown kind"):
        destination_from_config(SimpleNamespace(name="x", kind="ftp"))
    with pytest.raises(ValueError, match="missing field 'host'"):
        destination_from_config(SimpleNamespace(name="x", kind="dicom", port=1, ae_title="A"))


def test_dcmtk_tool_passes_over_pynetdicoms_apps_of_the_same_name(tmp_path, monkeypatch):
    # pynetdicom installs Python scripts named storescp, storescu... into the virtual
    # environment's bin, first on PATH once it is activated; the peers need DCMTK's
    venv_bin, system_bin = tmp_path / "venv" / "bin", tmp_path / "usr" / "bin"
    for folder, head in ((venv_bin, b"#!/usr/bin/python\nimport sys\n"), (system_bin, b"\x7fELF\x02\x01\x01")):
        folder.mkdir(parents=True)
        tool = folder / "storescp"
        tool.write_bytes(head)
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{venv_bin}{os.pathsep}{system_bin}")
    assert peers.dcmtk_tool("storescp") == str(system_bin / "storescp")
    assert peers.tool_available("storescp")
    monkeypatch.setenv("PATH", str(venv_bin))
    assert peers.dcmtk_tool("storescp") is None and not peers.tool_available("storescp")
