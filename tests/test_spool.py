"""The spool: durable writes, idempotent re-sends, the index, crash recovery, and
the fast header scan / Part-10 assembly checked against pydicom."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path

import pydicom
import pytest
from helpers_dicom import write_ct_series, write_enhanced_ct
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from ct_ai_node.spool import (
    BadInstance,
    InstanceMeta,
    Spool,
    dataset_header,
    instance_file_name,
    part10,
    read_header,
    series_key,
)
from ct_ai_node.spool.store import SIDECAR, _write_atomic


def split_part10(raw: bytes) -> tuple[bytes, str]:
    """(data set bytes, transfer syntax) of a Part-10 file."""
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return raw[fp.tell():], str(meta.TransferSyntaxUID)


def meta_of(raw: bytes, calling_ae: str = "PACS", host: str = "127.0.0.1") -> InstanceMeta:
    h = read_header(raw)
    return InstanceMeta(h["SOPInstanceUID"], h["SOPClassUID"], h["StudyInstanceUID"], h["SeriesInstanceUID"],
                        h["Modality"], calling_ae, "CTAI", host, h["TransferSyntaxUID"])


@pytest.fixture
def spool(tmp_path):
    with Spool(tmp_path / "var" / "spool", tmp_path / "var" / "node.db") as s:
        yield s


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_ct_series(tmp_path_factory.mktemp("src"), n=6, rows=32, cols=32)


def test_store_writes_file_then_index(spool, series):
    raw = series.paths[0].read_bytes()
    meta = meta_of(raw)
    stored = spool.store(raw, meta)
    key = series_key("PACS", series.study_instance_uid, series.series_instance_uid)
    assert stored.series_key == key and not stored.replaced
    assert stored.path == spool.spool_dir / key / f"{meta.sop_instance_uid}.dcm"
    assert stored.path.read_bytes() == raw
    assert json.loads((stored.path.parent / SIDECAR).read_text())["calling_ae"] == "PACS"
    assert spool.instance_paths(key) == [stored.path]
    rec = spool.get_series(key)
    assert (rec.instance_count, rec.state, rec.calling_ae, rec.caller_host, rec.modality) == (
        1, "receiving", "PACS", "127.0.0.1", "CT")
    assert rec.released_at is None and rec.first_received_at == rec.last_received_at
    assert [r.key for r in spool.series("receiving")] == [key] and spool.series("complete") == []
    assert not list(stored.path.parent.glob("*.tmp"))


def test_resend_is_idempotent(spool, series):
    raws = [p.read_bytes() for p in series.paths]
    first = [spool.store(r, meta_of(r)) for r in raws]
    again = [spool.store(r, meta_of(r)) for r in raws]
    key = first[0].series_key
    assert all(a.replaced and a.path == f.path for a, f in zip(again, first))
    assert spool.get_series(key).instance_count == len(raws)
    assert len(list(spool.series_dir(key).glob("*.dcm"))) == len(raws)
    assert sorted(spool.instance_uids(key)) == sorted(series.sop_instance_uids)


def test_series_key_is_deterministic_safe_and_per_caller():
    k = series_key("PACS", "1.2.3", "1.2.3.4.5")
    assert k == series_key("PACS", "1.2.3", "1.2.3.4.5")
    assert k != series_key("OTHER", "1.2.3", "1.2.3.4.5") != series_key("PACS", "1.2.3", "1.2.3.4.6")
    weird = series_key("../ x/\\", "1.2", "../../etc")
    assert "/" not in weird and "\\" not in weird and not weird.startswith(".")
    assert instance_file_name("1.2.840.1") == "1.2.840.1.dcm"
    hostile = instance_file_name("../../etc/passwd")
    assert "/" not in hostile and hostile.endswith(".dcm") and not hostile.startswith(".")


def test_release_state_and_late_instances(spool, series):
    raws = [p.read_bytes() for p in series.paths]
    key = spool.store(raws[0], meta_of(raws[0])).series_key
    spool.mark_released("PACS", "127.0.0.1", [key])
    assert spool.get_series(key).released_at is not None
    spool.mark_released("OTHER", "127.0.0.1", [key])  # another caller cannot release it
    spool.set_series_state(key, "complete")
    spool.store(raws[1], meta_of(raws[1]))  # a late instance: receiving again, not released
    rec = spool.get_series(key)
    assert (rec.state, rec.released_at, rec.instance_count) == ("receiving", None, 2)
    spool.set_series_state(key, "routed")
    spool.store(raws[2], meta_of(raws[2]))
    assert spool.get_series(key).state == "routed"  # routed stays; the caller decides
    spool.mark_released("PACS", "127.0.0.1", [key])  # a release does not hide the late arrival
    rec = spool.get_series(key)
    assert rec.released_at is not None and rec.last_received_at >= rec.updated_at
    with pytest.raises(ValueError):
        spool.set_series_state(key, "bogus")
    with pytest.raises(KeyError):
        spool.set_series_state("nope", "complete")


def test_remove_series(spool, series):
    raw = series.paths[0].read_bytes()
    key = spool.store(raw, meta_of(raw)).series_key
    assert spool.remove_series(key)
    assert spool.get_series(key) is None and spool.instance_paths(key) == []
    assert not spool.series_dir(key).exists() and not list(spool.spool_dir.iterdir())
    spool.store(raw, meta_of(raw))  # the same series can arrive again
    assert spool.get_series(key).instance_count == 1


def test_free_mb(spool):
    assert spool.free_mb() > 0


def test_concurrent_stores_from_threads(spool, tmp_path):
    sources = [write_ct_series(tmp_path / f"s{i}", n=15, rows=16, cols=16) for i in range(4)]
    errors = []

    def send(paths, ae):
        try:
            for p in paths:
                raw = p.read_bytes()
                spool.store(raw, meta_of(raw, calling_ae=ae))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s.paths, f"AE{i % 2}")) for i, s in enumerate(sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.instance_count for r in spool.series()) == [15] * 4


def test_recover_after_crash_at_every_step(tmp_path, series):
    """Each state a SIGKILL can leave behind: a tmp file, a renamed file without its
    row, a row without its file, a half-done removal, an unreadable file."""
    root, db = tmp_path / "var" / "spool", tmp_path / "var" / "node.db"
    raws = [p.read_bytes() for p in series.paths]
    with Spool(root, db) as spool:
        key = spool.store(raws[0], meta_of(raws[0])).series_key
        folder = spool.series_dir(key)
        # killed after the rename, before the index row
        for raw in raws[1:3]:
            _write_atomic(folder / instance_file_name(meta_of(raw).sop_instance_uid), raw)
        # killed while writing: tmp leftovers
        (folder / ".1.2.3.dcm.deadbeef.tmp").write_bytes(raws[3][:100])
        # a new series whose sidecar is gone (the caller then comes from the directory name)
        other = spool.store(raws[4], meta_of(raws[4], calling_ae="MODALITY")).series_key
        (spool.series_dir(other) / SIDECAR).unlink()
        spool.remove_series(other)  # then pretend the removal was interrupted:
        orphan = spool.spool_dir / f".{other}.0000.removing"
        orphan.mkdir()
        (orphan / "x.dcm").write_bytes(b"x")
        # a row whose file vanished, and a file that is not DICOM
        gone = spool.store(raws[5], meta_of(raws[5])).path
        gone.unlink()
        (folder / "garbage.dcm").write_bytes(b"not dicom at all")
    with Spool(root, db) as spool:
        report = spool.recover()
        assert (report.indexed, report.tmp_removed, report.rows_dropped, report.series_removed) == (2, 1, 1, 1)
        assert len(report.quarantined) == 1 and report.quarantined[0].is_file()
        assert report.quarantined[0].parent == spool.quarantine_dir
        assert sorted(spool.instance_uids(key)) == sorted(meta_of(r).sop_instance_uid for r in raws[:3])
        rec = spool.get_series(key)
        assert rec.instance_count == 3 and rec.calling_ae == "PACS" and rec.caller_host == "127.0.0.1"
        assert not list(spool.spool_dir.rglob("*.tmp")) and not orphan.exists()
        assert spool.recover().indexed == 0  # idempotent

        # a directory without sidecar: the caller is read from its name
        raw = raws[4]
        k = series_key("MODALITY", series.study_instance_uid, series.series_instance_uid)
        spool.series_dir(k).mkdir()
        _write_atomic(spool.series_dir(k) / "a.dcm", raw)
        assert spool.recover().indexed == 1
        assert spool.get_series(k).calling_ae == "MODALITY"


# ---- header scan and Part-10 assembly -------------------------------------------------------

def _variants(tmp_path: Path, series) -> list[bytes]:
    files = [p.read_bytes() for p in series.paths[:2]]
    files.append(write_enhanced_ct(tmp_path / "enh").paths[0].read_bytes())  # deep functional groups
    ds = pydicom.dcmread(series.paths[0])
    ds.ReferencedImageSequence = [pydicom.Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    for syntax in (ImplicitVRLittleEndian, RLELossless, DeflatedExplicitVRLittleEndian):
        d = pydicom.dcmread(series.paths[1]) if syntax == RLELossless else ds
        if syntax == RLELossless:
            d.compress(RLELossless)
        else:
            d.file_meta.TransferSyntaxUID = syntax
        buf = io.BytesIO()
        d.save_as(buf, enforce_file_format=True)
        files.append(buf.getvalue())
    sample = sorted((Path(__file__).resolve().parents[1] / "sample_series" / "normal").glob("*.dcm"))[:1]
    files += [p.read_bytes() for p in sample]
    return files


def test_dataset_header_matches_pydicom(tmp_path, series):
    for raw in _variants(tmp_path, series):
        body, syntax = split_part10(raw)
        ref = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        got = dataset_header(body, syntax)
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
            assert got[kw] == str(ref.get(kw, "")), (syntax, kw)
        assert got["TransferSyntaxUID"] == syntax


def test_part10_round_trips(tmp_path, series):
    for raw in _variants(tmp_path, series):
        body, syntax = split_part10(raw)
        h = dataset_header(body, syntax)
        out = part10(body, h["SOPClassUID"], h["SOPInstanceUID"], syntax, "PACS")
        assert split_part10(out) == (body, syntax)  # the data set bytes are untouched
        ds, ref = pydicom.dcmread(io.BytesIO(out)), pydicom.dcmread(io.BytesIO(raw))
        assert ds.file_meta.MediaStorageSOPInstanceUID == ref.SOPInstanceUID
        assert ds.file_meta.SourceApplicationEntityTitle == "PACS"
        assert ds.PixelData == ref.PixelData


@pytest.mark.filterwarnings("ignore:Expected explicit VR")
def test_bad_data_raises_bad_instance(series):
    body, syntax = split_part10(series.paths[0].read_bytes())
    with pytest.raises(BadInstance):
        dataset_header(b"\x00\x01garbage", syntax)
    ds = pydicom.dcmread(series.paths[0])
    del ds.StudyInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(BadInstance, match="StudyInstanceUID"):
        dataset_header(split_part10(buf.getvalue())[0], syntax)
    with pytest.raises(BadInstance):
        read_header(b"\x00" * 300)
    assert os.path.exists(series.paths[0])


def test_different_images_under_one_sop_instance_uid_are_all_kept(tmp_path, spool):
    """Exporters that write one SOP Instance UID on every slice: over C-STORE each slice
    replaced the last and the series shrank to one image. Now a different image under a
    UID already received is kept beside it; a re-send of the same bytes still replaces its
    own file; recovery indexes each file once."""
    written = write_ct_series(tmp_path / "src", n=4, rows=16, cols=16)
    shared_uid = written.sop_instance_uids[0]
    raws = []
    for path in written.paths:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = shared_uid
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        raws.append(buf.getvalue())
    stored = [spool.store(r, meta_of(r)) for r in raws]
    key = stored[0].series_key
    assert len({s.path for s in stored}) == 4 and not any(s.replaced for s in stored)
    assert spool.get_series(key).instance_count == 4
    assert sorted(p.read_bytes() for p in spool.instance_paths(key)) == sorted(raws)
    again = [spool.store(r, meta_of(r)) for r in raws]  # the PACS sends the series again
    assert [a.path for a in again] == [s.path for s in stored] and all(a.replaced for a in again)
    assert spool.get_series(key).instance_count == 4
    # a crash before the index rows: recovery finds each file under its own key
    with spool._tx():
        spool._db.execute("DELETE FROM instances WHERE series_key=?", (key,))
    spool.recover()
    assert spool.get_series(key).instance_count == 4
    assert len(set(spool.instance_uids(key))) == 4
