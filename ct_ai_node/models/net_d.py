"""Method D network (weakly-supervised "ResNeXt+", IEEE Access 2020), built from MONAI
blocks at reduced width.

One forward pass takes the lung slices of ONE volume, in axial order, and returns the
volume's two logits (softmax outside: index 1 = COVID-19-like) and the slice attention
weights alpha (softmax over the slices), which act as slice-level predictions:

    slice (1ch) --7x7/2 conv--+
                              +--> BN, ReLU, 3x3/2 max pool --> ResNeXt stages (backbone)
    lung mask (1ch) --7x7/2 --+
    --> CBAM (channel attention: avg+max pool, shared MLP, reduction r, sigmoid;
              spatial attention: avg+max over channels, concat, 9x9 conv, sigmoid)
    --> global average pool (one feature vector per slice)
    --> bidirectional LSTM along z
    --> slice attention e_n = w2 . tanh(W1 h_n), alpha = softmax_n(e)
    --> v = sum_n alpha_n h_n --> FC(hidden) --> ReLU --> FC(2)

Compared with the paper: ResNeXt-50 layout (bottleneck blocks 3-4-6-3, grouped 3x3
convolutions, "32x4d" group width 4) at a quarter of the width (stage outputs
64/128/256/512 instead of 256..2048, cardinality 8 instead of 32), no ImageNet
pre-training; LSTM 64 per direction instead of 512; FC hidden 128 instead of 1024.
The last stage keeps stride 1 (as method C's backbone does), so the last-stage maps are
1/16 of the input (8x8 for a 128 input) rather than 1/32.

The network is split into :attr:`ResNeXtLSTM.backbone` (per slice, run in chunks at
inference so memory stays bounded) and :attr:`ResNeXtLSTM.head` (CBAM, pooling, LSTM,
attention, classifier: cheap, run on the whole sequence at once). The localisation map
(see ``ct_ai_node/pipeline/method_d.py``) reads the first stage's output (1/4 of the
input) through :class:`TailLogOdds`, a backward pass through the later stages and the
head for the slices that get a map.

Normalisation: batch norm as in ResNeXt (``norm="batch"``). Training therefore puts the
slices of several volumes in one backbone batch (with one volume per step the batch
statistics come from that volume alone and erase what tells volumes apart; the paper's
backbone was ImageNet pre-trained, ours is not); ``norm="group"`` is available as an
alternative that does not depend on the batch.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

from ct_ai_node.models.networks import register

ARCHITECTURE = "resnext_cbam_bilstm"


def _norm_arg(norm: str, channels: int):
    """MONAI norm spec: "batch", or "group" (GroupNorm, groups of 8 channels at most 32 groups)."""
    if norm == "batch":
        return "BATCH"
    if norm == "group":
        return ("GROUP", {"num_groups": max(1, min(32, channels // 8))})
    raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(_norm_arg(norm, channels)[1]["num_groups"], channels)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True,
          norm: str = "batch") -> Convolution:
    """Conv (no bias) + norm (+ ReLU) as one MONAI block."""
    return Convolution(2, cin, cout, strides=stride, kernel_size=k, adn_ordering="NA", act="RELU" if act else None,
                       norm=_norm_arg(norm, cout), groups=groups, bias=False)


class ResNeXtBottleneck(nn.Module):
    """1x1 reduce -> grouped 3x3 (cardinality ``groups``) -> 1x1 expand, identity or
    projection shortcut, ReLU after the sum (Xie et al., ResNeXt, form (c))."""

    def __init__(self, cin: int, width: int, cout: int, groups: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        self.conv1 = _conv(cin, width, 1, norm=norm)
        self.conv2 = _conv(width, width, 3, stride=stride, groups=groups, norm=norm)
        self.conv3 = _conv(width, cout, 1, act=False, norm=norm)
        self.shortcut = (_conv(cin, cout, 1, stride=stride, act=False, norm=norm) if (stride != 1 or cin != cout)
                         else nn.Identity())
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


class MaskFusionStem(nn.Module):
    """The slice and its lung mask each pass through a 7x7 stride-2 convolution; the two
    are summed, then batch norm, ReLU and a 3x3 stride-2 max pool (the ResNeXt stem)."""

    def __init__(self, cout: int, norm: str = "batch"):
        super().__init__()
        self.conv_image = nn.Conv2d(1, cout, 7, stride=2, padding=3, bias=False)
        self.conv_mask = nn.Conv2d(1, cout, 7, stride=2, padding=3, bias=False)
        self.bn = _norm_layer(norm, cout)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (n, 2, H, W), channel 0 the slice, channel 1 its lung mask."""
        fused = self.conv_image(x[:, :1]) + self.conv_mask(x[:, 1:2])
        return self.pool(self.act(self.bn(fused)))


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 9):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): channel then spatial attention.
    The last spatial map is kept in :attr:`last_spatial` (n, 1, h, w) for inspection."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 9):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)
        self.last_spatial: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        s = self.spatial(x)
        self.last_spatial = s.detach()
        return x * s


