"""Method D (weakly-supervised "ResNeXt+", IEEE Access 2020): every lung slice of the
volume and its lung mask go through a mask-fusion ResNeXt with CBAM, a bidirectional
LSTM along z and slice attention; trained with volume labels only, the attention
weights serve as slice-level predictions.

Choices (see also ``ct_ai_node/models/net_d.py``):

* **Lung mask** (the method's own, classical): the paper thresholds at -600 HU, takes
  the convex hull and dilates. The node already passes lung labels obtained that way
  (threshold at -600 HU and clean-up, or the U-Net), so the method takes the **convex
  hull of each lung (label 1 and 2 separately, so the mediastinum stays out) on every
  slice** and dilates it by ``input.mask_dilation_mm``. The hull brings juxta-pleural
  lesions that a threshold leaves out back into the mask.
* **Slice input**: the lung-ROI crop of :mod:`ct_ai_node.pipeline.slice_input` (one
  square box for the whole volume, [-1000, 0] HU scaled to [0, 1], air outside the
  dilated hull mask), resized to **128x128** (the paper: 224). 128 keeps the ROI at
  about 2.5 mm per pixel, enough for ground-glass patches of a centimetre, at a third of
  the CPU cost of 224 (training on this 2-core CPU had to fit in minutes). Channel 1 is the dilated hull mask at the same crop.
* **All lung slices** (area >= ``min_lung_fraction`` of the largest) are scored at
  inference; the backbone runs ``chunk`` slices at a time (no gradient), the cheap head
  (CBAM, LSTM, attention, classifier) on the whole sequence.
* **Volume probability** = softmax(logits)[COVID-like].
* **Slice scores**: alpha_n / max_m alpha_m (attention relative to the most attended
  slice, in (0, 1]) times the volume probability, so that a negative volume has low
  scores everywhere (softmax attention alone always sums to 1, whatever the volume).
  A slice is positive when its score is >= ``slice_threshold``.
* **Heat map**: HiResCAM (:class:`ct_ai_node.pipeline.localisation.HiResCAM`, MONAI's
  ``GradCAM`` hooks with the gradient-times-activation map) of the log-odds
  logit(COVID) - logit(other) on the **output of the first ResNeXt stage** (1/4 of the
  input: 32x32 cells of about 1 cm), per slice divided by its maximum, times
  alpha_n / max alpha; only for slices scoring >= ``heat_min_score`` (as method A computes
  Grad-CAM only for candidate slices). The backward pass runs through the later stages
  and the head for those slices, ``chunk`` at a time, the other slices held fixed; on
  thin-slice scans only for those about ``z_step_mm`` apart (and the ends of every run of
  them), the maps between interpolated along z (method A's rule).
  Upsampled to the crop, pasted back into the slice geometry and zeroed outside the
  dilated lungs. Why this map: on the 60 validation phantoms (seeds 50000-50059, 864
  positive slices with lesion) its maximum fell within 5 mm of a lesion on 0.92 of the
  slices, against 0.28 for Grad-CAM on the CBAM output (8x8 cells of about 4 cm, the map
  shipped first), 0.41 for Grad-CAM on the same first stage and 0.61 on the second
  (``docs/evaluation/method_d_cam_layers.json``).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import ConvexHull, QhullError

from ct_ai_node import __version__
from ct_ai_node.models import net_d  # noqa: F401  (registers the architecture)
from ct_ai_node.models.net_d import ResNeXtLSTM, TailLogOdds
from ct_ai_node.models.weights import LoadedModel, load_model
from ct_ai_node.pipeline.geometry import Box2D, fill_between_inplace, resize_slices, strided_indices
from ct_ai_node.pipeline.localisation import HiResCAM
from ct_ai_node.pipeline.methods import MethodOutput, register_pipeline
from ct_ai_node.pipeline.slice_input import (
    SliceInputSettings,
    dilated_mask,
    lung_slice_indices,
    paste_back,
    roi_box,
    slice_tensors,
)
from ct_ai_node.pipeline.types import AlgorithmInfo

WEIGHTS_NAME = "method_d_resnext_lstm"
PIPELINE_NAME = "resnext-lstm"
INPUT_SIZE = 128
#: index of the COVID-19-like class in the two softmax outputs
POSITIVE_CLASS = 1
#: the heat map reads the output of ``backbone[:CAM_SPLIT]`` (stem and first stage)
CAM_SPLIT = 2


@dataclass(frozen=True)
class MethodDSettings:
    input: SliceInputSettings = field(default_factory=lambda: SliceInputSettings(size=INPUT_SIZE))
    #: slices per backbone pass (bounds the memory on long thin-slice scans)
    chunk: int = 32
    #: a lung slice is positive when its score (see module doc) is at least this
    slice_threshold: float = 0.5
    #: heat is computed for slices scoring at least this; others get none
    heat_min_score: float = 0.3
    #: on thin-slice scans the map is computed on those slices about this far apart (and
    #: at both ends of every run of them) and interpolated along z between, as method A does
    z_step_mm: float = 2.5


# --- the method's classical lung mask -------------------------------------------------

def _hull_fill(mask: np.ndarray) -> np.ndarray:
    """Filled convex hull of a 2D mask. The hull's vertices are among the leftmost and
    rightmost pixels of each row, so only those go to Qhull; the hull is filled row by
    row from its half-planes."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return mask.copy()
    w = mask.shape[1]
    sub = mask[rows]
    left = sub.argmax(axis=1)
    right = w - 1 - sub[:, ::-1].argmax(axis=1)
    pts = np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)]).astype(np.float64)
    try:
        hull = ConvexHull(pts)
    except (QhullError, ValueError):  # fewer than 3 points or all on a line
        out = mask.copy()
        for r, a, b in zip(rows, left, right):
            out[r, a : b + 1] = True
        return out
    eq = hull.equations  # a x + b y + c <= 0 inside
    ys = np.arange(rows[0], rows[-1] + 1, dtype=np.float64)
    a, b, c = eq[:, 0][None], eq[:, 1][None], eq[:, 2][None]
    eps = 1e-9
    bound = (-c - b * ys[:, None]) / np.where(np.abs(a) > eps, a, 1.0)
    hi = np.where(a > eps, bound, np.inf).min(axis=1)
    lo = np.where(a < -eps, bound, -np.inf).max(axis=1)
    flat_ok = np.where(np.abs(a) <= eps, b * ys[:, None] + c <= 1e-6, True).all(axis=1)
    cols = np.arange(w, dtype=np.float64)[None]
    band = (cols >= lo[:, None] - 1e-6) & (cols <= hi[:, None] + 1e-6) & flat_ok[:, None]
    out = mask.copy()
    out[rows[0] : rows[-1] + 1] |= band
    return out


