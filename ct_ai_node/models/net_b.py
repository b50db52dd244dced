"""Method B network (COVID CT-Net, Yazdani, Minaee et al. 2020): a 2D residual
attention network (Wang et al., "Residual Attention Network for Image
Classification", CVPR 2017) in the Attention-56 layout, at reduced width, with one
logit (COVID-19-like vs other; sigmoid outside).

Layout for a 224x224 lung-ROI slice (feature map sizes in brackets)::

    stem        7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2      [56]
    res1        residual unit                    -> 4w channels          [56]
    attention1  attention module, soft mask with 3 max-pool levels     [56]
    res2        residual unit, stride 2          -> 8w                   [28]
    attention2  attention module, 2 max-pool levels                    [28]
    res3        residual unit, stride 2          -> 16w                  [14]
    attention3  attention module, 1 max-pool level                     [14]  <- Grad-CAM layer
    res4        3 residual units, the first stride 2 -> 32w              [7]
    head        BN, ReLU, global average pool, linear -> 1 logit

Every attention module has the hyper-parameters of the paper, p=1, t=2, r=1: one
residual unit before the split and one after the merge (p), two in the trunk branch
T(x) (t), one between adjacent pooling layers of the soft-mask branch M(x) (r). The
soft mask goes bottom-up by max-pooling + residual units and top-down by bilinear
interpolation (with the skip connections of Wang et al.), then BN-ReLU-conv1x1 twice
and a sigmoid; the module's output is H(x) = (1 + M(x)) * T(x).

Residual units are pre-activation bottlenecks (BN-ReLU-conv 1x1, 3x3, 1x1, as in
Wang et al.) built from MONAI's ``ADN`` and ``Convolution`` blocks. The published
network has w = 64 (31.9 M parameters); the default here is w = 16 (channels
64-128-256-512, about 2 M parameters, about 4 MB as fp16), same depth and structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import ADN, Convolution
from torch import nn

from ct_ai_node.models.networks import register

ARCHITECTURE = "residual_attention_2d"
#: the module whose output Grad-CAM / Grad-CAM++ explain ("third attention block")
CAM_LAYER = "attention3"


def _preact_conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """BN -> ReLU -> conv (pre-activation ordering)."""
    return nn.Sequential(
        ADN(ordering="NA", in_channels=cin, act="relu", norm="batch", norm_dim=2),
        Convolution(2, cin, cout, strides=stride, kernel_size=kernel, bias=False, conv_only=True),
    )


class ResidualUnit(nn.Module):
    """Pre-activation bottleneck residual unit: (BN-ReLU-conv1x1) -> (BN-ReLU-conv3x3,
    stride) -> (BN-ReLU-conv1x1) plus the identity, or a strided 1x1 projection when the
    shape changes. ``cout`` is the unit's output width (4x the bottleneck width)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = max(cout // 4, 1)
        self.body = nn.Sequential(
            _preact_conv(cin, mid, 1),
            _preact_conv(mid, mid, 3, stride),
            _preact_conv(mid, cout, 1),
        )
        self.shortcut = None
        if cin != cout or stride != 1:
            self.shortcut = Convolution(2, cin, cout, strides=stride, kernel_size=1, bias=False, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + identity


def _units(c: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[ResidualUnit(c, c) for _ in range(n)])


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class _MaskLevel(nn.Module):
    """One level of the soft-mask branch: max-pool + r units going down; at the bottom
    r more units; otherwise the deeper level's interpolated output + this level's
    features + a skip unit, then r units going up. Returns features at this level's
    (pooled) resolution; the caller interpolates them back up."""

    def __init__(self, c: int, depth: int, r: int):
        super().__init__()
        self.down = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=2, padding=1), *_units(c, r))
        self.inner = _MaskLevel(c, depth - 1, r) if depth > 1 else None
        self.skip = ResidualUnit(c, c) if depth > 1 else None
        self.up = _units(c, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.down(x)
        if self.inner is not None:
            s = _upsample(self.inner(s), s) + s + self.skip(s)
        return self.up(s)


class SoftMaskBranch(nn.Module):
    """M(x) in [0, 1]: bottom-up max-pooling (``depth`` levels) and residual units,
    top-down bilinear interpolation, then (BN-ReLU-conv1x1) x 2 and a sigmoid."""

    def __init__(self, c: int, depth: int, r: int = 1):
        super().__init__()
        self.levels = _MaskLevel(c, depth, r)
        self.out = nn.Sequential(_preact_conv(c, c, 1), _preact_conv(c, c, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor, trunk: torch.Tensor) -> torch.Tensor:
        return self.out(_upsample(self.levels(x), x) + trunk)


class AttentionModule(nn.Module):
    """Residual attention module: p units, then trunk T(x) (t units) and soft mask M(x),
    merged as H = (1 + M) * T, then p units."""

    def __init__(self, c: int, mask_depth: int, p: int = 1, t: int = 2, r: int = 1):
        super().__init__()
        self.pre = _units(c, p)
        self.trunk = _units(c, t)
        self.mask = SoftMaskBranch(c, mask_depth, r)
        self.post = _units(c, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        mask = self.mask(x, trunk)
        return self.post((1.0 + mask) * trunk)


class ResidualAttentionNet2D(nn.Module):
    """Attention-56 layout (three attention stages, p=1, t=2, r=1) on one-channel
    slices; ``width`` w sets the channels (4w, 8w, 16w, 32w); one logit."""

    def __init__(self, width: int = 16, in_channels: int = 1, p: int = 1, t: int = 2, r: int = 1,
                 mask_depths: tuple[int, int, int] = (3, 2, 1)):
        super().__init__()
        w = int(width)
        self.stem = nn.Sequential(
            Convolution(2, in_channels, w, strides=2, kernel_size=7, adn_ordering="NA", act="relu", norm="batch",
                        bias=False),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.res1 = ResidualUnit(w, 4 * w)
        self.attention1 = AttentionModule(4 * w, mask_depths[0], p, t, r)
        self.res2 = ResidualUnit(4 * w, 8 * w, stride=2)
        self.attention2 = AttentionModule(8 * w, mask_depths[1], p, t, r)
        self.res3 = ResidualUnit(8 * w, 16 * w, stride=2)
        self.attention3 = AttentionModule(16 * w, mask_depths[2], p, t, r)
        self.res4 = nn.Sequential(ResidualUnit(16 * w, 32 * w, stride=2), ResidualUnit(32 * w, 32 * w),
                                  ResidualUnit(32 * w, 32 * w))
        self.final = ADN(ordering="NA", in_channels=32 * w, act="relu", norm="batch", norm_dim=2)
        self.fc = nn.Linear(32 * w, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.attention1(self.res1(x))
        x = self.attention2(self.res2(x))
        x = self.attention3(self.res3(x))
        return self.final(self.res4(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


@register(ARCHITECTURE)
def build_residual_attention_2d(width: int = 16, p: int = 1, t: int = 2, r: int = 1) -> nn.Module:
    return ResidualAttentionNet2D(width=width, p=p, t=t, r=r)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
