"""Infection segmentation: the 2.5D U-Net, its weight file, the segmenter end to end
(random weights) and one epoch of training on tiny phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ct_ai_node.errors import ModelError
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import load_model, read_manifest, save_model, sha256_of
from ct_ai_node.pipeline.geometry import dilate_slices
from ct_ai_node.pipeline.infection import (
    ARCHITECTURE,
    WEIGHTS_NAME,
    InfectionSegmenter,
    InfectionSettings,
    create_infection_segmenter,
    plane_positions,
    plane_stack,
    prepare_planes,
    z_resample_weights,
)
from ct_ai_node.synthetic import generate_phantom
from ct_ai_node.training.train_infection import (
    InfectionTrainSettings,
    load_cases,
    save_infection_unet,
    train_infection_unet,
)

TINY_SHAPE = (24, 96, 96)
#: coarse input preparation keeps the tests fast (the code paths are the same)
COARSE = InfectionSettings(pixel_mm=4.0, z_step_mm=8.0)


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(1000, "covid", shape=TINY_SHAPE)


def _random_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(ARCHITECTURE).eval()


def test_forward_backward_tiny():
    torch.manual_seed(0)
    net = build(ARCHITECTURE)
    x = torch.rand(2, 3, 32, 48)
    out = net(x)
    assert out.shape == (2, 1, 32, 48)
    out.float().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    assert 500_000 < sum(p.numel() for p in net.parameters()) < 1_200_000


def test_same_input_same_output_in_eval_mode():
    net = _random_net()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


def test_plane_stack_neighbours_as_channels():
    x = torch.arange(4, dtype=torch.float32)[:, None, None].expand(4, 2, 2)
    s = plane_stack(x, np.array([0, 2, 3]))
    assert s.shape == (3, 3, 2, 2)
    assert s[:, :, 0, 0].tolist() == [[0, 0, 1], [1, 2, 3], [2, 3, 3]]  # end planes repeat


def test_z_resampling_weights():
    # thin slices (1 mm) to 2.5 mm planes: slab averages of 2.5 slices
    idx, w = z_resample_weights(np.array([10.0]), 40, 1.0, 2.5)
    weights = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert np.isclose(sum(weights.values()), 1.0)
    assert np.isclose(weights[10], 0.4) and np.isclose(weights[9], 0.3) and np.isclose(weights[11], 0.3)
    # thick slices (5 mm): linear interpolation between neighbours
    idx, w = z_resample_weights(np.array([3.5, 4.0]), 8, 5.0, 2.5)
    assert {i: round(v, 6) for i, v in zip(idx[0], w[0]) if v > 0} == {3: 0.5, 4: 0.5}
    assert {i: round(v, 6) for i, v in zip(idx[1], w[1]) if v > 0} == {4: 1.0}
    # plane positions about 2.5 mm apart, covering the lungs' z range
    pos = plane_positions(5, 105, 1.0, 2.5)
    assert pos[0] == 5 and pos[-1] == 105 and np.allclose(np.diff(pos), 2.5)


def test_prepare_planes_geometry(phantom):
    s = InfectionSettings()
    planes = prepare_planes(phantom.hu, phantom.spacing, phantom.lung_labels, s, lesion=phantom.lesion_mask)
    k, H, W = planes.x.shape
    assert H % 16 == 0 and W % 16 == 0 and max(planes.work_hw) <= s.max_size
    assert abs(planes.step_mm - 2.5) < 0.2 and planes.pixel_mm >= s.pixel_mm
    assert planes.x.dtype == np.float32 and planes.x.min() >= 0 and planes.x.max() <= 1
    assert not planes.x[~planes.inside].any()  # air outside the dilated lungs
    # lesion volume is kept by the resampling (within 25 % on this coarse phantom)
    true_ml = phantom.lesion_mask.sum() * np.prod(phantom.spacing) / 1000
    assert abs(planes.lesion.sum() * planes.voxel_ml - true_ml) < 0.25 * true_ml
    assert prepare_planes(phantom.hu, phantom.spacing, np.zeros_like(phantom.lung_labels), s) is None


def _save_random_weights(folder, threshold: float = 0.5, settings: InfectionSettings = COARSE) -> str:
    net = _random_net()
    return save_infection_unet(net, folder, {"threshold": threshold, "val_dice": None}, settings)


def test_save_load_roundtrip_hash_and_missing_weights(tmp_path):
    with pytest.raises(ModelError, match="not found") as err:
        create_infection_segmenter("cpu", tmp_path)
    assert "\n" not in str(err.value)
    digest = _save_random_weights(tmp_path, threshold=0.35)
    path = tmp_path / f"{WEIGHTS_NAME}.safetensors"
    assert read_manifest(tmp_path)[path.name] == digest == sha256_of(path)
    assert path.stat().st_size < 2_000_000  # fp16
    loaded = load_model(WEIGHTS_NAME, tmp_path)
    assert loaded.metadata["architecture"] == ARCHITECTURE
    seg = create_infection_segmenter("cpu", tmp_path)
    assert seg.threshold == 0.35 and seg.settings == COARSE and seg.version.startswith("0.1.0+")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = _random_net().half().float()(x)  # weights are stored in fp16
        assert torch.allclose(seg.model(x), ref, atol=1e-3)
    # a tampered file is refused before use
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match the manifest"):
        create_infection_segmenter("cpu", tmp_path)


def test_other_architecture_under_the_name_is_refused(tmp_path):
    torch.manual_seed(0)
    save_model(build("lung_unet2d", channels=(4, 8)), tmp_path / f"{WEIGHTS_NAME}.safetensors",
               architecture="lung_unet2d", arch_kwargs={"channels": [4, 8]}, version="0")
    with pytest.raises(ModelError, match="not 'infection_unet'"):
        create_infection_segmenter("cpu", tmp_path)


def test_segmenter_end_to_end_random_weights(tmp_path, phantom):
    _save_random_weights(tmp_path, settings=InfectionSettings())  # the default preparation, once
    seg = create_infection_segmenter("cpu", tmp_path)
    hu, lab = phantom.hu, phantom.lung_labels
    lung = lab > 0
    mask, prob = seg(hu, phantom.spacing, lab)
    assert mask.shape == prob.shape == hu.shape
    assert mask.dtype == bool and prob.dtype == np.float32
    assert np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0
    assert not (mask & ~lung).any()  # the mask lies inside the lungs
    # the probability is zero away from the (dilated) lungs
    reach = int(np.ceil((seg.settings.mask_dilation_mm + 2 * 1.5 * 2) / phantom.spacing[1]))  # + bilinear reach
    near = dilate_slices(lung, reach)
    assert not prob[~near].any()
    assert prob[lung].max() > 0
    assert {"prepare", "network", "to_source", "total", "planes"} <= set(seg.last_timings_s)
    lung_z_mm = np.ptp(np.flatnonzero(lung.any(axis=(1, 2)))) * phantom.spacing[0]
    assert abs(seg.last_timings_s["planes"] - (lung_z_mm / 2.5 + 1)) <= 1  # planes about 2.5 mm apart
    seg.settings = COARSE
    # same input, same output
    mask, prob = seg(hu, phantom.spacing, lab)
    mask2, prob2 = seg(hu, phantom.spacing, lab)
    assert np.array_equal(mask, mask2) and np.array_equal(prob, prob2)
    near = dilate_slices(lung, int(np.ceil((COARSE.mask_dilation_mm + 2 * COARSE.pixel_mm * 2) / phantom.spacing[1])))
    assert not (mask & ~lung).any() and not prob[~near].any()
    # with every voxel above the threshold the mask is exactly the lungs
    seg.threshold = 0.0
    everything, _ = seg(hu, phantom.spacing, lab)
    assert np.array_equal(everything, lung)
    # no lungs: empty outputs
    m0, p0 = seg(hu, phantom.spacing, np.zeros_like(lab))
    assert not m0.any() and not p0.any() and p0.shape == hu.shape


def test_segmenter_accepts_float_hu_and_thick_slices():
    seg = InfectionSegmenter(_random_net(), settings=InfectionSettings(pixel_mm=4.0))
    ph = generate_phantom(1002, "cap", shape=(12, 64, 64))
    assert ph.spacing[0] > 5  # thick slices: planes are interpolated between them
    mask, prob = seg(ph.hu.astype(np.float32), ph.spacing, ph.lung_labels)
    assert mask.shape == ph.hu.shape and prob.dtype == np.float32
    assert not (mask & (ph.lung_labels == 0)).any()


def test_training_refuses_test_seeds():
    with pytest.raises(ValueError, match="held-out"):
        train_infection_unet([1000, 90000], [50000], InfectionTrainSettings(workers=1), "cpu", progress=False)


def test_train_one_epoch_on_tiny_phantoms(tmp_path, monkeypatch):
    # a narrower U-Net than the default keeps this fast; the recipe is the same
    settings = InfectionTrainSettings(shape=TINY_SHAPE, epochs=1, batch_size=8, crop=32, workers=1,
                                      cache_dir=str(tmp_path / "cache"), input=COARSE, channels=(8, 16, 32, 64, 128),
                                      num_res_units=1)
    model, metrics = train_infection_unet([1000, 1001, 1002, 1003], [50001], settings, "cpu", progress=False)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert metrics["train_cases"] == 4 and metrics["val_cases"] == 1
    assert metrics["steps"] == metrics["train_planes"] // 8  # one epoch: every plane about once
    assert len(metrics["loss_by_epoch"]) == 1 and np.isfinite(metrics["loss_by_epoch"][0])
    assert 0.0 <= metrics["val_dice"] <= 1.0 and metrics["threshold"] in settings.val_thresholds
    assert metrics["train_planes_with_lesion"] > 0
    json.dumps(metrics)  # serialisable for a training report
    # prepared phantoms are cached: a second pass does not generate them again
    assert len(list((tmp_path / "cache").glob("infection-*.npz"))) == 5
    import ct_ai_node.synthetic as synthetic

    def _no_generation(*args, **kwargs):
        raise AssertionError("phantom generated although cached")

    monkeypatch.setattr(synthetic, "generate_phantom", _no_generation)
    (case,) = load_cases([1000], settings)
    assert case["x"].dtype == np.uint8 and case["lesion"].shape == case["x"].shape and case["lesion"].any()
    # the trained model saves and loads as the segmenter, with its calibrated threshold
    save_infection_unet(model, tmp_path / "w", metrics)
    seg = create_infection_segmenter("cpu", tmp_path / "w")
    assert seg.threshold == metrics["threshold"] and seg.settings == settings.input
    assert sum(p.numel() for p in seg.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_hard_negatives_are_wide_dense_lung_tissue_away_from_lesions():
    from ct_ai_node.training.train_infection import hard_negative_pixels

    window = (-1000.0, 200.0)
    hu = np.full((1, 64, 64), -850.0)
    lung = np.zeros((1, 64, 64), bool)
    lung[0, 8:56, 8:56] = True
    hu[0, 20:30, 20:30] = 30.0  # a mass, 15 mm across at 1.5 mm pixels
    hu[0, 40:56, 45] = 40.0  # a vessel one pixel wide
    hu[0, 40:48, 20:28] = -550.0  # ground glass: the lesion
    lesion = np.zeros_like(lung)
    lesion[0, 40:48, 20:28] = True
    hu[~lung] = 50.0  # chest wall outside the lungs
    x = np.round((np.clip(hu, *window) - window[0]) / (window[1] - window[0]) * 255).astype(np.uint8)
    hard = hard_negative_pixels(x, lung, lesion, window, pixel_mm=1.5)
    assert hard[0, 25, 25] and hard[0, 21, 21]  # the mass
    assert not hard[0, 48:56, 45].any()  # a thin vessel is not "dense" over 7.5 mm
    assert not hard[0, 8:10, 8:56].any()  # the chest wall next to the lungs' edge does not count
    assert not (hard & lesion).any() and not hard[0, 38:50, 18:30].any()  # lesions and their rim stay out
    assert not (hard & ~lung).any()
    # the same in float input on [0, 1]
    assert np.array_equal(hard_negative_pixels(x / 255.0, lung, lesion, window, pixel_mm=1.5), hard)


def test_hard_negative_crops_are_centred_on_dense_tissue():
    from ct_ai_node.training.train_infection import _batch, _compact

    x = np.zeros((3, 128, 128), np.uint8)
    x[1, 100:104, 100:104] = 255  # the only dense tissue, marked as a hard negative
    lesion = np.zeros((3, 128, 128), bool)
    hard = x > 0
    case = _compact({"x": x, "lesion": lesion, "inside": np.ones_like(lesion), "kind": np.array("normal"),
                     "seed": np.int64(1)}, hard)
    table = np.array([[0, 1]] * 16)
    rng = np.random.default_rng(0)

    def share_with_the_hard_pixels(slots) -> float:
        xb, yb, mb = _batch([case], table, np.arange(16), 32, rng, slots)
        assert not yb.any()  # a hard negative is not lesion
        assert set(mb.unique().tolist()) == {1.0}  # the "inside" flag only
        return (xb[:, 1] > 0.99).flatten(1).any(1).float().mean().item()

    assert share_with_the_hard_pixels(np.ones(16, bool)) == 1.0
    assert share_with_the_hard_pixels(np.zeros(16, bool)) < 0.5  # random crops of a 128 px plane


def test_crop_centres_drawn_by_focus_find_small_foci_as_often_as_large_ones():
    from ct_ai_node.training.train_infection import _pick_focus_pixel

    region = np.zeros((64, 64), bool)
    region[5:45, 5:45] = True  # a large focus: 1600 pixels
    region[55:57, 55:57] = True  # a small one: 4 pixels
    rng = np.random.default_rng(0)

    def small_share(by_focus: bool) -> float:
        return float(np.mean([_pick_focus_pixel(region, rng, by_focus)[0] >= 55 for _ in range(400)]))

    assert 0.4 < small_share(True) < 0.6
    assert small_share(False) < 0.05


def test_case_balanced_lesion_planes_reach_minimal_disease():
    from ct_ai_node.training.train_infection import draw_lesion_rows, lesion_rows_per_case

    # case 0: extensive disease (lesion on 100 planes), case 1: minimal (2 of 100), case 2: none
    table = np.array([(c, k) for c in range(3) for k in range(100)], dtype=np.int64)
    has_lesion = np.zeros(len(table), bool)
    has_lesion[:100] = True
    has_lesion[150:152] = True
    by_case = lesion_rows_per_case(table, has_lesion)
    assert [sorted(table[r, 0].tolist()) == [c] * len(r) for c, r in zip((0, 1), by_case)] == [True, True]
    assert [len(r) for r in by_case] == [100, 2]
    lesion_rows = np.flatnonzero(has_lesion)
    rng = np.random.default_rng(0)

    def minimal_share(case_balanced: float) -> float:
        rows = np.concatenate([draw_lesion_rows(lesion_rows, by_case, 16, case_balanced, rng) for _ in range(100)])
        assert has_lesion[rows].all()
        return float(np.mean(table[rows, 0] == 1))

    assert 0.4 < minimal_share(1.0) < 0.6  # each case half the time
    assert minimal_share(0.0) < 0.05  # by plane: 2 in 102
    assert 0.2 < minimal_share(0.5) < 0.33
