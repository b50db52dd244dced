"""Method D (weakly-supervised ResNeXt+): network, weights, the pipeline end to end on a
tiny phantom with untrained (seeded) weights, Grad-CAM against monai.visualize, and one
training epoch on tiny phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ct_ai_node.errors import ModelError
from ct_ai_node.models.net_d import ARCHITECTURE, ResNeXtLSTM
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import load_model, read_manifest, save_model
from ct_ai_node.pipeline import method_d
from ct_ai_node.pipeline.methods import PIPELINES, MethodOutput
from ct_ai_node.pipeline.slice_input import dilated_mask
from ct_ai_node.training.train_d import (
    TrainDSettings,
    augment_volume,
    epoch_order,
    save_method_d,
    stratified_slices,
    train_method_d,
)

TINY = {"width": 8, "lstm_hidden": 8, "attention_hidden": 8, "fc_hidden": 16}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def phantom():
    from ct_ai_node.synthetic import generate_phantom

    return generate_phantom(1000, "covid", shape=(24, 96, 96))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_forward_backward_shapes_and_finite_grads(norm):
    torch.manual_seed(0)
    net = build(ARCHITECTURE, **TINY, norm=norm)
    x = torch.rand(5, 2, 64, 64)
    logits, alpha = net(x)
    assert logits.shape == (1, 2) and alpha.shape == (5,)
    assert torch.allclose(alpha.sum(), torch.tensor(1.0), atol=1e-5) and bool((alpha >= 0).all())
    # last stage keeps stride 1: maps are 1/16 of the input
    assert net.backbone_maps(x).shape == (5, net.out_channels, 4, 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.backbone[0].conv_mask.weight.grad.abs().sum() > 0  # the mask branch learns too
    assert net.head.cbam.spatial.conv.weight.shape == (1, 2, 9, 9)


def test_default_layout_is_resnext50_at_quarter_width():
    net = build(ARCHITECTURE)
    stages = list(net.backbone)[1:]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    assert stages[0][0].conv2.conv.groups == 8
    assert net.out_channels == 512 and net.head.lstm.hidden_size == 64 and net.head.lstm.bidirectional
    n = sum(p.numel() for p in net.parameters())
    assert 1.5e6 < n < 3e6  # fp16: about 4 MB


def test_eval_is_deterministic_and_chunking_changes_nothing():
    torch.manual_seed(1)
    net = build(ARCHITECTURE, **TINY).eval()
    x = torch.rand(7, 2, 64, 64)
    with torch.no_grad():
        a, alpha_a = net(x)
        b, alpha_b = net(x)
        c, alpha_c = net(x, chunk=3)
    assert torch.equal(a, b) and torch.equal(alpha_a, alpha_b)
    assert torch.allclose(a, c, atol=1e-5) and torch.allclose(alpha_a, alpha_c, atol=1e-6)


def test_save_load_roundtrip_hash_check(tmp_path):
    torch.manual_seed(2)
    net = build(ARCHITECTURE, **TINY).eval()
    save_model(net, tmp_path / "d.safetensors", architecture=ARCHITECTURE, arch_kwargs=TINY, version="0.0.1")
    assert "d.safetensors" in read_manifest(tmp_path)
    loaded = load_model("d", tmp_path)
    assert isinstance(loaded.module, ResNeXtLSTM)
    x = torch.rand(4, 2, 64, 64)
    with torch.no_grad():
        got, _ = loaded.module(x)
        ref, _ = net.half().float()(x)
    assert torch.allclose(got, ref, atol=1e-3)
    raw = bytearray((tmp_path / "d.safetensors").read_bytes())
    raw[-7] ^= 0xFF
    (tmp_path / "d.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_model("d", tmp_path)


def test_factory_without_weights_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found") as err:
        PIPELINES[method_d.PIPELINE_NAME].factory(torch.device("cpu"), tmp_path)
    assert "\n" not in str(err.value)


def test_hull_mask_fills_each_lung_separately():
    lab = np.zeros((1, 40, 40), np.uint8)
    lab[0, 5:35, 5:8] = 1  # an "L" and a "C" shape
    lab[0, 32:35, 5:15] = 1
    lab[0, 5:35, 30:33] = 2
    lab[0, 5:8, 22:33] = 2
    lab[0, 32:35, 22:33] = 2
    hull = method_d.hull_lung_mask(lab)
    assert hull[0][lab[0] > 0].all()
    assert hull[0, 30, 10] and hull[0, 20, 27]  # inside each lung's hull
    assert not hull[0, 20, 18]  # the gap between the lungs stays out
    assert not hull[0, 10, 12]  # above the diagonal of the right lung's "L"


def _untrained_method(tmp_path, **settings) -> method_d.ResNeXtLSTMMethod:
    torch.manual_seed(3)
    net = build(ARCHITECTURE, **TINY).eval()
    save_model(net, tmp_path / f"{method_d.WEIGHTS_NAME}.safetensors", architecture=ARCHITECTURE, arch_kwargs=TINY,
               version="0.0.0-test", extra={"input": '{"size": 64}'})
    m = PIPELINES[method_d.PIPELINE_NAME].factory(torch.device("cpu"), tmp_path)
    m.settings = method_d.replace(m.settings, **settings)
    return m


def test_method_end_to_end_untrained(tmp_path, phantom):
    ph = phantom
    # heat_min_score 0: every lung slice gets a map, whatever the untrained score
    m = _untrained_method(tmp_path, heat_min_score=0.0, chunk=5)
    assert m.settings.input.size == 64  # taken from the weights' metadata
    out = m(ph.hu, ph.spacing, (1, 0, 0, 0, 1, 0), ph.lung_labels)
    assert isinstance(out, MethodOutput)
    z = ph.hu.shape[0]
    assert out.slice_scores.shape == (z,) and out.slice_scores.dtype == np.float32
    assert out.heatmap.shape == ph.hu.shape and out.heatmap.dtype == np.float32
    assert 0.0 <= out.probability <= 1.0 and out.threshold == 0.5
    assert float(out.slice_scores.min()) >= 0 and float(out.slice_scores.max()) <= 1
    assert float(out.heatmap.min()) >= 0 and float(out.heatmap.max()) <= 1 and out.heatmap.max() > 0
    lung = ph.lung_labels > 0
    inside = dilated_mask(lung, ph.spacing, m.settings.input.mask_dilation_mm)
    assert not out.heatmap[~inside].any()
    lung_z = np.flatnonzero(lung.reshape(z, -1).any(axis=1))
    no_lung = np.setdiff1d(np.arange(z), lung_z)
    assert not out.slice_scores[no_lung].any()
    # the most attended slice scores the volume probability
    assert np.isclose(out.slice_scores.max(), out.probability, atol=1e-6)
    assert set(out.positive_slices.tolist()) <= set(lung_z.tolist())
    assert out.model_versions[method_d.WEIGHTS_NAME].startswith("0.0.0-test+")
    again = m(ph.hu, ph.spacing, (1, 0, 0, 0, 1, 0), ph.lung_labels)
    assert again.probability == out.probability and np.array_equal(again.heatmap, out.heatmap)
    assert len(m.cam.nn_module.model.entry._forward_hooks) == 1  # one CAM per method, not one per call


def test_no_heat_below_min_score(tmp_path, phantom):
    ph = phantom
    m = _untrained_method(tmp_path, heat_min_score=1.01)
    out = m(ph.hu, ph.spacing, (1, 0, 0, 0, 1, 0), ph.lung_labels)
    assert not out.heatmap.any() and out.slice_scores.max() > 0


def _tiny_heat_case(seed: int, n: int):
    """A tiny untrained network, n random 64x64 slices and masks, settings that map every
    slice (chunks of 4), and the network's CAM."""
    torch.manual_seed(seed)
    net = build(ARCHITECTURE, **TINY).eval()
    img = (torch.rand(n, 64, 64) * 255).to(torch.uint8).numpy()
    msk = (torch.rand(n, 64, 64) > 0.3).to(torch.uint8).numpy()
    return net, img, msk, method_d.MethodDSettings(heat_min_score=0.0, chunk=4), method_d.make_gradcam(net)


