"""Method B (COVID CT-Net, Yazdani, Minaee et al. 2020): a residual attention network
classifies 2D lung-ROI slices (COVID-19-like vs other); Grad-CAM, Grad-CAM++ on the
third attention block, or an occlusion map explain them; the case decision is the
positive-slice ratio, as in method A.

Inputs are method A's slice crops (:mod:`ct_ai_node.pipeline.slice_input`): the square
lung ROI (+10 mm), outside the 4 mm-dilated lung mask set to -1000 HU, clipped to
[-1000, 0] HU, scaled to [0, 1], resized to the network's input size (224 by default,
stored in the weights metadata as ``input_size``).

Explanations (``MethodBSettings.explanation``):

* ``"gradcampp"`` (default) - Grad-CAM++ (MONAI ``GradCAMpp``) of ``attention3``
  (14x14 for a 224 input), min-max normalised per slice, upsampled to the input size;
  on candidate slices (score >= ``cam_min_score``) about ``z_step_mm`` apart,
  interpolated along z between them. Default because Grad-CAM++ weights the positive
  gradients per location and so covers several separate lesions on one slice better
  than Grad-CAM (multifocal COVID-19 lesions), at the cost of Grad-CAM.
* ``"gradcam"`` - Grad-CAM (MONAI ``GradCAM``) of the same layer, same slices.
* ``"occlusion"`` - MONAI ``OcclusionSensitivity``: an NxN patch of the input is set
  to 0 (-1000 HU: air, the paper's zeroed patch), slid with stride S; the heat is the
  drop of the COVID probability where the patch covers a pixel, ``max(p - p_occluded,
  0)``, normalised to [0, 1] per slice (where the drop takes the slice below the
  slice threshold, the prediction flips to non-COVID). It costs one forward pass per
  patch position (N=32, S=16 on 224: 13x13 = 169 passes, about 10 s per slice on one
  CPU thread at width 16), so it runs only on the ``top_k`` (default 3) highest-scoring
  candidate slices; every other slice has no heat. Use it for explanation figures, not
  for infection volumes.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity
from torch import nn

from ct_ai_node import __version__
from ct_ai_node.errors import ModelError, WeightsMissing
from ct_ai_node.models import net_b  # noqa: F401  (registers "residual_attention_2d" for load_model)
from ct_ai_node.models.net_b import ARCHITECTURE, CAM_LAYER
from ct_ai_node.models.weights import BUNDLED_WEIGHTS, LoadedModel, load_model
from ct_ai_node.pipeline.geometry import strided_indices
from ct_ai_node.pipeline.methods import MethodOutput, ratio_decision_output, register_pipeline
from ct_ai_node.pipeline.scoring import CaseDecision, top_slices
from ct_ai_node.pipeline.slice_input import (
    SliceBatch,
    SliceInputSettings,
    dilated_mask,
    lung_slice_indices,
    paste_back,
    roi_box,
    slice_maps_in_volume,
    slice_tensors,
    strided_scores,
)
from ct_ai_node.pipeline.types import AlgorithmInfo

PIPELINE_NAME = "ctnet"
WEIGHTS_NAME = "method_b_attention"
EXPLANATIONS = ("gradcam", "gradcampp", "occlusion")


@dataclass(frozen=True)
class OcclusionSettings:
    #: N: side of the zeroed square patch, in network-input pixels (32 of 224: about
    #: 40 mm for a 300 mm lung ROI, the size of a GGO patch)
    patch: int = 32
    #: S: stride of the patch (MONAI's overlap = 1 - S / N)
    stride: int = 16
    #: occlusion runs on this many highest-scoring candidate slices only
    top_k: int = 3
    #: occluded copies per forward pass
    n_batch: int = 16


@dataclass(frozen=True)
class MethodBSettings:
    batch_size: int = 16
    #: "gradcampp", "gradcam" or "occlusion" (see the module docstring)
    explanation: str = "gradcampp"
    #: explanations are computed for slices scoring at least this
    cam_min_score: float = 0.3
    #: classification and Grad-CAM run on slices about this far apart; the scores and
    #: maps between are interpolated along z (as in method A)
    z_step_mm: float = 2.5
    occlusion: OcclusionSettings = field(default_factory=OcclusionSettings)
    #: None: method A's crop settings at the input size the weights were trained at
    input: SliceInputSettings | None = None


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1]; an all-constant map becomes zeros. (MONAI's
    default CAM normaliser maps the maximum to 0, the wrong way round for a heat map.)"""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1e-8)
    return ((flat - lo) / span * (hi - lo > 1e-8)).view_as(maps)


