"""Infection segmentation: a 2.5D U-Net on the lungs -> "suspected infection" mask.

The segmenter gives a voxel probability and a mask of ground-glass opacity and
consolidation in the source volume's geometry. When selected, the SEG's "suspected
infection" segment, the lesion volume and the Corona score can come from it instead of
from a method's thresholded heat map.

How a scan is prepared (training and inference share :func:`prepare_planes`):

1. Only the lungs' box is used: the slices that contain lung, and in-plane the lungs'
   bounding box plus ``roi_margin_mm``.
2. Along z the box is resampled to planes about ``z_step_mm`` (2.5 mm) apart: thin
   slices are averaged over the plane's slab (a thick reconstruction, less noise),
   thick slices are interpolated linearly. The number of planes depends on the lungs'
   height only (about 100-130), not on the slice count of the series.
3. In-plane the box is resampled (antialiased) to ``pixel_mm`` (1.5 mm) pixels, coarser
   when the box would exceed ``max_size`` pixels, and padded to a multiple of 16.
4. HU clipped to ``hu_window`` [-1000, 200] and scaled to [0, 1]; everything outside the
   lungs dilated by ``mask_dilation_mm`` is set to air (0).

The network sees each plane with its two neighbours (2.5 mm above and below) as three
channels. Its probability is multiplied by the planes' dilated lung mask, interpolated
back along z to every source slice, multiplied by that slice's own dilated lung mask (at
the network's resolution) and resized bilinearly in-plane to the source pixels; the mask
is ``probability >= threshold`` inside the lung labels.

Cost on the CPU: the network runs on about 100-130 planes of at most 192x192 pixels
whatever the series' slice count or matrix. Measured on a 300-slice 512x512 phantom
(1 mm slices): 103 planes of 144x176, about 2 s on a single (shared) core in all:
preparation 0.2 s, network 1.0 s, back to the source grid 0.7-1.6 s (mostly first
touching the 300 MB float32 probability volume). ``last_timings_s`` has the split.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ct_ai_node.errors import ModelError, WeightsMissing
from ct_ai_node.models import net_infection  # noqa: F401  (registers "infection_unet")
from ct_ai_node.models.net_infection import ARCHITECTURE, CONTEXT_PLANES, SIZE_MULTIPLE
from ct_ai_node.models.weights import LoadedModel, load_model, weights_folder
from ct_ai_node.pipeline.geometry import bounding_box, dilate_slices, resize_stack
from ct_ai_node.pipeline.pattern import PatternModel

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "infection_unet"
#: weight-file metadata holding the three-class case model (``ct-ai-node calibrate pattern``)
CASE_MODEL_KEY = "case_model"
__all__ = [
    "WEIGHTS_NAME", "ARCHITECTURE", "InfectionSettings", "Planes", "InfectionSegmenter", "create_infection_segmenter",
    "prepare_planes", "plane_stack", "plane_positions", "z_resample_weights",
]


@dataclass(frozen=True)
class InfectionSettings:
    """Input preparation of the infection U-Net. Stored with the weights (metadata
    ``input_settings``) so that inference prepares scans exactly as training did."""

    hu_window: tuple[float, float] = (-1000.0, 200.0)
    #: the network runs on planes about this far apart (slab-averaged or interpolated)
    z_step_mm: float = 2.5
    #: in-plane pixel size of the network input
    pixel_mm: float = 1.5
    #: longest side of the network input in pixels (bigger lungs get coarser pixels)
    max_size: int = 192
    roi_margin_mm: float = 10.0
    #: lungs dilated by this much set what the network sees (the rest is air)
    mask_dilation_mm: float = 4.0

    @classmethod
    def from_json(cls, text: str) -> "InfectionSettings":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "hu_window" in data:
            data["hu_window"] = tuple(float(v) for v in data["hu_window"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class Planes:
    """A scan's lungs prepared for the network (see the module docstring)."""

    x: np.ndarray  # float32 (K, H, W) in [0, 1], air (0) outside ``inside`` and in the padding
    inside: np.ndarray  # bool (K, H, W) lungs dilated by mask_dilation_mm
    lung: np.ndarray  # bool (K, H, W) lungs (undilated)
    positions: np.ndarray  # float64 (K,) plane centres in source slice-index units
    z_range: tuple[int, int]  # first and last source slice with lung
    box: tuple[int, int, int, int]  # in-plane source box y0, y1, x0, x1
    work_hw: tuple[int, int]  # (h, w) of the resampled box before padding
    pixel_mm: float  # in-plane pixel size of the planes
    step_mm: float  # distance between planes
    lesion: np.ndarray | None = None  # bool (K, H, W) when a lesion mask was given

    @property
    def voxel_ml(self) -> float:
        return self.pixel_mm * self.pixel_mm * self.step_mm / 1000.0


