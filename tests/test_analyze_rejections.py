"""`ct-ai-node analyze` on bad input: one-line reason, non-zero exit, result.json with
status "rejected", no traceback, and the input left as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import EXIT_REJECTED, app
from helpers_dicom import write_ct_series

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _empty(d: Path) -> str:
    return "no files"


def _non_dicom(d: Path) -> str:
    (d / "notes.txt").write_text("not an image\n")
    (d / "blob.bin").write_bytes(os.urandom(4096))
    return "no DICOM files among 2 files"


def _non_ct(d: Path) -> str:
    write_ct_series(d, n=24, modality="MR", sop_class=MR_IMAGE_STORAGE)
    return "no CT"


def _single_slice(d: Path) -> str:
    write_ct_series(d, n=1)
    return "single slice"


def _missing_slices(d: Path) -> str:
    written = write_ct_series(d, n=30, shuffle_names=False)
    by_pos = sorted(written.paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    by_pos[14].unlink()
    return "missing slices"


def _two_series_mixed(d: Path) -> str:
    # two reconstructions filed under one SeriesInstanceUID: pixel spacing differs. (Two
    # matrices, e.g. 64x64 and 48x48, are no longer refused: the loader takes the
    # largest stack, issue 11.)
    write_ct_series(d / "a", n=24, series_uid="1.2.826.0.1.3680043.8.498.77")
    write_ct_series(d / "b", n=24, spacing=(2.5, 0.8, 0.8), series_uid="1.2.826.0.1.3680043.8.498.77")
    return "mixed pixel spacing"


def _corrupt_pixels(d: Path) -> str:
    written = write_ct_series(d, n=24)
    ds = pydicom.dcmread(written.paths[9])
    ds.PixelData = ds.PixelData[: 64 * 64]
    ds.save_as(written.paths[9])
    return "corrupt pixel data"


def _truncated(d: Path) -> str:
    written = write_ct_series(d, n=24)
    data = written.paths[5].read_bytes()
    written.paths[5].write_bytes(data[: len(data) // 2])
    return "truncated"


CASES = {
    "empty folder": _empty,
    "non-DICOM files": _non_dicom,
    "non-CT": _non_ct,
    "single slice": _single_slice,
    "missing slices": _missing_slices,
    "two series mixed": _two_series_mixed,
    "corrupt pixel data": _corrupt_pixels,
    "truncated file": _truncated,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_with_one_line(case, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    expected = CASES[case](src)
    before = _digest(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(src), "--out", str(out)])
    assert res.exit_code == EXIT_REJECTED, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rejected: "), res.output
    assert expected.lower() in lines[0].lower()
    assert "Traceback" not in res.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["status"] == "rejected"
    assert doc["reason"] == lines[0].removeprefix("rejected: ")
    assert "\n" not in doc["reason"]
    assert not list(out.glob("*.dcm"))
    assert _digest(src) == before, "the input must be left untouched"


def test_rejection_through_the_console_script(tmp_path):
    """The installed entry point, as an admin runs it: exit code and stderr only."""
    src = tmp_path / "in"
    src.mkdir()
    _truncated(src)
    exe = Path(sys.executable).with_name("ct-ai-node")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "ct_ai_node"]
    res = subprocess.run([*cmd, "analyze", str(src), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == EXIT_REJECTED
    assert res.stdout == ""
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and "truncated" in err_lines[0], res.stderr
    assert json.loads((tmp_path / "out" / "result.json").read_text())["status"] == "rejected"