class BatchGradCAMpp(GradCAMpp):
    """MONAI's Grad-CAM++ with the class score broadcast per sample.

    ``GradCAMpp.compute_map`` multiplies the gradients (b, c, h, w) by ``score.exp()``
    of shape (b,), which lines up with the last (width) axis when b > 1. Here the
    score is reshaped to (b, 1, 1, 1) (and clipped before ``exp`` so a confident logit
    cannot overflow); the rest is MONAI's formula. With b = 1 both agree."""

    def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        acti, grad = acti[layer_idx], grad[layer_idx]
        b, c, *spatial = grad.shape
        ones = [1] * len(spatial)
        alpha_nr = grad.pow(2)
        alpha_dr = alpha_nr.mul(2) + acti.mul(grad.pow(3)).view(b, c, -1).sum(-1).view(b, c, *ones)
        alpha_dr = torch.where(alpha_dr != 0.0, alpha_dr, torch.ones_like(alpha_dr))
        alpha = alpha_nr.div(alpha_dr + 1e-7)
        score = self.nn_module.score.detach().reshape(b, 1, *ones).clamp(-30.0, 30.0)
        relu_grad = F.relu(score.exp() * grad)
        weights = (alpha * relu_grad).view(b, c, -1).sum(-1).view(b, c, *ones)
        return F.relu((weights * acti).sum(1, keepdim=True))


