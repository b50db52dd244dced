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


def test_each_lung_voxel_takes_a_lobe_of_its_own_side():
    prob = np.zeros((5, 4, 4), np.float32)
    prob[3] = 0.9  # the network likes "left upper" everywhere, also in the right lung
    prob[0] = 0.05
    prob[2, 2:] = 0.08  # right lower lower down
    prob[4, :, 2:] = 0.95  # left lower on the right half of the image
    lung = np.zeros((8, 8), np.uint8)
    lung[:, :4] = RIGHT_LUNG
    lung[:, 4:] = LEFT_LUNG
    lung[0, 0] = 0
    out = labels_from_probabilities(prob, lung)
    assert out[0, 0] == 0  # outside the lungs: no lobe
    assert set(np.unique(out[lung == RIGHT_LUNG])) == {1, 3} and np.all(out[:4, :4][lung[:4, :4] > 0] == 1)
    assert np.all(out[4:, :4] == 3)
    assert np.all(out[:, 4:] == 5)  # nearest work pixel of columns 4..7 is 2..3: left lower wins


def test_segmenter_labels_every_lung_voxel_and_only_those():
    ph = generate_phantom(1000, shape=(24, 64, 64))
    seg = LobeSegmenter(build("lobe_unet2d"), settings=LobeSettings(work_size=32, z_step_mm=2 * ph.spacing[0]))
    out = seg(ph.hu.astype(np.float32), ph.spacing, AXIAL, ph.lung_labels)
    lung = ph.lung_labels > 0
    assert out.shape == ph.hu.shape and np.all((out > 0) == lung)
    assert set(np.unique(out[ph.lung_labels == RIGHT_LUNG])) <= {1, 2, 3}
    assert set(np.unique(out[ph.lung_labels == LEFT_LUNG])) <= {4, 5}
    assert set(seg.last_timings_s) == {"network", "labels"}


def test_phantom_lobes_split_the_lungs_by_side():
    ph = generate_phantom(1001, shape=(0, 128, 128))
    assert ph.lobe_labels is not None and ph.lobe_labels.shape == ph.hu.shape
    assert np.all((ph.lobe_labels > 0) == (ph.lung_labels > 0))
    assert set(np.unique(ph.lobe_labels[ph.lung_labels == RIGHT_LUNG])) == {1, 2, 3}
    assert set(np.unique(ph.lobe_labels[ph.lung_labels == LEFT_LUNG])) == {4, 5}
    assert len(LOBES) == 5
