"""Issue 16: the lobe U-Net's mechanics (inputs, per-lung reading, interpolation between
slices) and the bundled weights on a phantom whose lobes the generator drew."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ct_ai_node.models.networks import build
from ct_ai_node.pipeline.lobes import LobeSegmenter, LobeSettings, labels_from_probabilities, lobe_inputs, lung_height
from ct_ai_node.pipeline.types import LEFT_LUNG, LOBES, RIGHT_LUNG
from ct_ai_node.synthetic import generate_phantom

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
FEET_FIRST = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # slice normal towards -z: index 0 is the top


def test_height_within_the_lungs_follows_the_slice_normal():
    h = lung_height(10, np.arange(2, 8), AXIAL)
    assert h[2] == 0.0 and h[7] == 1.0 and h[0] == 0.0 and h[9] == 1.0 and h[4] == pytest.approx(0.4)
    flipped = lung_height(10, np.arange(2, 8), FEET_FIRST)
    assert flipped[2] == 1.0 and flipped[7] == 0.0
    assert np.all(lung_height(5, np.array([3]), AXIAL) == 0.5)


def test_inputs_have_the_lung_window_both_lung_masks_and_the_height():
    hu = np.full((3, 64, 64), -1000.0, np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, 10:50, 5:30] = RIGHT_LUNG
    labels[:, 10:50, 34:60] = LEFT_LUNG
    hu[labels > 0] = -850.0
    x = lobe_inputs(hu, labels, np.array([0, 2]), np.array([0.0, 0.5, 1.0], np.float32), LobeSettings(work_size=32))
    assert tuple(x.shape) == (2, 4, 32, 32)
    assert float(x[:, 0].max()) == pytest.approx(0.15, abs=1e-3)  # -850 HU in the [-1000, 0] window
    assert float(x[0, 1, 16, 8]) == 1.0 and float(x[0, 2, 16, 8]) == 0.0  # right lung on the image's left
    assert float(x[0, 2, 16, 24]) == 1.0
    assert torch.all(x[1, 3] == 1.0) and torch.all(x[0, 3] == 0.0)


def test_each_lung_voxel_takes_the_likeliest_lobe_of_either_side():
    """The lobe network judges the side: a voxel the lung segmentation put in the right lung
    takes a left lobe where the network is surer of it (a midline cut in the wrong place)."""
    prob = np.zeros((5, 4, 4), np.float32)
    prob[0] = 0.6  # right upper everywhere...
    prob[2, 2:] = 0.7  # ...right lower lower down
    prob[4, :, 2:] = 0.9  # left lower on the right half of the image
    lung = np.zeros((8, 8), np.uint8)
    lung[:, :5] = RIGHT_LUNG  # the lung segmentation's cut one column too far right
    lung[:, 5:] = LEFT_LUNG
    lung[0, 0] = 0
    out = labels_from_probabilities(prob, lung)
    assert out[0, 0] == 0 and np.all((out > 0) == (lung > 0))  # lobes exactly inside the lungs
    assert np.all(out[1:4, :4] == 1) and np.all(out[4:, :4] == 3)
    assert np.all(out[:, 4:] == 5)  # column 4 (right lung to the lung segmentation) too


def test_segmenter_labels_every_lung_voxel_and_only_those():
    ph = generate_phantom(1000, shape=(24, 64, 64))
    seg = LobeSegmenter(build("lobe_unet2d"), settings=LobeSettings(work_size=32, z_step_mm=2 * ph.spacing[0]))
    out = seg(ph.hu.astype(np.float32), ph.spacing, AXIAL, ph.lung_labels)
    lung = ph.lung_labels > 0
    assert out.shape == ph.hu.shape and np.all((out > 0) == lung)
    assert set(np.unique(out[lung])) <= {1, 2, 3, 4, 5}
    assert set(seg.last_timings_s) == {"network", "labels"}


def test_bundled_lobe_weights_on_a_dev_phantom():
    """The bundled lobe U-Net on a phantom of the lobe dev set (seed 90301, 128 matrix): every
    lobe found, each on its own side; loose bounds (the figures are in docs/models.md)."""
    from ct_ai_node.pipeline.lobes import create_lobe_segmenter
    from ct_ai_node.training.train_lobes import _dice_per_lobe

    ph = generate_phantom(90301, shape=(0, 128, 128))
    out = create_lobe_segmenter("cpu")(ph.hu.astype(np.float32), ph.spacing, AXIAL, ph.lung_labels)
    dice = _dice_per_lobe(out, ph.lobe_labels)
    assert min(dice.values()) > 0.6, dice
    right = ph.lung_labels == RIGHT_LUNG
    assert np.isin(out[right], (1, 2, 3)).mean() > 0.97 and np.isin(out[~right & (out > 0)], (4, 5)).mean() > 0.97


def test_phantom_lobes_split_the_lungs_by_side():
    ph = generate_phantom(1001, shape=(0, 128, 128))
    assert ph.lobe_labels is not None and ph.lobe_labels.shape == ph.hu.shape
    assert np.all((ph.lobe_labels > 0) == (ph.lung_labels > 0))
    assert set(np.unique(ph.lobe_labels[ph.lung_labels == RIGHT_LUNG])) == {1, 2, 3}
    assert set(np.unique(ph.lobe_labels[ph.lung_labels == LEFT_LUNG])) == {4, 5}
    assert len(LOBES) == 5


def test_nearest_lobe_fills_a_predicted_mask_wider_than_the_true_lungs():
    from ct_ai_node.training.train_lobes import nearest_lobe_labels

    truth = np.zeros((2, 8, 12), np.uint8)
    truth[0, 2:6, 1:3], truth[0, 2:6, 3:5] = 1, 3  # right upper | right lower
    truth[0, 2:6, 7:11] = 4
    predicted = np.zeros_like(truth)
    predicted[0, 1:7, 0:5] = RIGHT_LUNG  # a pixel wider than the true right lung all round
    predicted[0, 2:6, 8:11] = LEFT_LUNG  # narrower than the true left lung
    predicted[1, 3, 3] = RIGHT_LUNG  # no true lobe on this slice: nothing to take
    out = nearest_lobe_labels(truth, predicted)
    assert np.array_equal(out[0] > 0, predicted[0] > 0) and not out[1].any()
    assert out[0, 1, 0] == 1 and out[0, 6, 4] == 3 and out[0, 3, 1] == 1  # outside: the nearest; inside: kept
    assert set(np.unique(out[0][predicted[0] == LEFT_LUNG])) == {4}


def test_lobe_training_slices_come_with_true_and_unet_lungs():
    from ct_ai_node.training.train_lobes import LobeTrainSettings, lobe_dataset

    settings = LobeTrainSettings(slices_per_case=4, shape=(24, 96, 96), workers=1,
                                 input=LobeSettings(work_size=32))
    data = lobe_dataset([1000], settings, log=lambda *a: None)
    assert data["x"].shape == (8, 4, 32, 32) and data["y"].shape == (8, 32, 32)  # 4 true-lung + 4 U-Net slices
    assert set(np.unique(data["y"])) <= set(range(6)) and data["y"].max() > 0
    only = lobe_dataset([1000], LobeTrainSettings(slices_per_case=4, shape=(24, 96, 96), workers=1,
                                                  input=LobeSettings(work_size=32), lung_masks="truth"))
    assert len(only["x"]) == 4 and np.array_equal(only["x"], data["x"][:4])
    with pytest.raises(ValueError, match="lung_masks"):
        lobe_dataset([1000], LobeTrainSettings(lung_masks="guess"))
