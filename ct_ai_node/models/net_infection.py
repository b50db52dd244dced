"""Infection segmentation network: a 2.5D MONAI U-Net.

Input: three adjacent axial planes about 2.5 mm apart (the plane itself and its
neighbours above and below) as channels, lung-ROI crop at about 1.5 mm pixels, HU
window [-1000, 200] scaled to [0, 1], air outside the dilated lungs. Output: one logit
channel, "suspected infection" (ground-glass opacity and consolidation) per pixel.

The layout follows the node's lung U-Net (``lung_unet2d``: MONAI ``UNet``, five levels
16-32-64-128-256, stride 2, batch norm, PReLU) with three input channels and one residual
unit per level instead of two: 0.84 M parameters, 1.7 MB as fp16 safetensors, about 1.8x
faster on the CPU than two units, with about the same validation Dice in a short phantom
run (0.90 vs 0.91). A 2D network on
a thin stack rather than a 3D U-Net: 3x3 instead of 3x3x3 kernels make it about three
times cheaper per voxel on the CPU, and the neighbour planes give the through-plane
context that tells a vessel (a tube crossing the planes) from a ground-glass patch (a
blob).

Registered here (not in ``networks.py``) as ``"infection_unet"``: importing this module
(``ct_ai_node.pipeline.infection`` does) makes ``load_model`` able to rebuild it.
"""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import nn

from ct_ai_node.models.networks import register

ARCHITECTURE = "infection_unet"
#: neighbour planes above and below the centre plane given as extra channels
CONTEXT_PLANES = 1
IN_CHANNELS = 2 * CONTEXT_PLANES + 1
DEFAULT_CHANNELS = (16, 32, 64, 128, 256)
#: input height and width must be multiples of this (four stride-2 levels of the
#: default channels; prepared planes are padded to it)
SIZE_MULTIPLE = 16


@register(ARCHITECTURE)
def build_infection_unet(channels: tuple[int, ...] | list[int] = DEFAULT_CHANNELS, num_res_units: int = 1,
                         in_channels: int = IN_CHANNELS, dropout: float = 0.0) -> nn.Module:
    channels = tuple(int(c) for c in channels)
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=1,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=num_res_units,
        norm="batch",
        dropout=dropout,
    )


def arch_kwargs_of(model: nn.Module) -> dict:
    """The ``build_infection_unet`` arguments that rebuild ``model`` (for the weight file)."""
    return {"channels": [int(c) for c in model.channels], "num_res_units": int(model.num_res_units),
            "in_channels": int(model.in_channels)}