def occlusion_map(net: nn.Module, x: torch.Tensor, settings: OcclusionSettings = OcclusionSettings(),
                  slice_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Occlusion sensitivity of (n, 1, H, W) inputs, one slice at a time (MONAI
    ``OcclusionSensitivity``, patch N = ``settings.patch`` set to 0, stride S).

    Returns ``(heat, flips, p)``: heat (n, H, W) = max(p - p_occluded, 0) normalised to
    [0, 1] per slice; flips (n, H, W) bool, where occluding takes a slice called
    positive (p >= ``slice_threshold``) below the threshold, i.e. the prediction flips
    from COVID to non-COVID; p (n,) the unoccluded probabilities."""
    n_pix = x.shape[-1]
    patch = min(int(settings.patch), n_pix)
    overlap = 1.0 - min(max(int(settings.stride), 1), patch) / patch
    occ = OcclusionSensitivity(net, mask_size=patch, n_batch=settings.n_batch, verbose=False, mode=0.0,
                               overlap=overlap, activate=True)
    heats, flips, probs = [], [], []
    with torch.no_grad():
        p = torch.sigmoid(net(x)[:, 0].float()).cpu()
    for i in range(x.shape[0]):
        with torch.no_grad(), warnings.catch_warnings():
            # MONAI indexes with lists of slices (deprecated in torch, still correct)
            warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
            sens, _ = occ(x[i : i + 1])
        p_occ = sens[0, 0].float().cpu()  # probability with the patch over each pixel
        drop = (p[i] - p_occ).clamp_min(0.0)
        heats.append(_minmax(drop[None])[0].numpy())
        flips.append(((p_occ < slice_threshold) & (p[i] >= slice_threshold)).numpy())
        probs.append(float(p[i]))
    H, W = x.shape[-2:]
    if not heats:
        return np.zeros((0, H, W), np.float32), np.zeros((0, H, W), bool), np.zeros(0, np.float32)
    return np.stack(heats).astype(np.float32), np.stack(flips), np.asarray(probs, np.float32)


class SliceExplainer:
    """(n, 1, H, W) inputs -> (n, H, W) maps in [0, 1] with the chosen explanation."""

    def __init__(self, net: nn.Module, kind: str, occlusion: OcclusionSettings = OcclusionSettings(),
                 slice_threshold: float = 0.5):
        if kind not in EXPLANATIONS:
            raise ValueError(f"unknown explanation {kind!r}; use one of {', '.join(EXPLANATIONS)}")
        self.net = net
        self.kind = kind
        self.occlusion = occlusion
        self.slice_threshold = slice_threshold
        self.cam = None
        if kind == "gradcam":
            self.cam = GradCAM(net, target_layers=CAM_LAYER, postprocessing=_minmax)
        elif kind == "gradcampp":
            self.cam = BatchGradCAMpp(net, target_layers=CAM_LAYER, postprocessing=_minmax)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, *x.shape[-2:]), np.float32)
        if self.cam is None:
            return occlusion_map(self.net, x, self.occlusion, self.slice_threshold)[0]
        with warnings.catch_warnings(), torch.enable_grad():
            # the input needs no gradient; the hooks still get attention3's output gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            maps = self.cam(x, class_idx=0)
        return maps[:, 0].detach().float().clamp(0.0, 1.0).cpu().numpy()


class CTNetMethod:
    name = PIPELINE_NAME

    def __init__(self, model: LoadedModel, device: torch.device, settings: MethodBSettings | None = None):
        s = settings or MethodBSettings()
        if s.explanation not in EXPLANATIONS:
            raise ValueError(f"unknown explanation {s.explanation!r}; use one of {', '.join(EXPLANATIONS)}")
        meta = model.metadata
        if s.input is None:
            s = replace(s, input=SliceInputSettings(size=int(meta.get("input_size", 224))))
        self.settings = s
        self.model = model
        self.device = device
        self.decision = CaseDecision(**json.loads(meta["case_decision"])) if "case_decision" in meta else CaseDecision()
        key = f"infection_threshold_{s.explanation}"
        self.infection_threshold = float(meta[key]) if key in meta else None
        net = model.module.to(device).eval()
        # only attention3 needs parameter gradients for the hooks to fire on its output;
        # gradients of earlier layers would be computed for nothing
        for name, p in net.named_parameters():
            p.requires_grad_(name.startswith(CAM_LAYER + "."))
        self.net = net
        self.explainer = SliceExplainer(net, s.explanation, s.occlusion, self.decision.slice_threshold)
        # one explainer per kind: MONAI's CAMs add hooks to the network that are never removed
        self._explainers = {s.explanation: self.explainer}
        self.algorithm = AlgorithmInfo(
            name=f"ct-ai-node method B (COVID CT-Net residual attention + {s.explanation})",
            version=f"{__version__}/{model.version}",
        )

    @torch.no_grad()
    def _scores(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], self.settings.batch_size):
            logits = self.net(x[i : i + self.settings.batch_size].to(self.device))
            out.append(torch.sigmoid(logits[:, 0].float()).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def _maps(self, x: torch.Tensor) -> np.ndarray:
        out = [self.explainer(x[i : i + self.settings.batch_size].to(self.device))
               for i in range(0, x.shape[0], self.settings.batch_size)]
        return np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)

    def _inputs(self, hu, lung, box, spacing, zs) -> torch.Tensor:
        return slice_tensors(hu[zs], lung[zs], box, spacing, self.settings.input)

    def explain_slices(self, hu: np.ndarray, spacing, lung_labels: np.ndarray, slices: Sequence[int],
                       kinds: Sequence[str] = EXPLANATIONS) -> dict[str, np.ndarray]:
        """Maps of several explanations for the given slices, in slice geometry:
        ``{kind: (n, y, x) float32 in [0, 1]}``, zero outside the dilated lungs; plus
        ``"score"`` (n,). For figures comparing Grad-CAM, Grad-CAM++ and occlusion."""
        s = self.settings
        lung = lung_labels > 0
        zs = np.asarray(slices, dtype=int)
        box = roi_box(lung, spacing, s.input)
        x = self._inputs(hu, lung, box, spacing, zs)
        inside = dilated_mask(lung[zs], spacing, s.input.mask_dilation_mm)
        out: dict[str, np.ndarray] = {"score": self._scores(x)}
        for kind in kinds:
            if kind not in self._explainers:
                self._explainers[kind] = SliceExplainer(self.net, kind, s.occlusion, self.decision.slice_threshold)
            ex = self._explainers[kind]
            parts = [ex(x[i : i + s.batch_size].to(self.device)) for i in range(0, len(zs), s.batch_size)]
            maps = np.concatenate(parts) if parts else np.zeros((0, s.input.size, s.input.size), np.float32)
            out[kind] = paste_back(maps, box, hu.shape[1:]) * inside
        return out

    def __call__(self, hu, spacing, orientation, lung_labels) -> MethodOutput:
        s = self.settings
        t0 = time.perf_counter()
        lung = lung_labels > 0
        zs = lung_slice_indices(lung, s.input.min_lung_fraction)
        batch = SliceBatch(hu, lung, roi_box(lung, spacing, s.input), spacing, s.input)
        stride = max(1, int(s.z_step_mm // spacing[0]))
        scores, run_z = strided_scores(batch, zs, stride, self._scores)
        t1 = time.perf_counter()
        cand = zs[scores[zs] >= s.cam_min_score]
        if s.explanation == "occlusion":
            # expensive: only the top_k scored (not interpolated) candidates, no filling between
            scored_cand = np.intersect1d(cand, run_z)
            map_z = np.array(sorted(top_slices(scores, scored_cand, s.occlusion.top_k)), dtype=int)
            heat = slice_maps_in_volume(batch, map_z, self._maps, None)
        else:
            heat = slice_maps_in_volume(batch, strided_indices(cand, stride), self._maps, cand)
        t2 = time.perf_counter()
        return ratio_decision_output(
            self.decision, scores, zs, heat, algorithm=self.algorithm,
            model_versions={WEIGHTS_NAME: self.model.version},
            timings_s={"classification": round(t1 - t0, 3), "localisation": round(t2 - t1, 3)},
            infection_threshold=self.infection_threshold, scored_slices=run_z,
        )


def load_method_b(device: torch.device | str = "cpu", weights_dir: Path | None = None,
                  settings: MethodBSettings | None = None) -> CTNetMethod:
    """Load the hash-checked weights and build the method; a missing or foreign weight
    file raises :class:`ModelError` with a one-line reason."""
    device = torch.device(device)
    folder = Path(weights_dir) if weights_dir else BUNDLED_WEIGHTS
    if not (folder / f"{WEIGHTS_NAME}.safetensors").is_file():
        raise WeightsMissing(f"method B weights {WEIGHTS_NAME}.safetensors not found in {folder}; train them with "
                         "ct_ai_node.training.train_b.train_method_b or bring weights")
    loaded = load_model(WEIGHTS_NAME, folder, device)
    arch = loaded.metadata.get("architecture")
    if arch != ARCHITECTURE:
        raise ModelError(f"{WEIGHTS_NAME}.safetensors holds a {arch!r} network, method B needs {ARCHITECTURE!r}")
    return CTNetMethod(loaded, device, settings)


@register_pipeline(PIPELINE_NAME, "Method B: COVID CT-Net residual attention network (Attention-56 layout, p=1 t=2 "
                   "r=1) on lung-ROI slices, Grad-CAM++ of the third attention block, positive-slice ratio "
                   "(Yazdani, Minaee et al. 2020)", weights=(WEIGHTS_NAME,))
def _factory(device: torch.device, weights_dir: Path | None) -> CTNetMethod:
    return load_method_b(device, weights_dir)
