"""Method C (Ouyang et al., IEEE TMI 2020): Dual-Sampling Attention Network.

Two 3D ResNet34-layout classifiers with online attention (3D CAM, see
``ct_ai_node.models.net_c``), one trained with uniform sampling (US), one with
size-balanced sampling (SS), combined by an ensemble whose weight depends on the
predicted infection/lung volume ratio::

    P = w P_US + (1 - w) P_SS,  w = 0.35 if ratio < 0.001 or ratio > 0.030 else 0.96

Input (CPU-feasible version of the paper's 0.7168 x 0.7168 x 1.25 mm, ~2x downsampled,
138x256x256 grid, which costs about 35 s per scan forward-only on this CPU):

* crop to the box of the lungs plus ``margin_mm``;
* resample (area-averaging when downsampling) to a *fixed physical spacing* of
  4.4 x 2.5 x 2.5 mm (z, y, x; the paper's effective ~2.5 x 1.43 x 1.43 mm, with about
  the same z/in-plane ratio) and zero-pad, centred, to an 80 x 112 x 128 grid
  (352 x 280 x 320 mm: adult lungs plus margin); a lung box larger than that is shrunk by
  one scale factor in all axes (as the paper's single downsampling factor), so the aspect is
  always kept. Features before pooling are 5 x 7 x 8;
* window level -600 / width 1500 (clip to [-1350, 150] HU), scale to [0, 1];
* lung-mask suppression: everything outside the lung mask (on the grid, dilated about
  4 mm) is set to 0 (= -1350 HU).

Outputs, in the volume's geometry:

* ``probability`` = the ensemble P (decision threshold 0.5);
* ``heatmap`` = P x T_ens, with T_ens = w T(A_US) + (1 - w) T(A_SS) the ensemble attention
  map resampled back (linear) into the lung box, zero outside the lung mask dilated by
  ``mask_dilation_mm`` in-plane (a square of that half-width, for speed). T(A) is min-max
  normalised *per volume*, so it always has a hot region, even in a normal lung; scaling by
  P keeps the heat of a case called negative below P (< 0.5, near 0 for confident
  negatives), while for confident positives the map is T(A);
* ``slice_scores`` = per slice, the maximum of the heat map inside the lungs (0 without lung);
* ``positive_slices`` = lung slices whose score >= ``infection_threshold`` (0.5), which
  with the P scaling only happens when P >= 0.5;
* the ratio that picks w: voxels where the mean attention of the two models
  (T_US + T_SS) / 2 >= 0.5, inside the lungs on the grid, over the lung voxels on the grid
  (the paper took it from a separate infection segmentation, which the node does not have).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ct_ai_node import __version__
from ct_ai_node.errors import InputRejected, ModelError, WeightsMissing
from ct_ai_node.models import net_c  # importing it registers the architecture for load_model
from ct_ai_node.models.weights import BUNDLED_WEIGHTS, LoadedModel, load_model
from ct_ai_node.pipeline.geometry import bounding_box, dilate_slices, resize_stack
from ct_ai_node.pipeline.methods import MethodOutput, register_pipeline
from ct_ai_node.pipeline.types import AlgorithmInfo

PIPELINE_NAME = "dual-sampling"
WEIGHTS_NAME_US = "method_c_uniform"
WEIGHTS_NAME_SS = "method_c_size_balanced"
#: weight-file metadata key holding the :class:`CInputSettings` the model was trained with
INPUT_SETTINGS_KEY = "input_settings"


@dataclass(frozen=True)
class CInputSettings:
    """Pre-processing shared by training and inference (stored in the weights' metadata)."""

    grid: tuple[int, int, int] = (80, 112, 128)  # (z, y, x), multiples of 16
    spacing_mm: tuple[float, float, float] = (4.4, 2.5, 2.5)  # (z, y, x) at scale 1
    margin_mm: float = 8.0
    window_hu: tuple[float, float] = (-1350.0, 150.0)  # level -600, width 1500
    #: dilation of the lung mask on the grid before suppressing non-lung (mm)
    suppress_dilation_mm: float = 4.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CInputSettings":
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class GridPlacement:
    """Where the lung box of the source volume lies on the network grid."""

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # [start, stop) per axis, source voxels
    size: tuple[int, int, int]  # the box resampled, in grid voxels
    offset: tuple[int, int, int]  # its first voxel in the grid
    scale: float  # >= 1: shrink factor applied when the box would not fit at the base spacing

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.box)  # type: ignore[return-value]

    @property
    def grid_slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.size))  # type: ignore[return-value]


