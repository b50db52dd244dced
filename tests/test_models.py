"""Networks, weight files and the hash check, Grad-CAM fusion, lung segmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ct_ai_node.errors import ModelError
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import BUNDLED_WEIGHTS, load_model, read_manifest, save_model, sha256_of
from ct_ai_node.pipeline.localisation import FusedGradCAM
from ct_ai_node.pipeline.lungs import ClassicalLungSegmenter
from ct_ai_node.pipeline.types import LEFT_LUNG, RIGHT_LUNG

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.mark.parametrize("arch,shape", [("slice_resnet50_w16", (2, 1, 64, 64)), ("lung_unet2d", (2, 1, 64, 64))])
def test_forward_backward_tiny(arch, shape):
    torch.manual_seed(0)
    net = build(arch)
    out = net(torch.rand(shape))
    out.float().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_save_load_roundtrip_and_hash_check(tmp_path):
    torch.manual_seed(0)
    net = build("slice_resnet50_w16").eval()
    digest = save_model(net, tmp_path / "m.safetensors", architecture="slice_resnet50_w16", arch_kwargs={},
                        version="9.9", extra={"note": "test"})
    assert read_manifest(tmp_path)["m.safetensors"] == digest == sha256_of(tmp_path / "m.safetensors")
    loaded = load_model("m", tmp_path)
    assert loaded.metadata["note"] == "test" and loaded.version.startswith("9.9+")
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        a, b = loaded.module(x), loaded.module(x)
        ref = net.half().float()(x)  # weights are stored in fp16
    assert torch.equal(a, b)  # same input, same output
    assert torch.allclose(a, ref, atol=1e-3)
    # one flipped byte: refused before use
    raw = bytearray((tmp_path / "m.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "m.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_model("m", tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_model("absent", tmp_path)


def test_values_beyond_fp16_range_stay_fp32(tmp_path):
    """A late batch norm's running variance can exceed fp16's 65504 (seen in method B's
    first run: stored as inf, the network's output became a constant)."""
    torch.manual_seed(0)
    net = build("slice_resnet50_w16").eval()
    bn = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():  # same layer output as before, from a variance fp16 cannot hold
        bn.running_var.mul_(1e6)
        bn.weight.mul_(1e3)
    save_model(net, tmp_path / "m.safetensors", architecture="slice_resnet50_w16", arch_kwargs={}, version="1")
    loaded = load_model("m", tmp_path)
    state = loaded.module.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    name = next(k for k, m in net.named_modules() if m is bn)
    assert torch.equal(state[f"{name}.running_var"], bn.running_var)  # kept exactly (fp32)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        out, ref = loaded.module(x), net(x)
    assert out.std() > 0 and torch.allclose(out, ref, atol=1e-2, rtol=1e-2)


def test_bundled_weights_load_with_matching_hash():
    manifest = read_manifest(BUNDLED_WEIGHTS)
    assert manifest, "bundled weights have a manifest"
    for file_name in manifest:
        loaded = load_model(file_name.removesuffix(".safetensors"))
        assert loaded.metadata["trained_on"].startswith("synthetic")


def test_fused_gradcam_shapes_and_range():
    torch.manual_seed(0)
    net = build("slice_resnet50_w16").eval()
    x = torch.rand(3, 1, 224, 224)
    cam = FusedGradCAM(net)
    logits, maps = cam(x)
    assert logits.shape == (3,) and maps.shape == (3, 224, 224)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    # equals the product of MONAI's own Grad-CAM on each layer (min-max normalised)
    from monai.visualize import GradCAM

    def minmax(t):
        flat = t.flatten(1)
        lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        return ((flat - lo) / (hi - lo).clamp_min(1e-8) * (hi - lo > 1e-8)).view_as(t)

    product = torch.ones_like(maps)
    for layer in ("backbone.layer2", "backbone.layer3"):
        product = product * GradCAM(net, target_layers=layer, postprocessing=minmax)(x, class_idx=0)[:, 0]
    assert torch.allclose(maps, product, atol=1e-5)
    _, again = cam(x)
    assert torch.allclose(maps, again, atol=1e-6)  # same input, same map


def _two_lung_phantom():
    z, y, x = 20, 128, 128
    zz, yy, xx = np.mgrid[:z, :y, :x]
    hu = np.full((z, y, x), -1000.0, np.float32)
    hu[((yy - 64) / 52.0) ** 2 + ((xx - 64) / 58.0) ** 2 < 1] = 40.0
    right = (((yy - 64) / 35.0) ** 2 + ((xx - 38) / 16.0) ** 2 < 1) & (zz > 2) & (zz < 17)
    left = (((yy - 64) / 35.0) ** 2 + ((xx - 90) / 16.0) ** 2 < 1) & (zz > 2) & (zz < 17)
    hu[right | left] = -860.0
    # dense consolidation touching the pleura of the right lung must stay inside the mask
    hu[8:12, 60:75, 23:32] = 20.0
    return hu, right, left


def test_classical_lungs_on_geometric_phantom():
    hu, right, left = _two_lung_phantom()
    labels = ClassicalLungSegmenter()(hu, (5.0, 1.5, 1.5), (1, 0, 0, 0, 1, 0))
    for lab, truth in ((RIGHT_LUNG, right), (LEFT_LUNG, left)):
        m = labels == lab
        assert 2 * (m & truth).sum() / (m.sum() + truth.sum()) > 0.95
    # the patient's right is on the image left for this orientation; flipping the row
    # direction flips the sides
    flipped = ClassicalLungSegmenter()(hu, (5.0, 1.5, 1.5), (-1, 0, 0, 0, 1, 0))
    assert ((flipped == LEFT_LUNG) & right).sum() > 0.9 * right.sum()


@pytest.mark.skipif(not (REAL / "lung_pet_ct_dx_sample").is_dir(), reason="../shared/data/real not present")
def test_classical_lungs_on_real_chest_ct():
    import pydicom

    files = sorted((REAL / "lung_pet_ct_dx_sample").rglob("*.dcm"))
    by_series = {}
    for f in files:
        ds = pydicom.dcmread(f)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    dss = sorted(next(iter(by_series.values())), key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss]).astype(np.float32)
    sp = (abs(float(dss[1].ImagePositionPatient[2]) - float(dss[0].ImagePositionPatient[2])),
          float(dss[0].PixelSpacing[0]), float(dss[0].PixelSpacing[1]))
    labels = ClassicalLungSegmenter()(hu, sp, tuple(float(v) for v in dss[0].ImageOrientationPatient))
    vox_ml = float(np.prod(sp)) / 1000
    right_ml, left_ml = (labels == RIGHT_LUNG).sum() * vox_ml, (labels == LEFT_LUNG).sum() * vox_ml
    assert 700 < right_ml < 4000 and 700 < left_ml < 4000
    # right lung on the image left (low column index) for this head-first supine scan
    xs_r = np.nonzero(labels == RIGHT_LUNG)[2].mean()
    xs_l = np.nonzero(labels == LEFT_LUNG)[2].mean()
    assert xs_r < xs_l
    # lung voxels are mostly air-like
    assert np.median(hu[labels > 0]) < -700