def hull_lung_mask(lung_labels: np.ndarray) -> np.ndarray:
    """(n, y, x) lung labels -> bool mask: the convex hull of each lung label, per slice."""
    labels = np.asarray(lung_labels)
    present = np.flatnonzero(np.bincount(labels.ravel().astype(np.int64), minlength=3)[1:]) + 1
    out = np.zeros(labels.shape, bool)
    for z in range(labels.shape[0]):
        for lab in present:
            m = labels[z] == lab
            if m.any():
                out[z] |= _hull_fill(m)
    return out


# --- input preparation, shared by training and inference ------------------------------

@dataclass
class VolumeInput:
    #: z indices of the lung slices, in axial order
    zs: np.ndarray
    box: Box2D
    #: (n, size, size) uint8: slice [-1000, 0] HU -> 0..255, air outside the mask
    image: np.ndarray
    #: (n, size, size) uint8 0/1: the dilated hull lung mask on the same crop
    mask: np.ndarray


def prepare_volume(hu: np.ndarray, lung_labels: np.ndarray, spacing, settings: SliceInputSettings,
                   chunk: int = 32) -> VolumeInput:
    """HU volume and lung labels -> the network's two input channels for every lung slice
    (uint8, so a training cache stays small); built ``chunk`` slices at a time."""
    lung = lung_labels > 0
    zs = lung_slice_indices(lung, settings.min_lung_fraction)
    box = roi_box(lung, spacing, settings)
    size = settings.size
    image = np.zeros((zs.size, size, size), np.uint8)
    mask = np.zeros((zs.size, size, size), np.uint8)
    crop_box = Box2D(0, box.height, 0, box.width)
    for i in range(0, zs.size, chunk):
        z = zs[i : i + chunk]
        labels = lung_labels[z][:, box.y0 : box.y1, box.x0 : box.x1]
        hull = hull_lung_mask(labels)
        x = slice_tensors(hu[z][:, box.y0 : box.y1, box.x0 : box.x1], hull, crop_box, spacing, settings)
        m = dilated_mask(hull, spacing, settings.mask_dilation_mm)
        m = resize_slices(torch.from_numpy(m.astype(np.float32))[:, None], (size, size))
        image[i : i + z.size] = (x[:, 0].numpy() * 255).round().astype(np.uint8)
        mask[i : i + z.size] = (m[:, 0].numpy() >= 0.5).astype(np.uint8)
    return VolumeInput(zs=zs, box=box, image=image, mask=mask)


