"""Calibrating a slice-ratio pipeline's case decision on validation cases."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ct_ai_node.models.weights import BUNDLED_WEIGHTS, load_model, read_manifest, rewrite_metadata, sha256_of
from ct_ai_node.training.calibrate import calibrate_pipeline
from ct_ai_node.training.train import fit_ratio_decision


def test_fit_ratio_decision_on_hand_made_ratios():
    decision, report = fit_ratio_decision(np.array([0.05, 0.2, 0.6, 0.7]), np.array([0, 0, 1, 1]))
    assert decision.ratio_threshold == pytest.approx(0.4)  # midway between 0.2 and 0.6
    assert report["youden_j"] == pytest.approx(1.0) and report["val_auc"] == pytest.approx(1.0)
    assert decision.probability(0.4) == pytest.approx(0.5) and decision.probability(0.7) > 0.9
    # overlapping classes: the threshold with the best sensitivity + specificity
    decision, report = fit_ratio_decision(np.array([0.1, 0.3, 0.25, 0.5, 0.6]), np.array([0, 0, 1, 1, 1]))
    assert 0.3 < decision.ratio_threshold < 0.5 and report["youden_j"] == pytest.approx(2 / 3)


def _copy_weights(tmp_path):
    dst = tmp_path / "w"
    dst.mkdir()
    for name in ("method_a_slice_classifier.safetensors", "lung_unet2d.safetensors", "manifest.json"):
        shutil.copy(BUNDLED_WEIGHTS / name, dst / name)
    manifest = {k: v for k, v in json.loads((dst / "manifest.json").read_text()).items()
                if (dst / k).is_file()}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_rewrite_metadata_keeps_tensors_and_updates_the_hash(tmp_path):
    w = _copy_weights(tmp_path)
    path = w / "method_a_slice_classifier.safetensors"
    before = load_model("method_a_slice_classifier", w)
    sha = rewrite_metadata(path, {"case_decision": json.dumps({"slice_threshold": 0.5, "ratio_threshold": 0.3,
                                                               "slope": 12.0}), "note": "x"})
    assert sha == sha256_of(path) == read_manifest(w)[path.name]
    after = load_model("method_a_slice_classifier", w)  # the hash check passes
    assert json.loads(after.metadata["case_decision"])["ratio_threshold"] == 0.3 and after.metadata["note"] == "x"
    assert after.metadata["architecture"] == before.metadata["architecture"]
    for k, v in before.module.state_dict().items():
        assert torch.equal(v, after.module.state_dict()[k])


def test_calibrate_pipeline_on_small_validation_phantoms(tmp_path):
    w = _copy_weights(tmp_path)
    report = calibrate_pipeline("radlogics", torch.device("cpu"), cases=3, weights_dir=w, out_dir=tmp_path / "out",
                                shape=(48, 128, 128), log=lambda m: None)
    with safe_open(str(w / "method_a_slice_classifier.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["case_decision"]) == report["decision"]
    assert json.loads(meta["case_decision_calibration"])["cases"] == "50000..50002"
    assert report["sha256"] == read_manifest(w)["method_a_slice_classifier.safetensors"]
    rows = json.loads((tmp_path / "out" / "compare_cases.json").read_text())["radlogics"]
    assert [r["seed"] for r in rows] == [50000, 50001, 50002]  # validation seeds, never the held-out ones
    with pytest.raises(ValueError, match="nothing to calibrate"):
        calibrate_pipeline("dual-sampling", torch.device("cpu"), cases=3, weights_dir=w, out_dir=tmp_path / "o2")


def test_calibrate_method_d_heat_level_on_small_validation_phantoms(tmp_path):
    """Method D's infection-mask heat level: computed from its own heat maps on the
    validation phantoms and written into a copy of its weight file."""
    dst = tmp_path / "w"
    dst.mkdir()
    name = "method_d_resnext_lstm.safetensors"
    shutil.copy(BUNDLED_WEIGHTS / name, dst / name)
    (dst / "manifest.json").write_text(json.dumps({name: read_manifest(BUNDLED_WEIGHTS)[name]}))
    before = load_model("method_d_resnext_lstm", dst)
    report = calibrate_pipeline("resnext-lstm", torch.device("cpu"), cases=3, weights_dir=dst,
                                out_dir=tmp_path / "out", log=lambda m: None)
    with safe_open(str(dst / name), "pt") as fh:
        meta = fh.metadata()
    cal = json.loads(meta["infection_threshold_calibration"])
    assert float(meta["infection_threshold"]) == report["infection_threshold"]
    dice = {float(k): v for k, v in cal["lesion_dice_by_threshold"].items()}
    assert report["infection_threshold"] == max(dice, key=dice.get) and dice[report["infection_threshold"]] > 0
    assert cal["cases"] == "the 1 COVID-19-like of 50000..50002" and cal["shape"] == [0, 256, 256]  # as trained
    assert report["sha256"] == read_manifest(dst)[name] != read_manifest(BUNDLED_WEIGHTS)[name]
    after = load_model("method_d_resnext_lstm", dst)
    for k, v in before.module.state_dict().items():
        assert torch.equal(v, after.module.state_dict()[k])
    with pytest.raises(ValueError, match="not supported"):
        calibrate_pipeline("resnext-lstm", torch.device("cpu"), site_cases=[], weights_dir=dst, out_dir=tmp_path)
