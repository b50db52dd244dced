"""Batch augmentations on the device: geometry (rotation, scale, shift, flip) and
scanner variation (HU offset and gain, noise, blur). Inputs are (n, 1, H, W) in [0, 1]
where 0 is -1000 HU and 1 is 0 HU. The ranges aim at the spread between scanners and
reconstruction kernels, so a model trained on phantoms leans less on their exact look."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, *others: torch.Tensor, rot_deg: float = 15.0, scale=(0.85, 1.15),
                  shift: float = 0.08, flip: bool = True, generator: torch.Generator | None = None):
    """Apply one random affine per sample to ``x`` (bilinear) and ``others`` (nearest)."""
    n = x.shape[0]
    dev = x.device
    g = generator
    ang = (torch.rand(n, device=dev, generator=g) * 2 - 1) * math.radians(rot_deg)
    sc = torch.empty(n, device=dev).uniform_(*scale, generator=g)
    tx = (torch.rand(n, device=dev, generator=g) * 2 - 1) * shift * 2
    ty = (torch.rand(n, device=dev, generator=g) * 2 - 1) * shift * 2
    fl = torch.where(torch.rand(n, device=dev, generator=g) < (0.5 if flip else 0.0), -1.0, 1.0)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos * fl, -sin, tx], 1), torch.stack([sin * fl, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rest = [F.grid_sample(o.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False) for o in others]
    return (out, *rest)


def _gauss_kernel(sigma: float, device) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0.05:
        return x
    k = _gauss_kernel(sigma, x.device)
    r = k.numel() // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def scanner_variation(x: torch.Tensor, inside: torch.Tensor | None = None, hu_offset: float = 60.0,
                      gain: float = 0.08, noise_hu: tuple[float, float] = (0.0, 40.0), blur_px: float = 1.2,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """HU calibration offset and gain, extra noise and blur; only inside ``inside``
    when given (air outside the lungs stays air, as in the real inputs)."""
    n = x.shape[0]
    dev = x.device
    g = generator
    off = (torch.rand(n, 1, 1, 1, device=dev, generator=g) * 2 - 1) * hu_offset / 1000.0
    gn = 1 + (torch.rand(n, 1, 1, 1, device=dev, generator=g) * 2 - 1) * gain
    sig = torch.empty(n, 1, 1, 1, device=dev).uniform_(*noise_hu, generator=g) / 1000.0
    y = x * gn + off
    y = blur(y, float(torch.rand(1, generator=g).item() * blur_px)) if blur_px > 0 else y
    y = y + torch.randn(x.shape, device=dev, generator=g) * sig
    if inside is not None:
        y = torch.where(inside > 0, y, x)
    return y.clamp(0.0, 1.0)