def to_tensor(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """uint8 (n, s, s) image and mask -> (n, 2, s, s) float32 network input."""
    return torch.from_numpy(np.stack([image, mask], axis=1)).float().mul_(
        torch.tensor([1 / 255.0, 1.0]).view(1, 2, 1, 1))


# --- inference ------------------------------------------------------------------------

@dataclass
class VolumePrediction:
    """Method D's raw outputs on the lung slices of one volume (crop space)."""

    probability: float
    #: softmax attention over the lung slices (sums to 1)
    alpha: np.ndarray
    #: p * alpha / max alpha, in [0, 1]
    scores: np.ndarray
    #: (n, size, size) heat in [0, 1] (zero for slices below ``heat_min_score``)
    heat: np.ndarray
    #: seconds spent on Grad-CAM
    localisation_s: float = 0.0


def _chunked_maps(net: ResNeXtLSTM, image: np.ndarray, mask: np.ndarray, device, chunk: int,
                  keep_early: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Last-stage maps of every slice and, with ``keep_early``, the activations the heat
    map reads (after ``backbone[:CAM_SPLIT]``), computed ``chunk`` slices at a time."""
    split = min(CAM_SPLIT, len(net.backbone) - 1)
    out, early = [], []
    with torch.no_grad():
        for i in range(0, image.shape[0], chunk):
            h = net.backbone[:split](to_tensor(image[i : i + chunk], mask[i : i + chunk]).to(device))
            if keep_early:
                early.append(h)
            out.append(net.backbone[split:](h))
    return torch.cat(out), (torch.cat(early) if keep_early else None)


def make_gradcam(net: ResNeXtLSTM) -> HiResCAM:
    """HiResCAM of the log-odds on the first stage's output, through :class:`TailLogOdds`.
    Its hooks stay on the wrapper for the network's lifetime: make one per network (or
    use a copy of the network) and reuse it."""
    return HiResCAM(nn_module=TailLogOdds(net, min(CAM_SPLIT, len(net.backbone) - 1)), target_layers="entry")


def _heat_maps(cam: HiResCAM, early: torch.Tensor, maps: torch.Tensor, sel: np.ndarray, chunk: int) -> torch.Tensor:
    """(len(sel), 1, h, w) HiResCAM maps of the slices ``sel``, ``chunk`` at a time (the
    gradient of a slice's map does not depend on which other slices share its pass)."""
    out = []
    try:
        # cuDNN's LSTM has no backward in eval mode: the pass runs without cuDNN
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for i in range(0, sel.size, chunk):
                index = torch.as_tensor(sel[i : i + chunk], device=maps.device)
                feats = early[index].requires_grad_(True)
                out.append(cam.compute_map(feats, class_idx=0, maps=maps, index=index).detach())
    finally:
        # the hooks keep the last activations and gradients: let them go
        cam.nn_module.activations.clear()
        cam.nn_module.gradients.clear()
        cam.nn_module.model.zero_grad(set_to_none=True)
    return torch.cat(out)


def predict_volume(net: ResNeXtLSTM, image: np.ndarray, mask: np.ndarray, device: torch.device,
                   settings: MethodDSettings = MethodDSettings(), cam=None, cam_stride: int = 1) -> VolumePrediction:
    """Run the network (eval mode) on the prepared lung slices of one volume; the heat
    maps need ``cam`` (:func:`make_gradcam` of ``net``), else they stay zero. With
    ``cam_stride`` > 1 the maps are computed on every ``cam_stride``-th slice that gets one
    (and at the ends of each run of such slices) and interpolated between."""
    n, size = image.shape[0], image.shape[-1]
    if n == 0:
        return VolumePrediction(0.0, np.zeros(0, np.float32), np.zeros(0, np.float32),
                                np.zeros((0, size, size), np.float32))
    net.eval()
    maps, early = _chunked_maps(net, image, mask, device, settings.chunk, keep_early=cam is not None)
    with torch.no_grad():
        logits, alpha = net.head(maps)
    p = float(torch.softmax(logits.float(), dim=1)[0, POSITIVE_CLASS])
    alpha_np = alpha.float().cpu().numpy().astype(np.float32)
    rel = alpha_np / max(float(alpha_np.max()), 1e-12)
    scores = np.clip(p * rel, 0.0, 1.0).astype(np.float32)
    heat = np.zeros((n, size, size), np.float32)
    sel = np.flatnonzero(scores >= settings.heat_min_score)
    t0 = time.perf_counter()
    if cam is not None and sel.size:
        run = strided_indices(sel, cam_stride)
        raw = _heat_maps(cam, early, maps, run, settings.chunk)
        peak = raw.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        up = F.interpolate(raw / peak, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        # in the order of ``sel``, the ends of every run of selected slices are computed,
        # so filling between computed neighbours never reaches across a gap
        known = np.searchsorted(sel, run)
        stack = np.empty((sel.size, size, size), np.float32)
        stack[known] = up.clamp(0, 1).cpu().numpy() * rel[run, None, None]
        heat[sel] = fill_between_inplace(stack, known)
    return VolumePrediction(p, alpha_np, scores, heat, time.perf_counter() - t0)


class ResNeXtLSTMMethod:
    name = PIPELINE_NAME

    def __init__(self, model: LoadedModel, device: torch.device, settings: MethodDSettings | None = None):
        self.model = model
        self.device = device
        self.settings = settings or MethodDSettings()
        meta = model.metadata
        self.threshold = float(meta.get("threshold", 0.5))
        self.infection_threshold = float(meta["infection_threshold"]) if "infection_threshold" in meta else None
        if "input" in meta:  # the crop the weights were trained on
            self.settings = replace(self.settings, input=SliceInputSettings(**json.loads(meta["input"])))
        self.net: ResNeXtLSTM = model.module.to(device).eval()
        # the heat map needs gradients of activations, never of the weights
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.cam = make_gradcam(self.net)
        self.algorithm = AlgorithmInfo(
            name="ct-ai-node method D (ResNeXt+CBAM, BiLSTM, slice attention)",
            version=f"{__version__}/{model.version}",
        )

    def __call__(self, hu, spacing, orientation, lung_labels) -> MethodOutput:
        s = self.settings
        t0 = time.perf_counter()
        vol = prepare_volume(hu, lung_labels, spacing, s.input, s.chunk)
        t1 = time.perf_counter()
        # thin slices: maps about z_step_mm apart, interpolated between
        stride = max(1, int(s.z_step_mm // float(spacing[0])))
        pred = predict_volume(self.net, vol.image, vol.mask, self.device, s, cam=self.cam, cam_stride=stride)
        t2 = time.perf_counter()
        heat = np.zeros(hu.shape, np.float32)
        heat_z = np.flatnonzero(pred.heat.reshape(pred.heat.shape[0], -1).any(axis=1))
        if heat_z.size:
            # the heat lies inside the ROI box (lungs plus a margin wider than the
            # dilation), so the resize and the lung dilation run on the box only
            b = vol.box
            zsel = vol.zs[heat_z]
            inside = dilated_mask(lung_labels[zsel, b.y0 : b.y1, b.x0 : b.x1] > 0, spacing, s.input.mask_dilation_mm)
            crop = paste_back(pred.heat[heat_z], Box2D(0, b.height, 0, b.width), (b.height, b.width))
            heat[zsel, b.y0 : b.y1, b.x0 : b.x1] = np.clip(crop, 0, 1) * inside
        t3 = time.perf_counter()
        scores = np.zeros(hu.shape[0], np.float32)
        scores[vol.zs] = pred.scores
        positive = vol.zs[pred.scores >= s.slice_threshold]
        ratio = float(positive.size / vol.zs.size) if vol.zs.size else 0.0
        return MethodOutput(
            probability=pred.probability,
            threshold=self.threshold,
            slice_scores=scores,
            positive_slices=positive,
            positive_slice_ratio=ratio,
            heatmap=heat,
            algorithm=self.algorithm,
            model_versions={WEIGHTS_NAME: self.model.version},
            timings_s={"preprocess": round(t1 - t0, 3),
                       "classification": round(t2 - t1 - pred.localisation_s, 3),
                       "localisation": round(t3 - t2 + pred.localisation_s, 3)},
            infection_threshold=self.infection_threshold,
            scored_slices=None,
        )


@register_pipeline(PIPELINE_NAME, "Method D: mask-fusion ResNeXt + CBAM, BiLSTM over slices, slice attention; "
                   "weakly supervised by volume labels (ResNeXt+, IEEE Access 2020)", weights=(WEIGHTS_NAME,))
def _factory(device: torch.device, weights_dir: Path | None) -> ResNeXtLSTMMethod:
    return ResNeXtLSTMMethod(load_model(WEIGHTS_NAME, weights_dir, device), device)
