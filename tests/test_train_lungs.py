"""``ct-ai-node train lungs``: the lung U-Net alone, fine-tuned from the shipped one on
phantoms (and real backgrounds where given); the weights it writes load through the
node's checked loader, and the report says before/after on validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ct_ai_node.cli import app
from ct_ai_node.models.weights import load_model
from ct_ai_node.training.train_lungs import LungTrainSettings, lung_metrics


def test_lung_metrics_counts_lesion_inside_the_lungs():
    data = {"case": np.array([50001, 50001]), "lung_y": np.zeros((2, 4, 4), bool),
            "lung_lesion": np.zeros((2, 4, 4), bool)}
    data["lung_y"][:, :2] = True
    data["lung_lesion"][0, 0, :2] = True  # 2 lesion pixels, one predicted lung
    pred = np.zeros((2, 4, 4), bool)
    pred[0, 0, 0] = True
    m = lung_metrics(pred, data, [50001])  # 50001: a COVID-19-like validation phantom
    assert m["phantom covid lesion inside lungs"] == pytest.approx(0.5)
    assert m["phantom lung dice"] == pytest.approx(2 * 1 / (1 + 16))


def test_bad_init_names_the_field():
    with pytest.raises(ValueError, match="init"):
        LungTrainSettings(init="imagenet")


def test_cli_train_lungs_fine_tunes_and_writes_loadable_weights(tmp_path):
    res = CliRunner().invoke(app, ["train", "lungs", "--cases", "2", "--val-cases", "2", "--epochs", "1",
                                   "--shape", "24,96,96", "--workers", "1", "--out", str(tmp_path),
                                   "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "lung_unet_training.json").read_text())
    assert set(report["before_bundled"]) == set(report["after"])
    assert "phantom lung dice" in report["after"]
    loaded = load_model("lung_unet2d", tmp_path)
    assert loaded.metadata["trained_on"].startswith("synthetic chest-CT phantoms")
    assert report["train_cases"] == "1000..1001"
    assert len(list((tmp_path / "cache").glob("lungs-*.npz"))) == 1  # the prepared slices, for the next run


def test_masked_dice_ce_is_monai_dice_ce_where_known_and_ignores_the_rest():
    import torch
    from monai.losses import DiceCELoss

    from ct_ai_node.training.train import masked_dice_ce

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 12, 12, generator=g)
    target = (torch.rand(3, 1, 12, 12, generator=g) > 0.5).float()
    ones = torch.ones_like(target)
    assert masked_dice_ce(logits, target, ones).item() == pytest.approx(DiceCELoss(sigmoid=True)(logits, target).item(),
                                                                        rel=1e-5)
    known = ones.clone()
    known[:, :, :4] = 0
    flipped = target.clone()
    flipped[:, :, :4] = 1 - flipped[:, :, :4]  # a different target where it is not known
    assert masked_dice_ce(logits, flipped, known).item() == pytest.approx(masked_dice_ce(logits, target, known).item())
    assert masked_dice_ce(logits, flipped, ones).item() != pytest.approx(masked_dice_ce(logits, target, ones).item())


def test_a_real_backgrounds_dense_lung_target_is_not_trusted_unless_it_is_an_inserted_lesion():
    from ct_ai_node.training.data import uncertain_lung_target

    hu = np.full((1, 4, 4), -850.0)
    hu[0, 0] = 20.0  # dense: stomach, dome, tumour or vessel taken in by an earlier lung U-Net
    lung = np.ones((1, 4, 4), bool)
    lesion = np.zeros((1, 4, 4), bool)
    lesion[0, 0, :2] = True  # inserted consolidation: lung by construction
    ign = uncertain_lung_target(hu, lung, lesion)
    assert ign[0, 0, 2:].all() and not ign[0, 0, :2].any() and not ign[0, 1:].any()


def test_lung_metrics_leave_out_what_is_not_known():
    data = {"case": np.array([50001]), "lung_y": np.ones((1, 4, 4), bool), "lung_lesion": np.zeros((1, 4, 4), bool),
            "lung_ignore": np.zeros((1, 4, 4), bool)}
    data["lung_ignore"][0, 0] = True
    pred = np.ones((1, 4, 4), bool)
    pred[0, 0] = False  # wrong only where the target is not known
    assert lung_metrics(pred, data, [50001])["phantom lung dice"] == pytest.approx(1.0)