@dataclass
class PreparedInput:
    x: np.ndarray  # float32 (Z, Y, X) in [0, 1], non-lung suppressed
    lung: np.ndarray  # bool (Z, Y, X): lung on the grid (voxel at least half lung)
    placement: GridPlacement


def place_on_grid(lung: np.ndarray, spacing, s: CInputSettings) -> GridPlacement:
    margin = tuple(int(np.ceil(s.margin_mm / float(sp))) for sp in spacing)
    bb = bounding_box(lung, margin)
    if bb is None:
        raise InputRejected("method C needs lung voxels: the lung mask is empty")
    box = tuple((b.start, b.stop) for b in bb)
    extent = [(b1 - b0) * float(sp) for (b0, b1), sp in zip(box, spacing)]
    cover = [n * sp for n, sp in zip(s.grid, s.spacing_mm)]
    scale = max(1.0, *(e / c for e, c in zip(extent, cover)))
    size = tuple(int(min(g, max(1, round(e / (sp * scale))))) for e, sp, g in zip(extent, s.spacing_mm, s.grid))
    offset = tuple((g - n) // 2 for g, n in zip(s.grid, size))
    return GridPlacement(box=box, size=size, offset=offset, scale=float(scale))  # type: ignore[arg-type]


def _resize_z(a: np.ndarray, nz: int) -> np.ndarray:
    """Linear resampling along axis 0 of (z, y, x) (antialiased when shrinking)."""
    if a.shape[0] == nz:
        return np.ascontiguousarray(a, dtype=np.float32)
    z, y, x = a.shape
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).view(1, 1, z, y * x)
    r = F.interpolate(t, size=(nz, y * x), mode="bilinear", align_corners=False, antialias=nz < z)
    return r.view(nz, y, x).numpy()


def crop_to_grid(crop: np.ndarray, placement: GridPlacement, grid: tuple[int, int, int], fill: float = 0.0) -> np.ndarray:
    """A (z, y, x) array over the placement's box -> the float32 grid (area-like averaging
    in-plane and along z when shrinking, linear when enlarging), ``fill`` around."""
    rz, ry, rx = placement.size
    a = resize_stack(crop, (ry, rx)) if crop.shape[1:] != (ry, rx) else crop
    a = _resize_z(a, rz)
    out = np.full(grid, fill, np.float32)
    out[placement.grid_slices] = a
    return out


