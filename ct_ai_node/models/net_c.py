"""Method C network (Ouyang et al., IEEE TMI 2020, "Dual-Sampling Attention Network"):
a 3D ResNet34 layout with an online attention map (3D class activation map).

Structure as in the paper: MONAI 3D ``ResNet`` with basic blocks 3-4-6-3, the last
residual stage with stride 1 instead of 2, so the features before global average
pooling are 1/16 of the input (stride-2 stem, max-pool, stage 2 and stage 3 halve);
FC -> one logit (COVID-19-like vs other, where "other" is CAP-like and normal).
Width reduced from 64-128-256-512 to ``width`` x (1, 2, 4, 8) planes (16 by default:
about 4.0 M parameters instead of about 63 M; the bundled weights use width 8, 1.0 M
parameters, 2 MB in fp16, so that both models train on a 2-core CPU in minutes).

Online attention: ``A = ReLU(conv1x1x1(f, w))`` where ``w`` *is* the FC weight (shared
parameter, no copy, so the attention loss also trains the classifier's weights), upsampled
to the input size, min-max normalised to [0, 1] per volume, then
``T(A) = sigmoid(alpha (A - beta))`` with alpha = 100, beta = 0.4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from ct_ai_node.models.networks import register

ARCHITECTURE = "resnet34_3d_attention"
ALPHA = 100.0
BETA = 0.4


def normalise_per_volume(a: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Min-max normalise every sample of (B, 1, ...) to [0, 1]; a constant map becomes 0."""
    flat = a.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (a.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (a.dim() - 1)))
    return (a - lo) / (hi - lo).clamp_min(eps)


def soft_mask(a_norm: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """T(A) = 1 / (1 + exp(-alpha (A - beta)))."""
    return torch.sigmoid(alpha * (a_norm - beta))


def attention_loss(t: torch.Tensor, m: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample L_ex = sum (T(A) - M)^2 / (sum T(A) + sum M); shape (B,)."""
    t = t.flatten(1).float()
    m = m.flatten(1).float()
    return ((t - m) ** 2).sum(1) / (t.sum(1) + m.sum(1)).clamp_min(eps)


class ResNet34Attention3D(nn.Module):
    """3D ResNet34 (basic blocks 3-4-6-3, reduced width) with CAM attention.

    ``forward(x)`` -> logits (B, 1). ``attention(x)`` -> (logits, normalised A, T(A)) with
    the maps at the input size (B, 1, D, H, W). Input sizes should be multiples of 16.
    """

    def __init__(self, width: int = 16, in_channels: int = 1, alpha: float = ALPHA, beta: float = BETA):
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.backbone = ResNet(
            block="basic",
            layers=[3, 4, 6, 3],
            block_inplanes=planes,
            spatial_dims=3,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,  # MONAI's default stride-1 stem costs 4x the compute
            feed_forward=False,
        )
        # paper: stride 1 (not 2) in the last residual stage -> features at 1/16
        first = self.backbone.layer4[0]
        first.conv1.stride = (1, 1, 1)
        first.stride = 1
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1, 1)
        self.fc = nn.Linear(planes[3], 1)

    @property
    def features_channels(self) -> int:
        return self.fc.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.act(b.bn1(b.conv1(x)))
        x = b.maxpool(x)
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def head(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features -> (logits (B, 1), raw CAM ReLU(conv1x1x1(f, w_fc)) (B, 1, d, h, w))."""
        logits = self.fc(f.mean(dim=(2, 3, 4)))
        cam = F.relu(F.conv3d(f, self.fc.weight.view(1, -1, 1, 1, 1)))
        return logits, cam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, cam = self.head(self.features(x))
        # maps in fp32 even under autocast: T(A) is steep (alpha = 100)
        up = F.interpolate(cam.float(), size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)
        a = normalise_per_volume(up)
        return logits, a, soft_mask(a, self.alpha, self.beta)


@register(ARCHITECTURE)
def build_resnet34_3d_attention(width: int = 16, in_channels: int = 1) -> nn.Module:
    return ResNet34Attention3D(width=width, in_channels=in_channels)