def test_heat_is_hirescam_on_the_first_stage():
    """The pipeline's map (chunked, through TailLogOdds) equals the HiResCAM map of the
    first stage's output computed on the whole network in one pass."""
    from ct_ai_node.pipeline.localisation import HiResCAM

    net, img, msk, ms, cam = _tiny_heat_case(seed=4, n=6)
    pred = method_d.predict_volume(net, img, msk, torch.device("cpu"), ms, cam=cam)
    again = method_d.predict_volume(net, img, msk, torch.device("cpu"), ms, cam=cam)
    np.testing.assert_array_equal(pred.heat, again.heat)  # one CAM serves every call
    assert not cam.nn_module.activations and not cam.nn_module.gradients  # nothing kept
    assert all(p.grad is None for p in net.parameters())
    assert not method_d.predict_volume(net, img, msk, torch.device("cpu"), ms).heat.any()  # no cam, no heat
    assert pred.heat.any()

    class Whole(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            logits, _ = self.net(x)
            return logits[:, 1:2] - logits[:, 0:1]

    target = f"net.backbone.{method_d.CAM_SPLIT - 1}"
    ref = HiResCAM(nn_module=Whole(), target_layers=target).compute_map(method_d.to_tensor(img, msk), class_idx=0)
    ref = ref.detach()
    assert ref.shape[-1] == 64 // 4  # the first stage: 1/4 of the input
    ref = ref / ref.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    ref = torch.nn.functional.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0].numpy()
    rel = pred.alpha / pred.alpha.max()
    np.testing.assert_allclose(pred.heat, ref * rel[:, None, None], atol=1e-4)


