"""The pipeline registry, the ensemble's arithmetic, the summary metrics on a hand-made
evaluation with known answers, and the train/evaluate/pipelines command line."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import app
from ct_ai_node.errors import ModelError
from ct_ai_node.pipeline.ensemble import EnsembleMethod
from ct_ai_node.pipeline.methods import MethodOutput, available_pipelines
from ct_ai_node.pipeline.types import AlgorithmInfo
from ct_ai_node.training.compare import _CachedLungs, _CachedMethod, summary_table
from ct_ai_node.training.evaluate import summarise

runner = CliRunner()


class _Fixed:
    """A method with a fixed answer (the ensemble's arithmetic is what is tested)."""

    def __init__(self, name, probability, scores, heat_value, infection_threshold=None):
        self.name = name
        self.p, self.scores, self.heat_value, self.thr = probability, scores, heat_value, infection_threshold

    def __call__(self, hu, spacing, orientation, lung_labels):
        heat = np.where(lung_labels > 0, self.heat_value, 0.0).astype(np.float32)
        return MethodOutput(probability=self.p, threshold=0.5, slice_scores=np.asarray(self.scores, np.float32),
                            positive_slices=np.flatnonzero(np.asarray(self.scores) >= 0.5),
                            positive_slice_ratio=0.0, heatmap=heat, algorithm=AlgorithmInfo("x", "1"),
                            model_versions={self.name: "1"}, infection_threshold=self.thr)


def test_ensemble_means_probability_scores_and_heat():
    lung = np.zeros((4, 8, 8), np.uint8)
    lung[:, 2:6, 2:6] = 1
    hu = np.zeros(lung.shape, np.float32)
    ens = EnsembleMethod({"a": _Fixed("a", 0.9, [0.9, 0.8, 0.2, 0.0], 1.0, 0.2),
                          "b": _Fixed("b", 0.3, [0.5, 0.0, 0.2, 0.0], 0.5, None)})
    out = ens(hu, (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0), lung)
    assert out.probability == pytest.approx(0.6)
    np.testing.assert_allclose(out.slice_scores, [0.7, 0.4, 0.2, 0.0], atol=1e-6)
    assert list(out.positive_slices) == [0]
    assert out.positive_slice_ratio == pytest.approx(0.25)
    assert out.heatmap.max() == pytest.approx(0.75) and out.heatmap[lung == 0].max() == 0
    assert out.infection_threshold == pytest.approx(0.2)
    assert set(out.model_versions) == {"a", "b"}


def test_ensemble_needs_two_members():
    with pytest.raises(ModelError, match="at least two"):
        EnsembleMethod({"a": _Fixed("a", 0.5, [0.5], 0.5)})


def test_summary_metrics_on_a_hand_made_evaluation():
    def row(label, p, lesion_true, lesion_pred, hits, n):
        return {"label": label, "probability": p, "predicted": int(p >= 0.5), "kind": "covid" if label else "normal",
                "lung_dice": 0.9, "lung_lr_dice": 0.8, "lung_ml_true": 1000.0, "lung_ml_pred": 1100.0,
                "lesion_ml_true": lesion_true, "lesion_ml_pred": lesion_pred,
                "lesion_dice": 0.5 if lesion_true else None, "pointing_hits": hits, "pointing_slices": n,
                "heat_in_lesion": 0.25 if n else None, "seconds": 2.0}
    rows = [row(1, 0.9, 100.0, 80.0, 3, 4), row(1, 0.4, 50.0, 70.0, 1, 4), row(0, 0.2, 0.0, 0.0, 0, 0),
            row(0, 0.6, 0.0, 5.0, 0, 0)]
    # slices pooled over the cases: positives 0.8, 0.3; negatives 0.1, 0.5, 0.2 -> 5 of 6 pairs
    for r, (lab, sc) in zip(rows, [([1, 0], [0.8, 0.1]), ([1], [0.3]), ([0], [0.5]), ([0], [0.2])]):
        r["slice_labels"], r["slice_scores"] = lab, sc
    s = summarise(rows)
    assert s["slice_auc"] == pytest.approx(5 / 6)
    assert (s["slices_positive"], s["slices_negative"]) == (2, 3)
    assert s["auc"] == pytest.approx(0.75)  # pairs (0.9>0.2, 0.9>0.6, 0.4>0.2, 0.4<0.6): 3 of 4
    assert s["sensitivity"] == pytest.approx(0.5) and s["specificity"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(0.5)
    assert s["lung_volume_error_pct_mean"] == pytest.approx(10.0)
    assert s["lesion_volume_abs_error_ml_mean_covid"] == pytest.approx(20.0)
    assert s["pointing_game"] == pytest.approx(0.5)


def test_cached_lungs_segment_each_phantom_once():
    calls = []

    def seg(hu, spacing, orientation):
        calls.append(1)
        return (hu > 0).astype(np.uint8)

    cached = _CachedLungs(seg)
    a = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    cached(a, (1, 1, 1), None)
    cached(a.copy(), (1, 1, 1), None)  # a fresh copy of the same phantom
    assert len(calls) == 1
    cached(a + 1, (1, 1, 1), None)
    assert len(calls) == 2


def test_ensemble_leaves_out_a_member_without_weights_but_refuses_a_damaged_one(tmp_path):
    """A pipeline whose weights are absent is not a member; one whose weight file fails its
    SHA-256 check stops the ensemble with the file's name, never passes silently."""
    import shutil

    from ct_ai_node.models.weights import BUNDLED_WEIGHTS
    from ct_ai_node.pipeline.methods import create_method

    folder = tmp_path / "weights"
    shutil.copytree(BUNDLED_WEIGHTS, folder)
    (folder / "method_b_attention.safetensors").unlink()
    members = create_method("ensemble", "cpu", folder).members
    assert "ctnet" not in members and {"radlogics", "resnext-lstm"} <= set(members)

    damaged = folder / "method_d_resnext_lstm.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="method_d_resnext_lstm.safetensors: SHA-256"):
        create_method("ensemble", "cpu", folder)


def test_compared_ensemble_reuses_its_members_outputs():
    """In a side-by-side evaluation each member runs once per phantom: its own row and
    the ensemble get the same kept output."""
    calls = {"a": 0, "b": 0}

    class _Counting(_Fixed):
        def __call__(self, *args):
            calls[self.name] += 1
            return super().__call__(*args)

    lung = np.zeros((4, 8, 8), np.uint8)
    lung[:, 2:6, 2:6] = 1
    hu = np.random.default_rng(1).normal(size=lung.shape).astype(np.float32)
    members = {"a": _CachedMethod(_Counting("a", 0.9, [0.9] * 4, 1.0)),
               "b": _CachedMethod(_Counting("b", 0.1, [0.1] * 4, 0.0))}
    ens = EnsembleMethod(members)
    own = [m(hu.copy(), (1, 1, 1), None, lung) for m in members.values()]
    out = ens(hu.copy(), (1, 1, 1), None, lung)
    assert calls == {"a": 1, "b": 1}
    assert out.probability == pytest.approx(0.5) and own[0].probability == 0.9
    ens(hu + 1, (1, 1, 1), None, lung)  # the next phantom: each member runs again, once
    assert calls == {"a": 2, "b": 2}


def test_summary_table_side_by_side():
    base = {"cases": 3, "covid": 1, "other": 2, "auc": 1.0, "sensitivity": 1.0, "specificity": 0.5, "f1": 0.667,
            "accuracy": 0.6667, "lung_dice_mean": 0.95, "lung_volume_error_pct_mean": 5.0,
            "lesion_dice_mean_covid": 0.5, "lesion_volume_abs_error_ml_mean_covid": 12.34, "pointing_game": None,
            "heat_in_lesion_mean": float("nan"), "seconds_per_case_mean": 3.0, "seeds": "90000..90002",
            "lungs": "unet", "device": "cpu"}
    table = summary_table({"a": base, "b": {**base, "auc": 0.5}}, {"a": 10.0})
    lines = table.splitlines()
    assert lines[0] == "| metric | `a` | `b` |"
    assert "| cases (COVID-19-like / other) | 3 (1 / 2) | 3 (1 / 2) |" in lines
    assert "| AUC (COVID-19-like vs other) | 1.000 | 0.500 |" in lines
    assert any(line.startswith("| pointing game") and line.endswith("| - | - |") for line in lines)
    assert any(line.startswith("| share of the heat") and line.endswith("| - | - |") for line in lines)  # NaN
    assert "| CPU seconds per 300-slice scan (method only) | 10.0 | - |" in lines
    assert "seeds 90000..90002" in table


def test_registry_lists_every_method_and_the_ensemble():
    names = {spec.name for spec in available_pipelines()}
    assert {"radlogics", "ctnet", "dual-sampling", "resnext-lstm", "ensemble"} <= names
    radlogics = next(s for s in available_pipelines() if s.name == "radlogics")
    assert radlogics.missing_weights() == []  # bundled


def test_cli_pipelines_and_train_reject_unknown_method(tmp_path):
    res = runner.invoke(app, ["pipelines"])
    assert res.exit_code == 0 and "radlogics (default)" in res.output
    res = runner.invoke(app, ["train", "no-such-method", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "unknown METHOD" in res.output
    assert not any(tmp_path.iterdir())


def test_method_without_weights_is_a_one_line_model_error(tmp_path):
    from ct_ai_node.pipeline.methods import create_method

    for name in ("ctnet", "dual-sampling", "resnext-lstm"):
        with pytest.raises(ModelError) as err:
            create_method(name, "cpu", tmp_path)
        assert "\n" not in str(err.value)
