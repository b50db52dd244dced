"""Every pipeline whose weights are present runs through `analyze` and writes valid
DICOM (dciodvfy: no "Error" line) whose heat maps come from that method: the SEG's
algorithm identification and the SC's derivation name the method."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import app
from ct_ai_node.pipeline.methods import available_pipelines

SAMPLE = Path(__file__).resolve().parents[1] / "sample_series" / "covid_like"
PIPELINES = available_pipelines()


def _errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Error" in ln]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed: run `make test`")
@pytest.mark.parametrize("spec", PIPELINES, ids=[s.name for s in PIPELINES])
def test_pipeline_through_analyze(spec, tmp_path):
    if spec.name == "ensemble":
        members = [s for s in available_pipelines() if s.name != "ensemble" and not s.missing_weights()]
        if len(members) < 2:
            pytest.skip("the ensemble needs two pipelines with weights; only "
                        f"{', '.join(s.name for s in members) or 'none'} have them")
    elif spec.missing_weights():
        pytest.skip(f"{spec.name}: no trained weights yet ({', '.join(spec.missing_weights())})")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["analyze", str(SAMPLE), "--out", str(out), "--pipeline", spec.name])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "result.json").read_text())
    assert doc["pipeline"] == spec.name
    from ct_ai_node.pipeline.methods import create_method

    expected = create_method(spec.name, "cpu").algorithm.name  # e.g. "ct-ai-node method B (...)"
    heatmaps = sorted(out.glob("heatmap_*.dcm"))
    assert heatmaps
    sc = pydicom.dcmread(heatmaps[0], stop_before_pixels=True)
    assert expected in str(sc.DerivationDescription)
    seg = pydicom.dcmread(out / "seg.dcm", stop_before_pixels=True)
    names = {str(item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName) for item in seg.SegmentSequence}
    from ct_ai_node.writers.common import lo  # LO: 64 characters at most, the writer marks a cut

    assert names == {lo(expected)}, names
    for path in [out / "seg.dcm", out / "sr.dcm", heatmaps[0]]:
        assert not _errors(path), (path.name, _errors(path)[:5])