def test_heat_on_thin_slices_is_computed_apart_and_interpolated():
    net, img, msk, ms, cam = _tiny_heat_case(seed=5, n=7)
    every = method_d.predict_volume(net, img, msk, torch.device("cpu"), ms, cam=cam)
    apart = method_d.predict_volume(net, img, msk, torch.device("cpu"), ms, cam=cam, cam_stride=3)
    np.testing.assert_array_equal(apart.scores, every.scores)
    computed = [0, 3, 6]  # every third slice and both ends
    np.testing.assert_allclose(apart.heat[computed], every.heat[computed], atol=1e-6)
    np.testing.assert_allclose(apart.heat[1], (2 * every.heat[0] + every.heat[3]) / 3, atol=1e-6)
    np.testing.assert_allclose(apart.heat[5], (every.heat[3] + 2 * every.heat[6]) / 3, atol=1e-6)
    assert not np.allclose(apart.heat[1], every.heat[1])


def test_hirescam_differs_from_gradcam():
    """HiResCAM keeps the gradient's position: on a layer where the channel-mean gradient
    is the same, a map that is not position-weighted would be the same too."""
    from monai.visualize import GradCAM

    from ct_ai_node.pipeline.localisation import HiResCAM

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    hires = HiResCAM(model, target_layers="0").compute_map(x, class_idx=1)
    grad = GradCAM(model, target_layers="0").compute_map(x, class_idx=1)
    assert hires.shape == grad.shape == (2, 1, 8, 8)
    assert not torch.allclose(hires, grad)
    # by hand: ReLU(sum_c dS/dA_c * A_c)
    a = model[0](x.detach()).detach().requires_grad_(True)
    s = model[2](model[1](a))[:, 1].sum()
    (g,) = torch.autograd.grad(s, a)
    torch.testing.assert_close(hires, torch.relu((g * a).sum(1, keepdim=True)).detach())


def test_sampling_balance_and_augmentation():
    rng = np.random.default_rng(0)
    pick = stratified_slices(120, 50, rng)
    assert pick.size == 50 and np.all(np.diff(pick) > 0) and pick[0] < 3 and pick[-1] >= 117
    assert np.array_equal(stratified_slices(30, 50, rng), np.arange(30))
    order = epoch_order(np.array([1, 0, 0, 0, 0]), True, rng)
    assert order.size == 8 and (order == 0).sum() == 4
    x = torch.cat([torch.rand(4, 1, 32, 32), (torch.rand(4, 1, 32, 32) > 0.5).float()], 1)
    y = augment_volume(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert set(torch.unique(y[:, 1]).tolist()) <= {0.0, 1.0}


def test_training_one_epoch_tiny(tmp_path):
    s = TrainDSettings(cache_dir=tmp_path / "cache", shape=(24, 96, 96), input_size=48, epochs=1, max_slices=12,
                       arch_kwargs=TINY, aux_weight=0.5)
    with pytest.raises(ValueError, match="held-out"):
        train_method_d([1000, 90000], [], s, "cpu", progress=False)
    model, metrics = train_method_d([1000, 1001, 1002, 1003], [50000, 50001], s, "cpu", progress=False)
    assert isinstance(model, ResNeXtLSTM) and not model.training
    assert metrics["train_volumes"] == 4 and metrics["val_volumes"] == 2
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["train_loss"])
    assert 0.0 <= metrics["val"]["volume_accuracy"] <= 1.0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 6  # cached crops
    # the deep-supervision classifier is training-only: the model is the method's network
    assert model.state_dict().keys() == ResNeXtLSTM(**TINY).state_dict().keys()
    save_method_d(model, metrics, tmp_path / "w")
    m = PIPELINES[method_d.PIPELINE_NAME].factory(torch.device("cpu"), tmp_path / "w")
    assert m.settings.input.size == 48