def plane_positions(z_lo: int, z_hi: int, dz: float, step_mm: float) -> np.ndarray:
    """Plane centres (in slice-index units) from ``z_lo`` to ``z_hi`` inclusive, evenly
    spaced about ``step_mm`` apart."""
    extent = (z_hi - z_lo) * dz
    k = max(int(round(extent / step_mm)) + 1, 1)
    if k == 1:
        return np.array([(z_lo + z_hi) / 2.0])
    return np.linspace(z_lo, z_hi, k)


def z_resample_weights(positions: np.ndarray, n_src: int, dz: float, step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Weights of source slices for planes at ``positions``: the overlap of each source
    slice ([i - 1/2, i + 1/2]) with the plane's slab (width ``max(step/dz, 1)`` slices)
    divided by the slab width. Slabs wider than a slice average (thin slices), a slab of
    one slice is linear interpolation (thick slices). Returns (idx, w), each (K, m);
    indices beyond the series repeat its end slices."""
    width = max(step_mm / dz, 1.0)
    half = width / 2.0
    m = int(math.ceil(width)) + 2
    lo = np.floor(positions - half + 0.5).astype(int)  # first slice whose cell can overlap
    idx = lo[:, None] + np.arange(m)[None, :]
    a = np.maximum(idx - 0.5, (positions - half)[:, None])
    b = np.minimum(idx + 0.5, (positions + half)[:, None])
    w = np.clip(b - a, 0.0, None) / width
    idx = np.clip(idx, 0, n_src - 1)
    return idx, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _resample_z(vol: np.ndarray, idx: np.ndarray, w: np.ndarray, offset: int) -> np.ndarray:
    """(n, H, W) source (starting at slice ``offset``) -> (K, H, W) float32 planes."""
    out = np.zeros((idx.shape[0], *vol.shape[1:]), np.float32)
    for k in range(idx.shape[0]):
        for i, wt in zip(idx[k], w[k]):
            if wt > 0:
                out[k] += wt * vol[i - offset].astype(np.float32, copy=False)
    return out


def prepare_planes(hu: np.ndarray, spacing, lung: np.ndarray, settings: InfectionSettings,
                   lesion: np.ndarray | None = None) -> Planes | None:
    """The lungs' box of ``hu`` resampled to network planes (None when there is no lung).
    ``lesion`` (training) is resampled the same way and thresholded at one half."""
    s = settings
    lung = lung > 0 if lung.dtype != bool else lung
    bb = bounding_box(lung)
    if bb is None:
        return None
    dz, dy, dx = (float(v) for v in spacing)
    z_lo, z_hi = bb[0].start, bb[0].stop - 1
    my, mx = int(round(s.roi_margin_mm / dy)), int(round(s.roi_margin_mm / dx))
    y0, y1 = max(bb[1].start - my, 0), min(bb[1].stop + my, hu.shape[1])
    x0, x1 = max(bb[2].start - mx, 0), min(bb[2].stop + mx, hu.shape[2])
    pixel = max(s.pixel_mm, (y1 - y0) * dy / s.max_size, (x1 - x0) * dx / s.max_size)
    h = max(int(round((y1 - y0) * dy / pixel)), 1)
    w = max(int(round((x1 - x0) * dx / pixel)), 1)

    positions = plane_positions(z_lo, z_hi, dz, s.z_step_mm)
    step = (positions[1] - positions[0]) * dz if positions.size > 1 else s.z_step_mm
    idx, wts = z_resample_weights(positions, hu.shape[0], dz, s.z_step_mm)
    s0, s1 = int(idx.min()), int(idx.max()) + 1

    def planes_of(vol: np.ndarray) -> np.ndarray:
        return resize_stack(_resample_z(vol[s0:s1, y0:y1, x0:x1], idx, wts, s0), (h, w))

    lo, hi = s.hu_window
    x = (np.clip(planes_of(hu), lo, hi) - lo) / (hi - lo)
    lung_p = planes_of(lung.view(np.uint8)) >= 0.5
    inside = dilate_slices(lung_p, int(round(s.mask_dilation_mm / pixel)))
    x[~inside] = 0.0
    les_p = None
    if lesion is not None:
        les_p = planes_of((lesion if lesion.dtype == bool else lesion > 0).view(np.uint8)) >= 0.5

    H = int(math.ceil(h / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    W = int(math.ceil(w / SIZE_MULTIPLE) * SIZE_MULTIPLE)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, H - h), (0, W - w))) if (H, W) != (h, w) else a

    return Planes(x=pad(x.astype(np.float32, copy=False)), inside=pad(inside), lung=pad(lung_p), positions=positions,
                  z_range=(int(z_lo), int(z_hi)), box=(y0, y1, x0, x1), work_hw=(h, w), pixel_mm=float(pixel),
                  step_mm=float(step), lesion=pad(les_p) if les_p is not None else None)


def plane_stack(x: torch.Tensor | np.ndarray, ks: np.ndarray, context: int = CONTEXT_PLANES) -> torch.Tensor:
    """Network input for planes ``ks`` of ``x`` (K, H, W): each plane with its
    ``context`` neighbours on either side as channels (the end planes repeat) ->
    (n, 2 * context + 1, H, W)."""
    t = torch.as_tensor(x)
    ks = np.asarray(ks, dtype=int)
    offs = np.arange(-context, context + 1)
    sel = np.clip(ks[:, None] + offs[None, :], 0, t.shape[0] - 1)
    return t[torch.from_numpy(sel.ravel())].view(len(ks), len(offs), *t.shape[1:])


class InfectionSegmenter:
    """``(hu, spacing, lung_labels) -> (mask bool (z, y, x), probability float32 (z, y, x))``."""

    name = WEIGHTS_NAME

    def __init__(self, model: torch.nn.Module, version: str = "untrained", device: torch.device | str = "cpu",
                 settings: InfectionSettings | None = None, threshold: float = 0.5, batch_size: int = 16,
                 case_model: PatternModel | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.version = version
        self.settings = settings or InfectionSettings()
        self.threshold = float(threshold)
        self.batch_size = batch_size
        #: the three-class case model fitted on this network's masks (None: not calibrated)
        self.case_model = case_model
        #: what the weights learnt from (weight metadata), shown with its results
        self.trained_on = "synthetic chest-CT phantoms only"
        self.last_timings_s: dict[str, float] = {}

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, device: torch.device | str = "cpu") -> "InfectionSegmenter":
        meta = loaded.metadata
        settings = InfectionSettings.from_json(meta["input_settings"]) if "input_settings" in meta else None
        threshold = float(meta.get("threshold", 0.5))
        case_model = PatternModel.from_json(meta[CASE_MODEL_KEY]) if CASE_MODEL_KEY in meta else None
        seg = cls(loaded.module, loaded.version, device, settings, threshold, case_model=case_model)
        seg.trained_on = meta.get("trained_on", seg.trained_on)
        return seg

    @torch.no_grad()
    def plane_probabilities(self, planes: Planes) -> np.ndarray:
        """Network probability (K, H, W) of every plane, zero outside the dilated lungs."""
        x = torch.from_numpy(planes.x)
        out = np.empty(planes.x.shape, np.float32)
        for k0 in range(0, x.shape[0], self.batch_size):
            ks = np.arange(k0, min(k0 + self.batch_size, x.shape[0]))
            logits = self.model(plane_stack(x, ks).to(self.device))
            out[ks] = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        out *= planes.inside
        return out

    def __call__(self, hu: np.ndarray, spacing, lung_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        lung = lung_labels > 0
        prob = np.zeros(hu.shape, np.float32)
        mask = np.zeros(hu.shape, bool)
        planes = prepare_planes(hu, spacing, lung, self.settings)
        if planes is None:
            self.last_timings_s = {"total": round(time.perf_counter() - t0, 3)}
            return mask, prob
        t1 = time.perf_counter()
        p = self.plane_probabilities(planes)
        t2 = time.perf_counter()
        h, w = planes.work_hw
        p = p[:, :h, :w]
        y0, y1, x0, x1 = planes.box
        # every source slice in the lungs' z range: linear interpolation between planes
        pos = planes.positions
        zs = np.arange(planes.z_range[0], planes.z_range[1] + 1)
        u = np.interp(zs, pos, np.arange(pos.size, dtype=np.float64))
        a = np.floor(u).astype(int)
        b = np.minimum(a + 1, pos.size - 1)
        f = (u - a).astype(np.float32)[:, None, None]
        radius = int(round(self.settings.mask_dilation_mm / planes.pixel_mm))
        chunk = 32
        for i in range(0, zs.size, chunk):
            sl = slice(i, i + chunk)
            z_sl = slice(int(zs[i]), int(zs[min(i + chunk, zs.size) - 1]) + 1)
            pz = (1.0 - f[sl]) * p[a[sl]] + f[sl] * p[b[sl]]
            # zero outside this slice's own dilated lungs (the planes' lungs, interpolated
            # along z, can reach further on thick slices)
            own = torch.from_numpy(lung[z_sl, y0:y1, x0:x1].view(np.uint8))[:, None].float()
            own = F.adaptive_max_pool2d(own, (h, w))  # any lung in the work pixel
            if radius > 0:  # square dilation: a cheap, slightly generous gate
                own = F.max_pool2d(own, 2 * radius + 1, stride=1, padding=radius)
            pz *= own[:, 0].numpy()
            t = torch.from_numpy(np.ascontiguousarray(pz))[:, None]
            if (y1 - y0, x1 - x0) != (h, w):
                t = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
            up = np.clip(t[:, 0].numpy(), 0.0, 1.0)
            prob[z_sl, y0:y1, x0:x1] = up
            mask[z_sl, y0:y1, x0:x1] = (up >= self.threshold) & lung[z_sl, y0:y1, x0:x1]
        t3 = time.perf_counter()
        self.last_timings_s = {"prepare": round(t1 - t0, 3), "network": round(t2 - t1, 3),
                               "to_source": round(t3 - t2, 3), "total": round(t3 - t0, 3), "planes": int(pos.size)}
        return mask, prob


def create_infection_segmenter(device: torch.device | str = "cpu",
                               weights_dir: Path | None = None) -> InfectionSegmenter:
    """The segmenter with the ``infection_unet`` weights of ``weights_dir`` (the bundled
    weights when None), hash-checked. Raises :class:`ModelError` when they are missing."""
    folder = weights_folder(weights_dir)
    if not (folder / f"{WEIGHTS_NAME}.safetensors").is_file():
        raise WeightsMissing(f"infection U-Net weights {WEIGHTS_NAME}.safetensors not found in {folder}; train them with "
                         "ct_ai_node.training.train_infection.train_infection_unet")
    loaded = load_model(WEIGHTS_NAME, folder, device)
    if loaded.metadata.get("architecture") != ARCHITECTURE:
        raise ModelError(f"{WEIGHTS_NAME}.safetensors holds a {loaded.metadata.get('architecture')!r} network, "
                         f"not {ARCHITECTURE!r}")
    return InfectionSegmenter.from_loaded(loaded, device)
