"""Network definitions, built from MONAI blocks.

Each builder is registered by architecture name so that weight files can say which
network they fit (``metadata["architecture"]``) and the loader can rebuild it.
Widths are reduced from the published ones so that CPU inference fits the node's
time budget and the weights fit in git; depth, block type and strides follow the
papers (see ``docs/models.md``).
"""

from __future__ import annotations

from typing import Callable

import torch
from monai.networks.nets import ResNet, UNet
from torch import nn

#: name -> builder(**kwargs) -> nn.Module
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def _wrap(fn):
        ARCHITECTURES[name] = fn
        return fn

    return _wrap


class SliceClassifier(nn.Module):
    """Method A slice classifier: a 2D ResNet-50 layout (bottleneck blocks 3-4-6-3)
    at reduced width, followed by two dense layers; one logit (sigmoid outside).

    ``backbone.layer2`` has stride 8 (28x28 for a 224 input) and ``backbone.layer3``
    stride 16 (14x14): the two Grad-CAM resolutions of Frid-Adar et al.
    """

    def __init__(self, width: int = 16, hidden: int = 128, in_channels: int = 1, dropout: float = 0.3):
        super().__init__()
        self.backbone = ResNet(
            block="bottleneck",
            layers=[3, 4, 6, 3],
            block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
        )
        features = 8 * width * 4  # bottleneck expansion
        self.head = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@register("slice_resnet50_w16")
def build_slice_classifier(width: int = 16, hidden: int = 128) -> nn.Module:
    return SliceClassifier(width=width, hidden=hidden)


def _unet2d(in_channels: int, out_channels: int, channels: tuple[int, ...]) -> nn.Module:
    """MONAI 2D U-Net with stride-2 levels, two residual units and batch norm."""
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
        norm="batch",
    )


@register("lung_unet2d")
def build_lung_unet(channels: tuple[int, ...] = (16, 32, 64, 128, 256)) -> nn.Module:
    """2D U-Net for lung segmentation on 256x256 slices clipped to [-1000, 0] HU;
    one output channel (lung vs background); left/right split is done on geometry."""
    return _unet2d(1, 1, channels)


@register("lobe_unet2d")
def build_lobe_unet(channels: tuple[int, ...] = (16, 32, 64, 128, 256)) -> nn.Module:
    """2D U-Net for the five lobes (``pipeline.lobes``): four input channels (lung window,
    right and left lung masks, height within the lungs), six outputs (background + lobes)."""
    return _unet2d(4, 6, channels)


#: modules that register the other methods' architectures (imported on first use)
ARCHITECTURE_MODULES = ("net_b", "net_c", "net_d", "net_infection")


def _import_architectures() -> None:
    import importlib

    for name in ARCHITECTURE_MODULES:
        importlib.import_module(f"ct_ai_node.models.{name}")


def build(architecture: str, **kwargs) -> nn.Module:
    if architecture not in ARCHITECTURES:
        _import_architectures()
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {architecture!r}; known: {known}") from None
    return builder(**kwargs)
