"""The five lung lobes, from a 2D U-Net over axial slices (issue 16).

What tells the lobes apart on one axial slice is the fissures (thin lines, often invisible
on thick slices) and where the slice lies between the lung's apex and base: the oblique
fissure runs from high at the back to low at the front, so the same in-plane position is
upper lobe near the apex and lower lobe near the base. The network therefore sees four
channels: the slice in the lung window, the right and the left lung masks (from the lung
stage), and the slice's height within the lungs (0 at the lowest lung slice, 1 at the
highest). Of its six outputs (background and :data:`~ct_ai_node.pipeline.types.LOBES`) every
lung voxel takes the likeliest lobe, of either side: trained with the lung stage's masks as
well as true ones, the network judges the side better than the lung stage's right/left split
(see :func:`labels_from_probabilities`).

The network runs at ``work_size`` pixels on slices about ``z_step_mm`` apart (lobes change
slowly along z); the probabilities of the slices between are interpolated.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.pipeline.geometry import fill_between_inplace, resize_slices, strided_indices, superior_last, work_shape
from ct_ai_node.pipeline.types import LEFT_LUNG, LOBES, RIGHT_LUNG

WEIGHTS_NAME = "lobe_unet2d"
#: label values of the right and the left lobes (LOBES order, index + 1)
RIGHT_LOBES = (1, 2, 3)
LEFT_LOBES = (4, 5)


@dataclass(frozen=True)
class LobeSettings:
    """Input preparation, stored with the weights (metadata ``input_settings``) so that
    inference prepares slices exactly as training did."""

    work_size: int = 128
    z_step_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 0.0)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LobeSettings":
        d = json.loads(text)
        d["hu_window"] = tuple(d.get("hu_window", cls.hu_window))
        return cls(**d)


def lung_height(n_slices: int, lung_slices: np.ndarray, orientation) -> np.ndarray:
    """Per slice, its height within the lungs: 0 at the lowest slice with lung, 1 at the
    highest (clipped outside); 0.5 everywhere for a single lung slice."""
    z = np.arange(n_slices, dtype=np.float32)
    lo, hi = float(lung_slices[0]), float(lung_slices[-1])
    if hi <= lo:
        return np.full(n_slices, 0.5, np.float32)
    h = np.clip((z - lo) / (hi - lo), 0.0, 1.0)
    return h if superior_last(orientation) else 1.0 - h


def lobe_inputs(hu: np.ndarray, lung_labels: np.ndarray, zs: np.ndarray, height: np.ndarray,
                settings: LobeSettings) -> torch.Tensor:
    """The network input of slices ``zs``: (n, 4, work_size, work_size) float32."""
    lo, hi = settings.hu_window
    size = (settings.work_size, settings.work_size)
    x = torch.from_numpy(np.ascontiguousarray(hu[zs], np.float32))[:, None]
    x = resize_slices((x.clamp(lo, hi) - lo) / (hi - lo), size)
    lab = torch.from_numpy(np.ascontiguousarray(lung_labels[zs]))[:, None]
    masks = torch.cat([(lab == RIGHT_LUNG), (lab == LEFT_LUNG)], 1).float()
    masks = resize_slices(masks, size, mode="nearest")
    h = torch.from_numpy(np.asarray(height[zs], np.float32))[:, None, None, None].expand(-1, 1, *size)
    return torch.cat([x, masks, h], 1).contiguous()


def lobe_targets(lobe_labels: np.ndarray, zs: np.ndarray, settings: LobeSettings) -> torch.Tensor:
    """Training targets of slices ``zs``: (n, work_size, work_size) int64 labels 0..5."""
    t = torch.from_numpy(np.ascontiguousarray(lobe_labels[zs]))[:, None].float()
    return resize_slices(t, (settings.work_size, settings.work_size), mode="nearest")[:, 0].long()


def labels_from_probabilities(prob: np.ndarray, lung_slice: np.ndarray) -> np.ndarray:
    """One slice's lobe labels on the source grid: ``prob`` (5, wy, wx) lobe probabilities at
    work resolution, ``lung_slice`` the source lung labels (y, x). Each lung voxel takes the
    likeliest of the five lobes at the nearest work pixel, of either side: the lobe network,
    which sees the whole slice, judges the side better than the lung segmentation's right/left
    split (a cut at the midline where the lungs touch). On the dev phantoms (90300-90319) reading
    within the lung segmentation's own side put 2.8 % of one case's lung voxels into a lobe of
    the wrong side, and cost the lower lobes 0.05 Dice."""
    wy, wx = prob.shape[1:]
    ys = np.minimum((np.arange(lung_slice.shape[0]) * wy) // lung_slice.shape[0], wy - 1)
    xs = np.minimum((np.arange(lung_slice.shape[1]) * wx) // lung_slice.shape[1], wx - 1)
    best = (np.argmax(prob, axis=0) + 1).astype(np.uint8)
    out = np.zeros(lung_slice.shape, np.uint8)
    r, c = np.nonzero(lung_slice > 0)
    out[r, c] = best[ys[r], xs[c]]
    return out


class LobeSegmenter:
    """``(hu, spacing, orientation, lung_labels) -> lobe labels`` uint8 (z, y, x), 1..5 in
    :data:`LOBES` order inside the lungs, 0 elsewhere."""

    name = WEIGHTS_NAME

    def __init__(self, model: torch.nn.Module, version: str = "untrained", device: torch.device | str = "cpu",
                 settings: LobeSettings | None = None, batch_size: int = 32):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.version = version
        self.settings = settings or LobeSettings()
        self.batch_size = batch_size
        self.trained_on = "synthetic chest-CT phantoms only"
        self.last_timings_s: dict[str, float] = {}

    @classmethod
    def from_loaded(cls, loaded, device: torch.device | str = "cpu") -> "LobeSegmenter":
        meta = loaded.metadata
        settings = LobeSettings.from_json(meta["input_settings"]) if "input_settings" in meta else None
        seg = cls(loaded.module, loaded.version, device, settings)
        seg.trained_on = meta.get("trained_on", seg.trained_on)
        return seg

    @torch.no_grad()
    def probabilities(self, hu: np.ndarray, spacing, orientation, lung_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lung slice indices, lobe probabilities (n, 5, wy, wx) float32 at work resolution)."""
        s = self.settings
        zs = np.flatnonzero(lung_labels.reshape(lung_labels.shape[0], -1).any(axis=1))
        work = work_shape(hu.shape, s.work_size)[1:]
        if zs.size == 0:
            return zs, np.zeros((0, len(LOBES), *work), np.float32)
        height = lung_height(hu.shape[0], zs, orientation)
        stride = max(1, int(s.z_step_mm // float(spacing[0]))) if spacing[0] else 1
        run = strided_indices(zs, stride)
        out = np.zeros((zs.size, len(LOBES), *work), np.float32)
        where = {int(z): i for i, z in enumerate(zs)}
        for i in range(0, run.size, self.batch_size):
            batch = run[i : i + self.batch_size]
            x = lobe_inputs(hu, lung_labels, batch, height, s).to(self.device)
            p = torch.softmax(self.model(x).float(), dim=1)[:, 1:]
            p = resize_slices(p, work).cpu().numpy()
            for k, z in enumerate(batch):
                out[where[int(z)]] = p[k]
        # slices between two run slices (the runs are in zs order): linear in z
        known = np.array([where[int(z)] for z in run])
        return zs, fill_between_inplace(out, known)

    def __call__(self, hu: np.ndarray, spacing, orientation, lung_labels: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        zs, prob = self.probabilities(hu, spacing, orientation, lung_labels)
        t1 = time.perf_counter()
        out = np.zeros(lung_labels.shape, np.uint8)
        for i, z in enumerate(zs):
            out[z] = labels_from_probabilities(prob[i], lung_labels[z])
        self.last_timings_s = {"network": round(t1 - t0, 3), "labels": round(time.perf_counter() - t1, 3)}
        return out


def create_lobe_segmenter(device: torch.device | str = "cpu", weights_dir: Path | None = None) -> LobeSegmenter:
    from ct_ai_node.models.weights import load_model

    return LobeSegmenter.from_loaded(load_model(WEIGHTS_NAME, weights_dir, device), device)


__all__ = ["LEFT_LOBES", "RIGHT_LOBES", "WEIGHTS_NAME", "LobeSegmenter", "LobeSettings",
           "create_lobe_segmenter", "labels_from_probabilities", "lobe_inputs", "lobe_targets", "lung_height"]
