"""Grad-CAM family maps shared by the methods.

* :class:`FusedGradCAM` (method A, Frid-Adar et al.): Grad-CAM on the stride-8 and
  stride-16 layers (28x28 and 14x14 for a 224 input), each normalised to [0, 1], resized
  to the input size and multiplied. One forward and one backward pass serve both layers
  and the slice scores.
* :class:`HiResCAM` (method D): MONAI's ``GradCAM`` with the map of Draelos & Carin
  (2020), gradient times activation summed over channels, instead of Grad-CAM's
  channel-mean gradient weights. On an early, fine layer the channel mean washes out
  where in the map the gradient points; the element-wise product keeps it.

The activations and gradients come from MONAI's ``monai.visualize`` hooks
(``ModelWithHooks``).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import nn


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1]; an all-constant map becomes zeros."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1e-8)
    return ((flat - lo) / span * (hi - lo > 1e-8)).view_as(maps)


class FusedGradCAM:
    """Callable: (n, 1, H, W) input -> (logits (n,), fused map (n, H, W) in [0, 1])."""

    def __init__(self, model: nn.Module, target_layers: Sequence[str] = ("backbone.layer2", "backbone.layer3")):
        self.model = model
        self.target_layers = tuple(target_layers)
        self.hooks = ModelWithHooks(model, self.target_layers, register_forward=True, register_backward=True)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():
            # the input needs no gradient; the hooks still get the layer outputs' gradients
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            logits, acts, grads = self.hooks(x, class_idx=0)
        size = x.shape[-2:]
        fused = torch.ones((x.shape[0], *size), device=x.device)
        for a, g in zip(acts, grads):
            weights = g.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * a).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
            fused = fused * _normalise(cam)
        return logits.detach()[:, 0], fused.detach()


class HiResCAM(GradCAM):
    """``monai.visualize.GradCAM`` whose map is ReLU(sum_c dScore/dA_c * A_c) (HiResCAM)."""

    def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):  # type: ignore[override]
        _, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        return F.relu((grad[layer_idx] * acti[layer_idx]).sum(1, keepdim=True))