class SliceAttention(nn.Module):
    """Two-layer FC with tanh: one energy per slice, softmax over the slices."""

    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h``: (n, features) -> alpha (n,), summing to 1."""
        return torch.softmax(self.fc2(torch.tanh(self.fc1(h)))[:, 0], dim=0)


class VolumeHead(nn.Module):
    """CBAM on the last-stage maps of every slice, global average pooling, BiLSTM along
    z, slice attention and the classifier. Input (n, C, h, w) for the n slices of one
    volume in axial order; output (logits (1, 2), alpha (n,))."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 9, lstm_hidden: int = 64,
                 attention_hidden: int = 64, fc_hidden: int = 128, dropout: float = 0.3, num_classes: int = 2):
        super().__init__()
        self.cbam = CBAM(channels, reduction, spatial_kernel)
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(channels, lstm_hidden, batch_first=True, bidirectional=True)
        self.attention = SliceAttention(2 * lstm_hidden, attention_hidden)
        self.classifier = nn.Sequential(
            nn.Linear(2 * lstm_hidden, fc_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_hidden, num_classes),
        )

    def slice_features(self, maps: torch.Tensor) -> torch.Tensor:
        return self.cbam(maps).mean(dim=(2, 3))

    def sequence(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C) slice features -> (logits (1, classes), alpha (n,))."""
        h, _ = self.lstm(self.dropout(feats)[None])
        h = h[0]
        alpha = self.attention(h)
        v = (alpha[:, None] * h).sum(dim=0, keepdim=True)
        return self.classifier(v), alpha

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sequence(self.slice_features(maps))


class TailLogOdds(nn.Module):
    """For a map below the head: the log-odds logit(COVID) - logit(other) as a function of
    the activations after ``backbone[:split]`` of some slices (``index``), the other
    slices' last-stage ``maps`` held fixed. The target layer is :attr:`entry`."""

    def __init__(self, net: "ResNeXtLSTM", split: int):
        super().__init__()
        self.entry = nn.Identity()
        self.tail = nn.Sequential(*list(net.backbone)[split:])
        self.head = net.head

    def forward(self, feats: torch.Tensor, maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        full = maps.index_copy(0, index, self.tail(self.entry(feats)))
        logits, _ = self.head(full)
        return logits[:, 1:2] - logits[:, 0:1]


class ResNeXtLSTM(nn.Module):
    def __init__(self, width: int = 16, cardinality: int = 8, layers: tuple[int, ...] = (3, 4, 6, 3),
                 last_stride: int = 1, reduction: int = 16, spatial_kernel: int = 9, lstm_hidden: int = 64,
                 attention_hidden: int = 64, fc_hidden: int = 128, dropout: float = 0.3, norm: str = "batch"):
        super().__init__()
        # ResNeXt-50 (32x4d): stem 64 channels, stage i has grouped width 128*2^i (32 groups
        # of 4*2^i) and outputs 256*2^i; here every width is scaled by width/64 and the
        # cardinality is ``cardinality`` (group width 4*2^i kept for width=16, cardinality=8)
        stages: list[nn.Module] = []
        cin = width
        for i, n_blocks in enumerate(layers):
            inner = 2 * width * 2**i
            if inner % cardinality:
                raise ValueError(f"grouped width {inner} is not divisible by cardinality {cardinality}")
            cout = 4 * width * 2**i
            stride = 1 if i == 0 else (last_stride if i == len(layers) - 1 else 2)
            blocks = [ResNeXtBottleneck(cin if b == 0 else cout, inner, cout, cardinality,
                                        stride if b == 0 else 1, norm) for b in range(n_blocks)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.backbone = nn.Sequential(MaskFusionStem(width, norm), *stages)
        self.out_channels = cin
        self.head = VolumeHead(cin, reduction, spatial_kernel, lstm_hidden, attention_hidden, fc_hidden, dropout)

    def backbone_maps(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(n, 2, H, W) -> last-stage maps (n, C, h, w), ``chunk`` slices at a time."""
        if not chunk or x.shape[0] <= chunk:
            return self.backbone(x)
        return torch.cat([self.backbone(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: (n, 2, H, W), the n slices of one volume in axial order (channel 0 the
        slice in [0, 1], channel 1 its lung mask). Returns (logits (1, 2), alpha (n,))."""
        return self.head(self.backbone_maps(x, chunk))


@register(ARCHITECTURE)
def build_resnext_cbam_bilstm(**kwargs) -> nn.Module:
    if "layers" in kwargs:
        kwargs["layers"] = tuple(kwargs["layers"])
    return ResNeXtLSTM(**kwargs)
