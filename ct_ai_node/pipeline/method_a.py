"""Method A (Frid-Adar et al., "RADLogics"): slice classifier on lung-ROI crops,
fused multi-resolution Grad-CAM, case decision by the positive-slice ratio."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ct_ai_node import __version__
from ct_ai_node.models.weights import LoadedModel, load_model
from ct_ai_node.pipeline.geometry import strided_indices
from ct_ai_node.pipeline.localisation import FusedGradCAM
from ct_ai_node.pipeline.methods import MethodOutput, ratio_decision_output, register_pipeline
from ct_ai_node.pipeline.scoring import CaseDecision
from ct_ai_node.pipeline.slice_input import (
    SliceBatch,
    SliceInputSettings,
    lung_slice_indices,
    roi_box,
    slice_maps_in_volume,
    strided_scores,
)
from ct_ai_node.pipeline.types import AlgorithmInfo

WEIGHTS_NAME = "method_a_slice_classifier"


@dataclass(frozen=True)
class MethodASettings:
    batch_size: int = 16
    #: Grad-CAM is computed for slices scoring at least this (others are clearly
    #: negative; their map would be noise and costs a backward pass)
    gradcam_min_score: float = 0.3
    #: on thin-slice scans classification and Grad-CAM run on slices about this far
    #: apart; the scores and maps between are interpolated (neighbours 1 mm apart are
    #: nearly the same image, and the maps are coarse: 14x14 and 28x28)
    z_step_mm: float = 2.5
    input: SliceInputSettings = SliceInputSettings()


class RadLogicsMethod:
    name = "radlogics"

    def __init__(self, model: LoadedModel, device: torch.device, settings: MethodASettings | None = None):
        self.model = model
        self.device = device
        self.settings = settings or MethodASettings()
        meta = model.metadata
        self.decision = CaseDecision(**json.loads(meta["case_decision"])) if "case_decision" in meta else CaseDecision()
        self.infection_threshold = float(meta["infection_threshold"]) if "infection_threshold" in meta else None
        # channels-last: oneDNN's convolutions run about 1.5x faster on CPU (same results to 1e-5)
        net = model.module.to(device, memory_format=torch.channels_last).eval()
        # Gradients are needed only from the logit down to layer2 (the finer CAM layer).
        for part in (net.backbone.conv1, net.backbone.bn1, net.backbone.layer1):
            for p in part.parameters():
                p.requires_grad_(False)
        self.cam = FusedGradCAM(net)
        self.algorithm = AlgorithmInfo(
            name="ct-ai-node method A (slice ResNet + fused Grad-CAM)",
            version=f"{__version__}/{model.version}",
        )

    @torch.no_grad()
    def _scores(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], self.settings.batch_size):
            logits = self.model.module(x[i : i + self.settings.batch_size].to(self.device, memory_format=torch.channels_last))
            out.append(torch.sigmoid(logits[:, 0]).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def _maps(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], self.settings.batch_size):
            _, fused = self.cam(x[i : i + self.settings.batch_size].to(self.device, memory_format=torch.channels_last))
            out.append(fused.cpu())
        return torch.cat(out).numpy() if out else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)

    def __call__(self, hu, spacing, orientation, lung_labels) -> MethodOutput:
        s = self.settings
        t0 = time.perf_counter()
        lung = lung_labels > 0
        zs = lung_slice_indices(lung, s.input.min_lung_fraction)
        batch = SliceBatch(hu, lung, roi_box(lung, spacing, s.input), spacing, s.input)
        # thin-slice scans: classify slices about z_step_mm apart (and both ends of the lung
        # range); scores of the slices between are interpolated along z
        stride = max(1, int(s.z_step_mm // spacing[0]))
        scores, run_z = strided_scores(batch, zs, stride, self._scores)
        t1 = time.perf_counter()
        # Grad-CAM on candidate slices about z_step_mm apart (and at the ends of every run
        # of candidates); the maps between are interpolated along z
        cand = zs[scores[zs] >= s.gradcam_min_score]
        heat = slice_maps_in_volume(batch, strided_indices(cand, stride), self._maps, cand)
        t2 = time.perf_counter()
        return ratio_decision_output(
            self.decision, scores, zs, heat, algorithm=self.algorithm,
            model_versions={WEIGHTS_NAME: self.model.version},
            timings_s={"classification": round(t1 - t0, 3), "localisation": round(t2 - t1, 3)},
            infection_threshold=self.infection_threshold, scored_slices=run_z,
        )


@register_pipeline("radlogics", "Method A: slice ResNet-50 layout on lung-ROI crops, fused 14x14/28x28 Grad-CAM, "
                   "positive-slice ratio (Frid-Adar et al. 2020)", weights=(WEIGHTS_NAME,))
def _factory(device: torch.device, weights_dir: Path | None) -> RadLogicsMethod:
    return RadLogicsMethod(load_model(WEIGHTS_NAME, weights_dir, device), device)
