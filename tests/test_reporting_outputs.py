"""Issue 16: ``ct-ai-node analyze`` gives the lobes, the CT severity score and the category
suggestion in result.json, consistent with each other and with the volumes, and the score in
the heat-map caption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import app
from ct_ai_node.pipeline.severity import lobe_severity
from ct_ai_node.pipeline.types import LOBES

SAMPLE = Path(__file__).resolve().parents[1] / "sample_series" / "covid_like"


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("reporting") / "out"
    res = CliRunner().invoke(app, ["analyze", str(SAMPLE), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "result.json").read_text())


def test_lobes_add_up_and_grade_as_published(doc):
    assert doc["model_versions"]["lobes"].startswith("lobe_unet2d/")
    lobes = doc["lobes"]
    assert [lobe["name"] for lobe in lobes] == list(LOBES)
    # every lung voxel is in one lobe: the lobes add up to the lungs
    assert sum(lobe["volume_ml"] for lobe in lobes) == pytest.approx(doc["lung_volume_ml"], rel=0.002, abs=0.5)
    assert sum(lobe["ggo_ml"] + lobe["consolidation_ml"] for lobe in lobes) == pytest.approx(
        doc["lesion_volume_ml"], rel=0.01, abs=0.1)
    for lobe in lobes:
        assert lobe["volume_ml"] > 0, lobe["name"]  # a chest CT has all five
        assert lobe["severity"] == lobe_severity(lobe["involvement_percent"], lobe["ggo_ml"] + lobe["consolidation_ml"])
    assert doc["ct_severity_score"] == sum(lobe["severity"] for lobe in lobes)
    assert 0 < doc["ct_severity_score"] <= 25  # the sample has bilateral opacities


def test_category_suggestion_names_its_features(doc):
    cat = doc["category_suggestion"]
    assert 1 <= cat["co_rads"] <= 5 and cat["rsna"] in ("typical", "indeterminate", "atypical", "negative")
    assert cat["features"] and any("three-class result" in f for f in cat["features"])
    assert cat["co_rads"] >= 3  # the sample: bilateral ground glass, three-class result COVID-19-like
