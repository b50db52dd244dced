"""Method C (dual-sampling attention network): network, attention loss, weights,
pre-processing geometry, the ensemble, the method end to end and one training epoch.
Everything on tiny inputs (a 32x48x64 grid, width 4) so the file stays fast on one thread."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ct_ai_node.errors import InputRejected, ModelError
from ct_ai_node.models.net_c import ARCHITECTURE, attention_loss, build_resnet34_3d_attention, soft_mask
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import load_model, read_manifest, save_model
from ct_ai_node.pipeline.method_c import (
    INPUT_SETTINGS_KEY,
    PIPELINE_NAME,
    WEIGHTS_NAME_SS,
    WEIGHTS_NAME_US,
    CInputSettings,
    MethodCSettings,
    combine,
    dilate_square,
    ensemble_weight,
    grid_to_volume_chunks,
    load_method_c,
    place_on_grid,
    prepare_input,
)
from ct_ai_node.pipeline.methods import PIPELINES, MethodOutput
from ct_ai_node.synthetic import generate_phantom
from ct_ai_node.training.train_c import (
    TrainCSettings,
    group_weights,
    size_groups,
    train_method_c,
    train_method_c_models,
)

TINY = CInputSettings(grid=(32, 48, 64), spacing_mm=(10.0, 7.0, 7.0))
GRID_X = (2, 1, 32, 48, 64)


def _save_random(folder, name, width=4, seed=0, inp=TINY):
    torch.manual_seed(seed)
    net = build_resnet34_3d_attention(width=width).eval()
    save_model(net, folder / f"{name}.safetensors", architecture=ARCHITECTURE, arch_kwargs={"width": width},
               version="0.0-test", extra={INPUT_SETTINGS_KEY: inp.to_json(), "trained_on": "synthetic (untrained)"})
    return net


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(50001, "covid", shape=(32, 96, 96))


# ---------------------------------------------------------------- network

def test_forward_backward_shapes_and_finite_grads():
    torch.manual_seed(0)
    net = build(ARCHITECTURE, width=4)
    x = torch.rand(GRID_X)
    f = net.features(x)
    assert f.shape == (2, 32, 2, 3, 4)  # 8 x width channels, 1/16 of the input (last stage stride 1)
    logits, a, t = net.attention(x)
    assert logits.shape == (2, 1) and a.shape == t.shape == (2, 1, 32, 48, 64)
    assert float(a.detach().min()) >= 0 and float(a.detach().max()) <= 1 + 1e-6
    m = torch.zeros_like(t)
    m[:, :, 10:20, 10:30, 10:40] = 1
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor([1.0, 0.0]))
    loss = loss + 0.5 * attention_loss(t, m).mean()
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(net.fc.weight.grad.abs().sum()) > 0
    assert float(net.backbone.conv1.weight.grad.abs().sum()) > 0


def test_attention_uses_the_fc_weight():
    net = build(ARCHITECTURE, width=4).eval()
    x = torch.rand(1, *GRID_X[1:])
    with torch.no_grad():
        f = net.features(x)
        logits, cam = net.head(f)
        ref = torch.relu((f * net.fc.weight.view(1, -1, 1, 1, 1)).sum(1, keepdim=True))
        assert torch.allclose(cam, ref, atol=1e-5)
        # CAM identity: the mean of the (un-ReLU-ed) class map plus the bias is the logit
        lin = (f * net.fc.weight.view(1, -1, 1, 1, 1)).sum(1).mean() + net.fc.bias
        assert torch.allclose(lin, logits[0], atol=1e-4)


def test_eval_is_deterministic():
    torch.manual_seed(1)
    net = build(ARCHITECTURE, width=4).eval()
    x = torch.rand(1, *GRID_X[1:])
    with torch.no_grad():
        a1 = net.attention(x)
        a2 = net.attention(x)
    for u, v in zip(a1, a2):
        assert torch.equal(u, v)


def test_soft_mask_and_attention_loss_values():
    a = torch.tensor([0.0, 0.4, 1.0])
    t = soft_mask(a)
    assert float(t[0]) < 1e-12 and abs(float(t[1]) - 0.5) < 1e-6 and float(t[2]) > 1 - 1e-12
    m = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    assert float(attention_loss(m.clone(), m)) == 0.0
    # T = 0 everywhere: sum M^2 / sum M = 1;  T = 1 everywhere: 2 / (4 + 2)
    assert float(attention_loss(torch.zeros_like(m), m)) == pytest.approx(1.0)
    assert float(attention_loss(torch.ones_like(m), m)) == pytest.approx(2 / 6)


# ---------------------------------------------------------------- weights

def test_save_load_roundtrip_and_tampered_file(tmp_path):
    net = _save_random(tmp_path, "c", width=4)
    loaded = load_model("c", tmp_path)
    assert loaded.metadata["architecture"] == ARCHITECTURE
    assert CInputSettings.from_json(loaded.metadata[INPUT_SETTINGS_KEY]) == TINY
    x = torch.rand(1, *GRID_X[1:])
    with torch.no_grad():
        a, b = loaded.module(x), loaded.module(x)
        ref = build_resnet34_3d_attention(width=4)
        ref.load_state_dict({k: v.half().to(v.dtype) for k, v in net.state_dict().items()})
        r = ref.eval()(x)
    assert torch.equal(a, b)
    assert torch.allclose(a, r, atol=1e-4)
    size = (tmp_path / "c.safetensors").stat().st_size
    n = sum(p.numel() for p in net.state_dict().values() if p.is_floating_point())
    assert size < 2 * n + 64_000  # fp16
    raw = bytearray((tmp_path / "c.safetensors").read_bytes())
    raw[-20] ^= 0xFF
    (tmp_path / "c.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_model("c", tmp_path)


def test_factory_without_weights_raises_model_error(tmp_path):
    spec = PIPELINES[PIPELINE_NAME]
    with pytest.raises(ModelError) as exc:
        spec.factory(torch.device("cpu"), tmp_path)
    msg = str(exc.value)
    assert "\n" not in msg and WEIGHTS_NAME_US in msg and WEIGHTS_NAME_SS in msg
    _save_random(tmp_path, WEIGHTS_NAME_US)
    with pytest.raises(ModelError, match=WEIGHTS_NAME_SS):
        spec.factory(torch.device("cpu"), tmp_path)


def test_models_with_different_input_settings_are_refused(tmp_path):
    _save_random(tmp_path, WEIGHTS_NAME_US)
    _save_random(tmp_path, WEIGHTS_NAME_SS, inp=replace(TINY, margin_mm=3.0))
    with pytest.raises(ModelError, match="different input settings"):
        load_method_c("cpu", tmp_path)


# ---------------------------------------------------------------- pre-processing geometry

def test_prepare_input_geometry_and_suppression():
    spacing = (2.0, 1.0, 1.0)
    hu = np.full((60, 200, 220), -1000, np.int16)
    lung = np.zeros(hu.shape, bool)
    lung[10:50, 40:160, 30:190] = True
    hu[~lung] = 40
    s = CInputSettings(grid=(32, 48, 64), spacing_mm=(4.0, 4.0, 4.0), margin_mm=8.0)
    p = place_on_grid(lung, spacing, s)
    assert p.box == ((6, 54), (32, 168), (22, 198)) and p.scale == 1.0
    assert p.size == (24, 34, 44)  # extent / grid spacing
    prep = prepare_input(hu, spacing, lung, s)
    assert prep.x.shape == s.grid and prep.x.dtype == np.float32
    assert 0 <= prep.x.min() and prep.x.max() <= 1
    # lung (-1000 HU) -> (350 / 1500); far outside the lungs -> 0 (suppressed)
    assert prep.x[16, 24, 32] == pytest.approx(350 / 1500, abs=1e-3)
    assert prep.x[0].max() == 0 and prep.x[:, :, 0].max() == 0
    assert prep.lung.sum() == pytest.approx(40 * 120 * 160 * 2.0 / 4**3, rel=0.1)  # lung volume / grid voxel
    # a constant map on the grid comes back as the constant over the lung box
    m = np.ones(s.grid, np.float32)
    for z0, z1, part in grid_to_volume_chunks(m, p, chunk=7):
        assert part.shape == (z1 - z0, 136, 176)
        np.testing.assert_allclose(part, 1.0, atol=1e-5)
    # lungs larger than the grid: one shrink factor in all axes, aspect kept
    big = place_on_grid(lung, (10.0, 3.0, 3.0), s)
    assert big.scale > 1 and all(n <= g for n, g in zip(big.size, s.grid))


def test_empty_lungs_are_rejected():
    with pytest.raises(InputRejected):
        place_on_grid(np.zeros((4, 8, 8), bool), (1.0, 1.0, 1.0), TINY)


def test_dilate_square_covers_disk():
    m = np.zeros((1, 21, 21), bool)
    m[0, 10, 10] = True
    d = dilate_square(m, 3)
    assert d.sum() == 49 and d[0, 7:14, 7:14].all()


# ---------------------------------------------------------------- ensemble and sampling

def test_ensemble_weight_and_combine():
    assert ensemble_weight(0.0) == 0.35 and ensemble_weight(0.0009) == 0.35
    assert ensemble_weight(0.001) == 0.96 and ensemble_weight(0.02) == 0.96 and ensemble_weight(0.03) == 0.96
    assert ensemble_weight(0.031) == 0.35
    lung = np.zeros((4, 10, 10), bool)
    lung[:, :, :5] = True  # 200 voxels
    t_us = np.zeros(lung.shape, np.float32)
    t_ss = np.zeros(lung.shape, np.float32)
    t_us[0, 0, :2] = 1.0
    t_ss[0, 0, :2] = 1.0  # 2 voxels: ratio 0.01 -> w 0.96
    p, t, ratio, w = combine(0.8, 0.4, t_us, t_ss, lung)
    assert ratio == pytest.approx(0.01) and w == 0.96 and p == pytest.approx(0.96 * 0.8 + 0.04 * 0.4)
    assert t.dtype == np.float32 and t.max() == pytest.approx(1.0)
    t_us[:] = 1.0  # mean attention 0.5 everywhere in the lung with t_ss 0 -> ratio 1
    p, _, ratio, w = combine(0.8, 0.4, t_us, np.zeros_like(t_ss), lung)
    assert ratio == 1.0 and w == 0.35 and p == pytest.approx(0.35 * 0.8 + 0.65 * 0.4)


def test_size_groups_and_weights():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    ratios = np.array([0.01, 0.2, 0.3, 0.0, 0.0, 0.0005, 0.05, 0.1])
    g = size_groups(labels, ratios)
    assert g.tolist() == [0, 1, 1, 2, 2, 2, 3, 3]
    assert group_weights(g).tolist() == [2.0, 1.0, 1.0, 1.5]
    assert group_weights(np.array([1, 1, 3])).tolist() == [1.0, 1.0, 1.0, 1.0]  # empty groups: weight 1


# ---------------------------------------------------------------- method end to end

def _check_output(out: MethodOutput, ph):
    z, y, x = ph.hu.shape
    lung = ph.lung_labels > 0
    assert 0.0 <= out.probability <= 1.0 and out.threshold == 0.5
    assert out.heatmap.shape == (z, y, x) and out.heatmap.dtype == np.float32
    assert out.heatmap.min() >= 0 and out.heatmap.max() <= 1
    assert out.heatmap.max() > 0
    r = int(round(4.0 / ph.spacing[1]))
    assert out.heatmap[~dilate_square(lung, r)].max(initial=0) == 0
    assert out.heatmap.max() <= out.probability + 1e-6  # heat = P x T_ens
    assert out.slice_scores.shape == (z,) and out.slice_scores.dtype == np.float32
    assert out.slice_scores.min() >= 0 and out.slice_scores.max() <= 1
    no_lung = ~lung.reshape(z, -1).any(axis=1)
    assert (out.slice_scores[no_lung] == 0).all()
    lung_z = np.flatnonzero(~no_lung)
    assert set(out.positive_slices.tolist()) <= set(lung_z.tolist())
    assert 0 <= out.positive_slice_ratio <= 1
    assert set(out.model_versions) == {WEIGHTS_NAME_US, WEIGHTS_NAME_SS}


def test_method_end_to_end_untrained(tmp_path, phantom):
    _save_random(tmp_path, WEIGHTS_NAME_US, seed=0)
    _save_random(tmp_path, WEIGHTS_NAME_SS, seed=1)
    method = PIPELINES[PIPELINE_NAME].factory(torch.device("cpu"), tmp_path)
    assert method.name == PIPELINE_NAME and method.input == TINY
    out = method(phantom.hu, phantom.spacing, (1, 0, 0, 0, 1, 0), phantom.lung_labels)
    _check_output(out, phantom)
    out2, details = method.run(phantom.hu, phantom.spacing, phantom.lung_labels)
    assert out2.probability == out.probability and np.array_equal(out2.heatmap, out.heatmap)
    w = details["w_uniform"]
    assert out.probability == pytest.approx(w * details["p_uniform"] + (1 - w) * details["p_size_balanced"])
    # without the probability scaling the heat map is the ensemble attention itself (max about 1)
    raw = load_method_c("cpu", tmp_path, MethodCSettings(scale_heatmap_by_probability=False))(
        phantom.hu, phantom.spacing, (1, 0, 0, 0, 1, 0), phantom.lung_labels)
    assert raw.heatmap.max() > 0.5 and raw.probability == out.probability


# ---------------------------------------------------------------- training

def test_train_one_epoch_and_method_with_trained_weights(tmp_path, phantom):
    s = TrainCSettings(cache_dir=tmp_path / "cache", shape=(32, 96, 96), epochs=1, batch_size=2, width=4,
                       workers=1, input=TINY)
    model, metrics = train_method_c(range(1000, 1004), range(50000, 50002), s, "cpu", sampling="size_balanced",
                                    progress=False)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert metrics["sampling"] == "size_balanced" and metrics["n_train"] == 4 and metrics["n_val"] == 2
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["loss"])
    assert sum(metrics["group_counts"].values()) == 4 and len(metrics["group_weights"]) == 4
    assert {"auc", "accuracy", "sensitivity", "specificity", "attention_dice_covid"} <= set(metrics["val"])
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 6
    with pytest.raises(ValueError, match="held-out"):
        train_method_c([90000], [], s, "cpu", progress=False)
    with pytest.raises(ValueError, match="sampling"):
        train_method_c([1000], [], s, "cpu", sampling="balanced", progress=False)

    # both models from the cache, saved, loaded by the pipeline and run
    out_dir = tmp_path / "weights"
    report = train_method_c_models(out_dir, range(1000, 1004), range(50000, 50002), s, "cpu", progress=False)
    assert report["data_seconds"] < 5  # cached
    manifest = read_manifest(out_dir)
    assert set(manifest) == {f"{WEIGHTS_NAME_US}.safetensors", f"{WEIGHTS_NAME_SS}.safetensors"}
    assert {"auc", "auc_uniform", "auc_size_balanced"} <= set(report["ensemble_val"])
    method = load_method_c("cpu", out_dir)
    assert method.us.metadata["sampling"] == "uniform" and method.ss.metadata["sampling"] == "size_balanced"
    _check_output(method(phantom.hu, phantom.spacing, (1, 0, 0, 0, 1, 0), phantom.lung_labels), phantom)