def _toy_volumes(n: int, slices: int = 6, size: int = 32, seed: int = 0):
    """``n`` toy volumes (half positive): noisy lungs; a positive volume has a bright
    patch on two of its slices, which is all that tells the classes apart."""
    g = torch.Generator().manual_seed(seed)
    vols, labels = [], []
    for i in range(n):
        img = 0.2 + 0.05 * torch.rand(slices, 1, size, size, generator=g)
        if i % 2:
            img[slices // 2 - 1 : slices // 2 + 1, :, 8:20, 10:22] = 0.8
        mask = torch.ones(slices, 1, size, size)
        vols.append(torch.cat([img, mask], 1))
        labels.append(i % 2)
    return vols, torch.tensor(labels)


def test_several_volumes_per_step_share_one_batch_norm_batch():
    """The fix for the runs that stayed at chance: the slices of all volumes of a step go
    through the backbone as ONE batch, so batch norm's batch statistics (and so its
    running statistics, used in eval mode) span several volumes instead of one.

    Checked as a property, not as the outcome of a training run (which depends on the
    CPU's floating-point path): every batch-norm layer sees all slices of the step at
    once, and its running mean moves towards the mean over all volumes together."""
    from ct_ai_node.training.train_d import volume_batch_outputs

    torch.manual_seed(0)
    vols, _ = _toy_volumes(4, slices=5)
    # volumes that differ a lot in brightness: a per-volume statistic would differ from
    # the pooled one by far more than rounding
    vols = [torch.cat([v[:, :1] + 0.5 * i, v[:, 1:]], 1) for i, v in enumerate(vols)]
    model = ResNeXtLSTM(**TINY).train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    seen = []
    bn.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    before = bn.running_mean.clone()
    logits, _ = volume_batch_outputs(model, vols, torch.device("cpu"))
    assert logits.shape == (4, 2)
    assert [x.shape[0] for x in seen] == [sum(v.shape[0] for v in vols)]  # one call, all slices
    pooled = seen[0].mean(dim=(0, 2, 3))
    expected = (1 - bn.momentum) * before + bn.momentum * pooled
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    # ... and it is not what a step with one volume at a time would have left
    one = seen[0][: vols[0].shape[0]].mean(dim=(0, 2, 3))
    assert (pooled - one).abs().max() > 100 * (bn.running_mean - expected).abs().max() + 1e-3


def test_deep_supervision_logits_come_from_each_volumes_mean_slice_feature():
    from ct_ai_node.training.train_d import volume_batch_outputs

    torch.manual_seed(0)
    vols, _ = _toy_volumes(3)
    model = ResNeXtLSTM(**TINY).eval()
    aux = torch.nn.Linear(model.out_channels, 2)
    with torch.no_grad():
        logits, aux_logits = volume_batch_outputs(model, vols, torch.device("cpu"), aux)
        assert volume_batch_outputs(model, vols, torch.device("cpu"))[1] is None
        for i, v in enumerate(vols):
            feats = model.head.slice_features(model.backbone(v))
            torch.testing.assert_close(aux_logits[i], aux(feats.mean(dim=0)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(logits[i : i + 1], model(v)[0], rtol=1e-4, atol=1e-5)


def test_batch_norm_recalibration_is_the_plain_average_of_training_batches():
    from ct_ai_node.training.train_d import recalibrate_batch_norm

    torch.manual_seed(0)
    model = ResNeXtLSTM(width=8, layers=(1, 1, 1, 1), lstm_hidden=8, attention_hidden=8, fc_hidden=16).eval()
    rng = np.random.default_rng(0)
    cases = [{"image": rng.integers(0, 255, (5, 32, 32)).astype(np.uint8),
              "mask": np.ones((5, 32, 32), np.uint8)} for _ in range(4)]
    s = TrainDSettings(max_slices=5, volumes_per_step=2, recalibrate_steps=8)
    stem_bn = model.backbone[0].bn
    stem_bn.running_mean.fill_(123.0)
    assert recalibrate_batch_norm(model, cases, s, torch.device("cpu"), seed=1) == 2  # 4 volumes, 2 per batch
    assert not model.training and stem_bn.momentum == 0.1
    # expected: the mean of the two batches' means at the stem (same grouping as the function)
    order = np.random.default_rng(1).permutation(4)
    means = []
    with torch.no_grad():
        for k in (0, 2):
            x = torch.cat([method_d.to_tensor(cases[i]["image"], cases[i]["mask"]) for i in order[k : k + 2]])
            stem = model.backbone[0]
            means.append((stem.conv_image(x[:, :1]) + stem.conv_mask(x[:, 1:2])).mean(dim=(0, 2, 3)))
    torch.testing.assert_close(stem_bn.running_mean, (means[0] + means[1]) / 2, rtol=1e-4, atol=1e-5)
    assert recalibrate_batch_norm(model, cases, TrainDSettings(recalibrate_steps=0), torch.device("cpu")) == 0
