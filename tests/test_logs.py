"""Node processes keep patient data out of their logs above DEBUG, even when pydicom meets
invalid values (it would log and warn with the raw value)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SECRET = "19601301x"  # an invalid DA: pydicom names it when it reads the element


def _run(level: str) -> str:
    code = textwrap.dedent(f"""
        import io, logging
        from pydicom import dcmread
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian
        from ct_ai_node.logs import configure_logging

        configure_logging(logging.{level})
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PatientBirthDate = "{SECRET}"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
        back = dcmread(io.BytesIO(buf.getvalue()), force=True)
        str(back.PatientBirthDate)
        logging.getLogger("apscheduler.scheduler").info("Running job tick")
        logging.getLogger("ct_ai_node.x").info("node line")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_invalid_patient_values_stay_out_of_info_logs():
    out = _run("INFO")
    assert SECRET not in out
    assert "node line" in out and "Running job tick" not in out


def test_debug_logging_still_shows_them():
    assert SECRET in _run("DEBUG")
