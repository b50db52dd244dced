"""Method B (COVID CT-Net): the residual attention network, its weight file, the
pipeline end to end with untrained weights, and one epoch of its training."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from ct_ai_node.errors import ModelError
from ct_ai_node.models.net_b import ARCHITECTURE, CAM_LAYER, AttentionModule, build_residual_attention_2d
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import load_model, read_manifest, save_model, sha256_of
from ct_ai_node.pipeline.method_b import (
    PIPELINE_NAME,
    WEIGHTS_NAME,
    BatchGradCAMpp,
    MethodBSettings,
    OcclusionSettings,
    _minmax,
    load_method_b,
    occlusion_map,
)
from ct_ai_node.pipeline.methods import PIPELINES
from ct_ai_node.pipeline.slice_input import SliceInputSettings, dilated_mask

WIDTH = 4  # tiny network for the tests (the method's default is 16)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(seed=0, width=WIDTH):
    torch.manual_seed(seed)
    return build(ARCHITECTURE, width=width)


def test_registered_architecture_and_pipeline():
    assert PIPELINE_NAME == "ctnet" and PIPELINE_NAME in PIPELINES
    net = _net()
    att = [name for name, m in net.named_modules() if isinstance(m, AttentionModule)]
    assert att == ["attention1", "attention2", "attention3"] and CAM_LAYER == "attention3"
    # p=1, t=2, r=1 and 3/2/1 max-pool levels in the soft-mask branches
    assert len(net.attention3.pre) == 1 and len(net.attention3.trunk) == 2 and len(net.attention3.post) == 1
    assert net.attention1.mask.levels.inner.inner is not None and net.attention3.mask.levels.inner is None


def test_forward_backward_tiny():
    net = _net().train()
    x = torch.rand(2, 1, 64, 64)
    out = net(x)
    assert out.shape == (2, 1)
    out.sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_attention_module_is_one_plus_mask_times_trunk():
    torch.manual_seed(0)
    mod = AttentionModule(8, mask_depth=2).eval()
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        h = mod.pre(x)
        t = mod.trunk(h)
        m = mod.mask(h, t)
        assert float(m.min()) >= 0 and float(m.max()) <= 1
        assert torch.allclose(mod(x), mod.post((1 + m) * t))


def test_same_input_same_output_in_eval():
    net = _net().eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    # batch-independent in eval (BatchNorm uses running statistics)
    with torch.no_grad():
        single = net(x[1:2])
    assert torch.allclose(a[1:2], single, atol=1e-5)


def test_save_load_roundtrip_and_hash_check(tmp_path):
    net = _net().eval()
    digest = save_model(net, tmp_path / f"{WEIGHTS_NAME}.safetensors", architecture=ARCHITECTURE,
                        arch_kwargs={"width": WIDTH}, version="9.9", extra={"input_size": "64"})
    assert read_manifest(tmp_path)[f"{WEIGHTS_NAME}.safetensors"] == digest == sha256_of(
        tmp_path / f"{WEIGHTS_NAME}.safetensors")
    loaded = load_model(WEIGHTS_NAME, tmp_path)
    assert loaded.metadata["architecture"] == ARCHITECTURE and loaded.metadata["input_size"] == "64"
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a, b = loaded.module(x), loaded.module(x)
        ref = net.half().float()(x)  # stored as fp16
    assert torch.equal(a, b)
    assert torch.allclose(a, ref, atol=2e-2, rtol=1e-2)
    raw = bytearray((tmp_path / f"{WEIGHTS_NAME}.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / f"{WEIGHTS_NAME}.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_model(WEIGHTS_NAME, tmp_path)
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_method_b("cpu", tmp_path)


def test_missing_weights_one_line_model_error(tmp_path):
    with pytest.raises(ModelError) as exc:
        PIPELINES[PIPELINE_NAME].factory(torch.device("cpu"), tmp_path)
    assert "not found" in str(exc.value) and "\n" not in str(exc.value)


def test_gradcampp_batch_equals_monai_single():
    """The batch fix of Grad-CAM++ agrees with MONAI's GradCAMpp run one sample at a time."""
    from monai.visualize import GradCAMpp

    net = _net(1).eval()
    x = torch.rand(3, 1, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = BatchGradCAMpp(net, CAM_LAYER, postprocessing=_minmax)(x, class_idx=0).detach()
        ref = GradCAMpp(net, CAM_LAYER, postprocessing=_minmax)
        ref = torch.cat([ref(x[i : i + 1], class_idx=0) for i in range(3)]).detach()
    assert ours.shape == (3, 1, 64, 64)
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1
    assert torch.allclose(ours, ref, atol=1e-3)


def test_occlusion_map_shapes_and_range():
    net = _net(2).eval()
    x = torch.rand(2, 1, 48, 48)
    heat, flips, p = occlusion_map(net, x, OcclusionSettings(patch=16, stride=8, n_batch=8))
    assert heat.shape == (2, 48, 48) and flips.shape == (2, 48, 48) and p.shape == (2,)
    assert heat.min() >= 0 and heat.max() <= 1


@pytest.fixture(scope="module")
def tiny_case(tmp_path_factory):
    from ct_ai_node.synthetic import generate_phantom

    folder = tmp_path_factory.mktemp("weights_b")
    torch.manual_seed(3)
    net = build_residual_attention_2d(width=WIDTH)
    cd = {"slice_threshold": 0.5, "ratio_threshold": 0.1, "slope": 30.0}
    save_model(net, folder / f"{WEIGHTS_NAME}.safetensors", architecture=ARCHITECTURE, arch_kwargs={"width": WIDTH},
               version="0.0-test", extra={"input_size": "64", "case_decision": json.dumps(cd),
                                          "infection_threshold_gradcampp": "0.2"})
    ph = generate_phantom(1003, "covid", shape=(20, 96, 96))
    return folder, ph


@pytest.mark.parametrize("explanation", ["gradcampp", "gradcam", "occlusion"])
def test_method_end_to_end_untrained(tiny_case, explanation):
    folder, ph = tiny_case
    occ = OcclusionSettings(patch=16, stride=16, top_k=2, n_batch=16)
    # every lung slice is a candidate (the untrained scores are arbitrary)
    method = load_method_b("cpu", folder, MethodBSettings(explanation=explanation, cam_min_score=0.0, occlusion=occ))
    assert method.settings.input.size == 64  # from the weights metadata
    out = method(ph.hu, ph.spacing, (1.0, 0, 0, 0, 1.0, 0), ph.lung_labels)
    z, y, x = ph.hu.shape
    assert out.slice_scores.shape == (z,) and out.slice_scores.dtype == np.float32
    assert out.slice_scores.min() >= 0 and out.slice_scores.max() <= 1
    assert out.heatmap.shape == (z, y, x) and out.heatmap.dtype == np.float32
    assert out.heatmap.min() >= 0 and out.heatmap.max() <= 1 and out.heatmap.max() > 0
    lung = ph.lung_labels > 0
    inside = dilated_mask(lung, ph.spacing, SliceInputSettings().mask_dilation_mm)
    assert not out.heatmap[~inside].any()
    assert 0.0 <= out.probability <= 1.0 and 0.0 <= out.positive_slice_ratio <= 1.0
    assert set(out.positive_slices.tolist()) <= set(np.flatnonzero(lung.any(axis=(1, 2))).tolist())
    assert out.model_versions[WEIGHTS_NAME].startswith("0.0-test+")
    if explanation == "occlusion":
        assert np.count_nonzero(out.heatmap.reshape(z, -1).any(axis=1)) <= 2  # top_k slices only
        assert out.infection_threshold is None
    elif explanation == "gradcampp":
        assert out.infection_threshold == 0.2
    # same volume, same result
    again = method(ph.hu, ph.spacing, (1.0, 0, 0, 0, 1.0, 0), ph.lung_labels)
    assert np.array_equal(again.slice_scores, out.slice_scores)


def test_explain_slices_all_kinds(tiny_case):
    folder, ph = tiny_case
    method = load_method_b("cpu", folder, MethodBSettings(occlusion=OcclusionSettings(patch=16, stride=16)))
    zs = [8, 10]
    maps = method.explain_slices(ph.hu, ph.spacing, ph.lung_labels, zs)
    assert maps["score"].shape == (2,)
    for kind in ("gradcam", "gradcampp", "occlusion"):
        assert maps[kind].shape == (2, *ph.hu.shape[1:])
        assert maps[kind].min() >= 0 and maps[kind].max() <= 1


def test_train_one_epoch_tiny(tmp_path):
    from ct_ai_node.training.train_b import TrainBSettings, train_method_b

    settings = TrainBSettings(shape=(24, 96, 96), epochs=1, batch_size=8, width=WIDTH, input_size=64, workers=1,
                              calibration_slices=16, out_dir=tmp_path)
    model, metrics = train_method_b([1000, 1001, 1002, 1003], [50000, 50002], settings, "cpu", progress=False)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert len(metrics["train_loss_by_epoch"]) == 1 and np.isfinite(metrics["train_loss_by_epoch"][0])
    assert metrics["optimizer"] in ("rmsprop", "adam")
    assert set(metrics["val_slice_thresholds"]) == {f"{t / 10:.1f}" for t in range(1, 10)}
    meta = metrics["weights_metadata"]
    assert json.loads(meta["case_decision"])["slice_threshold"] == 0.5 and meta["input_size"] == "64"
    # written with the calibration, loadable by the method
    method = load_method_b("cpu", tmp_path)
    assert method.settings.input.size == 64 and method.model.sha256 == metrics["sha256"]
    with pytest.raises(ValueError, match="held-out"):
        train_method_b([90000], [50000], settings, "cpu", progress=False)


def test_rmsprop_divergence_falls_back_to_adam(monkeypatch):
    from ct_ai_node.training import train_b

    rng = np.random.default_rng(0)
    n = 32
    fake = {"x": rng.integers(0, 256, (n, 64, 64), dtype=np.uint8), "y": (np.arange(n) % 2).astype(np.float32),
            "w": np.ones(n, np.float32), "lesion": np.zeros((n, 64, 64), bool),
            "case": np.repeat(np.array([50000, 50001, 50002, 50003]), n // 4)}
    monkeypatch.setattr(train_b, "_dataset", lambda seeds, settings, progress_cb=None: fake)
    settings = train_b.TrainBSettings(epochs=1, batch_size=8, width=WIDTH, input_size=64, calibration_slices=0,
                                      divergence_loss=0.0)  # every epoch "diverges"
    with pytest.raises(RuntimeError, match="diverged with adam"):
        train_b.train_method_b([1000], [50000], settings, "cpu", progress=False)
    real_fit = train_b._fit

    def fit_rmsprop_diverges(data, s, device, optimizer, lr, init_state, progress, log):
        if optimizer == "rmsprop":
            raise train_b._Diverged("non-finite loss at epoch 1, step 1")
        return real_fit(data, s, device, optimizer, lr, init_state, progress, log)

    monkeypatch.setattr(train_b, "_fit", fit_rmsprop_diverges)
    settings.divergence_loss = 2.0
    model, metrics = train_b.train_method_b([1000], [50000], settings, "cpu", progress=False)
    assert metrics["optimizer"] == "adam" and metrics["lr"] == settings.fallback_lr
    assert "rmsprop lr 0.01 diverged" in metrics["fallback_reason"]
    assert "fallback" in metrics["weights_metadata"]["optimizer"]