def prepare_input(hu: np.ndarray, spacing, lung: np.ndarray, s: CInputSettings = CInputSettings(),
                  placement: GridPlacement | None = None) -> PreparedInput:
    """HU volume + lung mask (source geometry) -> network input on the grid."""
    placement = placement or place_on_grid(lung, spacing, s)
    sl = placement.slices
    lo, hi = s.window_hu
    hu_g = crop_to_grid(hu[sl], placement, s.grid, fill=lo)
    lung_g = crop_to_grid(lung[sl], placement, s.grid) >= 0.5
    gsp = [sp * placement.scale for sp in s.spacing_mm]
    r_yx = int(round(s.suppress_dilation_mm / gsp[1]))
    r_z = int(round(s.suppress_dilation_mm / gsp[0]))
    inside = dilate_slices(lung_g, r_yx) if r_yx > 0 else lung_g.copy()
    if r_z > 0:
        inside = ndi.maximum_filter1d(inside.view(np.uint8), size=2 * r_z + 1, axis=0).astype(bool)
    x = np.clip((hu_g - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    x[~inside] = 0.0
    return PreparedInput(x=x, lung=lung_g, placement=placement)


def grid_to_volume_chunks(m: np.ndarray, placement: GridPlacement, chunk: int = 32):
    """Yield (z0, z1, maps) with ``maps`` (z1 - z0, box_y, box_x) float32: the grid map ``m``
    resampled back over the source lung box (linear), a few slices at a time."""
    (z0, z1), (y0, y1), (x0, x1) = placement.box
    region = m[placement.grid_slices]
    zmap = _resize_z(region, z1 - z0)  # small: box z x grid y x grid x
    for a in range(0, z1 - z0, chunk):
        part = zmap[a : a + chunk]
        t = torch.from_numpy(np.ascontiguousarray(part))[:, None]
        r = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[:, 0]
        yield z0 + a, z0 + a + part.shape[0], r.numpy()


def dilate_square(mask: np.ndarray, radius_px: int) -> np.ndarray:
    """In-plane dilation of (n, y, x) by a (2r+1)² square: two running maxima, about 4x
    faster than the disk of ``geometry.dilate_slices`` (covers it; corners reach r x 1.41)."""
    if radius_px <= 0:
        return np.asarray(mask, bool)
    m = np.ascontiguousarray(mask, dtype=np.uint8)
    size = 2 * int(radius_px) + 1
    m = ndi.maximum_filter1d(m, size, axis=1, mode="constant", cval=0)
    return ndi.maximum_filter1d(m, size, axis=2, mode="constant", cval=0).view(bool)


def ensemble_weight(ratio: float, low: float = 0.001, high: float = 0.030, w_outside: float = 0.35,
                    w_inside: float = 0.96) -> float:
    """Weight of the uniform-sampling model (Ouyang et al.)."""
    return w_outside if (ratio < low or ratio > high) else w_inside


@dataclass(frozen=True)
class MethodCSettings:
    threshold: float = 0.5
    #: heat level at or above which a voxel / slice counts as infected
    infection_threshold: float = 0.5
    #: in-plane dilation (square half-width) of the lung mask at source resolution outside
    #: which the heat is 0
    mask_dilation_mm: float = 4.0
    ratio_low: float = 0.001
    ratio_high: float = 0.030
    w_outside: float = 0.35
    w_inside: float = 0.96
    #: heat map = P x T_ens (True) or T_ens (False); see the module docstring
    scale_heatmap_by_probability: bool = True
    chunk: int = 32


def attention_ratio(t_us: np.ndarray, t_ss: np.ndarray, lung_grid: np.ndarray) -> float:
    """Predicted infection / lung volume on the grid: the mean attention of the two models
    >= 0.5 inside the lungs, over the lung voxels."""
    n = int(np.count_nonzero(lung_grid))
    if n == 0:
        return 0.0
    return float(np.count_nonzero((t_us + t_ss >= 1.0) & lung_grid) / n)


def combine(p_us: float, p_ss: float, t_us: np.ndarray, t_ss: np.ndarray, lung_grid: np.ndarray,
            s: MethodCSettings = MethodCSettings()) -> tuple[float, np.ndarray, float, float]:
    """The dual-sampling ensemble: (P, T_ens, ratio, w) with P = w P_US + (1 - w) P_SS and
    T_ens = w T_US + (1 - w) T_SS, w chosen by the attention ratio."""
    ratio = attention_ratio(t_us, t_ss, lung_grid)
    w = ensemble_weight(ratio, s.ratio_low, s.ratio_high, s.w_outside, s.w_inside)
    prob = float(w * p_us + (1.0 - w) * p_ss)
    t_ens = (np.float32(w) * t_us + np.float32(1.0 - w) * t_ss).astype(np.float32, copy=False)
    return prob, t_ens, ratio, w


class DualSamplingMethod:
    name = PIPELINE_NAME

    def __init__(self, us: LoadedModel, ss: LoadedModel, device: torch.device, settings: MethodCSettings | None = None):
        self.us, self.ss = us, ss
        self.device = torch.device(device)
        self.settings = settings or MethodCSettings()
        inputs = {m.metadata.get(INPUT_SETTINGS_KEY, CInputSettings().to_json()) for m in (us, ss)}
        if len(inputs) != 1:
            raise ModelError(f"{WEIGHTS_NAME_US} and {WEIGHTS_NAME_SS} were trained with different input settings")
        try:
            self.input = CInputSettings.from_json(inputs.pop())
        except (ValueError, TypeError) as exc:
            raise ModelError(f"method C weights: bad {INPUT_SETTINGS_KEY} metadata ({exc})") from exc
        for m in (us, ss):
            m.module.to(self.device).eval()
        self.algorithm = AlgorithmInfo(
            name="ct-ai-node method C (dual-sampling attention 3D ResNet34)",
            version=f"{__version__}/{us.version}+{ss.version}",
        )

    @torch.no_grad()
    def _run(self, x: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
        xt = torch.from_numpy(x)[None, None].to(self.device)
        probs, maps = [], []
        for m in (self.us, self.ss):
            logits, _, t = m.module.attention(xt)
            probs.append(float(torch.sigmoid(logits.float())[0, 0]))
            maps.append(t[0, 0].float().cpu().numpy())
        return probs, maps

    def __call__(self, hu, spacing, orientation, lung_labels) -> MethodOutput:
        return self.run(hu, spacing, lung_labels)[0]

    def run(self, hu, spacing, lung_labels) -> tuple[MethodOutput, dict[str, float]]:
        """The method's output and where the ensemble stood: P_US, P_SS, the attention
        infection ratio and the weight w of the uniform-sampling model."""
        s = self.settings
        t0 = time.perf_counter()
        lung = lung_labels > 0
        prep = prepare_input(hu, spacing, lung, self.input)
        t1 = time.perf_counter()
        (p_us, p_ss), (t_us, t_ss) = self._run(prep.x)
        prob, t_ens, ratio, w = combine(p_us, p_ss, t_us, t_ss, prep.lung, s)
        if s.scale_heatmap_by_probability:
            t_ens = t_ens * np.float32(prob)
        t2 = time.perf_counter()
        heat = np.zeros(lung.shape, np.float32)
        scores = np.zeros(lung.shape[0], np.float32)
        _, (y0, y1), (x0, x1) = prep.placement.box
        r = int(round(s.mask_dilation_mm / float(spacing[1])))
        for z0, z1, maps in grid_to_volume_chunks(t_ens.astype(np.float32), prep.placement, s.chunk):
            lung_c = lung[z0:z1, y0:y1, x0:x1]
            np.clip(maps, 0.0, 1.0, out=maps)
            heat[z0:z1, y0:y1, x0:x1] = maps * dilate_square(lung_c, r)
            scores[z0:z1] = (maps * lung_c).reshape(z1 - z0, -1).max(axis=1, initial=0.0)
        zs = np.flatnonzero(lung.reshape(lung.shape[0], -1).any(axis=1))
        positive = zs[scores[zs] >= s.infection_threshold]
        t3 = time.perf_counter()
        out = MethodOutput(
            probability=prob,
            threshold=s.threshold,
            slice_scores=scores,
            positive_slices=positive,
            positive_slice_ratio=float(positive.size / zs.size) if zs.size else 0.0,
            heatmap=heat,
            algorithm=self.algorithm,
            model_versions={WEIGHTS_NAME_US: self.us.version, WEIGHTS_NAME_SS: self.ss.version},
            timings_s={"preprocess": round(t1 - t0, 3), "classification": round(t2 - t1, 3),
                       "localisation": round(t3 - t2, 3)},
            infection_threshold=s.infection_threshold,
            scored_slices=None,
        )
        return out, {"p_uniform": p_us, "p_size_balanced": p_ss, "ratio": ratio, "w_uniform": w}


def load_method_c(device: torch.device | str = "cpu", weights_dir: Path | None = None,
                  settings: MethodCSettings | None = None) -> DualSamplingMethod:
    folder = Path(weights_dir) if weights_dir else BUNDLED_WEIGHTS
    missing = [n for n in (WEIGHTS_NAME_US, WEIGHTS_NAME_SS) if not (folder / f"{n}.safetensors").is_file()]
    if missing:
        raise WeightsMissing(f"method C weights {', '.join(m + '.safetensors' for m in missing)} not found in {folder}; "
                         "train them (ct_ai_node.training.train_c) or bring weights")
    us = load_model(WEIGHTS_NAME_US, weights_dir, device)
    ss = load_model(WEIGHTS_NAME_SS, weights_dir, device)
    for m in (us, ss):
        if m.metadata.get("architecture") != net_c.ARCHITECTURE:
            raise ModelError(f"{m.name}: architecture {m.metadata.get('architecture')!r}, expected {net_c.ARCHITECTURE!r}")
    return DualSamplingMethod(us, ss, torch.device(device), settings)


@register_pipeline(PIPELINE_NAME, "Method C: dual-sampling attention network, 3D ResNet34 layout with online 3D CAM "
                   "attention, uniform + size-balanced models ensembled by infection ratio (Ouyang et al. 2020)",
                   weights=(WEIGHTS_NAME_US, WEIGHTS_NAME_SS))
def _factory(device: torch.device, weights_dir: Path | None) -> DualSamplingMethod:
    return load_method_c(device, weights_dir)
