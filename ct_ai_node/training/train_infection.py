"""Training of the infection U-Net (``infection_unet``) on synthetic phantoms.

Every phantom is prepared exactly as at inference (:func:`ct_ai_node.pipeline.infection.prepare_planes`:
lungs' box, planes about 2.5 mm apart, 1.5 mm pixels, HU window [-1000, 200], air outside
the dilated lungs) together with its lesion mask, and cached (``settings.cache_dir``) as
one compressed ``.npz`` per seed, keyed by the preparation settings and the phantom shape.

Training samples are planes with their two neighbours as channels, randomly cropped
(``crop`` px; crops of planes with lesion are centred near a pixel of one of its foci, the
focus drawn first, ``centre_by_focus``) and augmented
(affine, scanner variation). Half of each batch (``lesion_plane_fraction``) comes from
planes with lesion; a quarter (``hard_negative_fraction``) is centred on dense tissue inside
the lungs that is not lesion (:func:`hard_negative_pixels`: masses, atelectasis, dependent
density, the stomach or diaphragm where the lung mask reaches too far), which random crops
rarely hit; the rest from all planes, normal phantoms included, so the network learns what
is not infection (vessels, nodules, atelectasis, emphysema). Loss: soft Dice
(over the batch) + BCE. Validation: lesion Dice on whole validation phantoms at the
network's resolution, for several thresholds; the best one is stored with the weights.

A short CPU check of the recipe (15 realistic training phantoms, 250 steps of batch 8 at
crop 96, 30 s on one core): validation Dice pooled over 6 phantoms 0.89 at threshold 0.5
(per case: COVID-like 0.74, CAP 0.94; 18 ml false positive per normal phantom). Training
planes take two bytes per pixel in memory (about 5 MB per realistic phantom).

Seeds: training from ``TRAIN_SEED0``, validation from ``VAL_SEED0``; seeds at or above
``TEST_SEED0`` (the held-out test set) are refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from scipy import ndimage

from ct_ai_node.models.net_infection import ARCHITECTURE, DEFAULT_CHANNELS, SIZE_MULTIPLE, arch_kwargs_of
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import save_model
from ct_ai_node.pipeline.infection import (
    WEIGHTS_NAME,
    InfectionSegmenter,
    InfectionSettings,
    Planes,
    plane_stack,
    prepare_planes,
)
from ct_ai_node.training.augment import blur, random_affine
from ct_ai_node.training.data import (
    bundled_lung_unet_hash,
    case_source,
    case_source_version,
    case_id,
    case_kind,
    check_fit_cases,
    describe_cases,
    make_case,
    map_cases,
    site_scan,
)

logger = logging.getLogger(__name__)

MODEL_VERSION = "0.1.0"
#: bump when the cached sample format or preparation code changes
CACHE_FORMAT = 1


@dataclass
class InfectionTrainSettings:
    #: phantom shape (z, y, x); None draws realistic full-size geometries (0.5-5 mm slices, 512x512)
    shape: tuple[int, int, int] | None = None
    epochs: int = 8
    #: optimiser steps per epoch; None: (number of training planes) / batch_size
    steps_per_epoch: int | None = None
    batch_size: int = 32
    #: training crop in pixels (a multiple of 16; planes smaller than this are padded)
    crop: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    #: share of every batch drawn from planes that contain lesion
    lesion_plane_fraction: float = 0.5
    #: share of those lesion planes drawn case by case (a case with lesion uniformly, then
    #: one of its lesion planes), the rest uniformly over all lesion planes. Drawn by plane
    #: alone, a scan with minimal disease (a few planes) is seen a hundred times less often
    #: than one with extensive disease (every plane); but 0.5 lowered every validation
    #: figure and tripled the false opacity on normal cases (docs/models.md, fifth pass), so 0
    lesion_case_balanced_fraction: float = 0.0
    #: share of every batch centred on dense tissue in the lungs that is not lesion
    #: (:func:`hard_negative_pixels`); 0 samples those planes only by chance
    hard_negative_fraction: float = 0.25
    #: what counts as dense: mean HU over ``hard_negative_mm`` square at least this
    hard_negative_hu: float = -450.0
    hard_negative_mm: float = 7.5
    #: centre a crop on a focus drawn uniformly among the plane's lesion foci (small foci
    #: as often as large ones), not on a pixel drawn uniformly
    centre_by_focus: bool = True
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    augment: bool = True
    #: where prepared phantoms are cached (None: no cache)
    cache_dir: str | None = None
    #: processes generating phantoms (None: all CPUs; 1: in this process)
    workers: int | None = None
    seed: int = 0
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    num_res_units: int = 1
    val_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    #: the region the network sees in training: "truth" (the case's lungs) or "predicted"
    #: (the lung U-Net's lungs on the case joined with the truth; see phantom_planes)
    lungs: str = "truth"
    input: InfectionSettings = field(default_factory=InfectionSettings)


# ----------------------------------------------------------------------------- data


def _cache_key(seed, shape, input_settings: InfectionSettings, lungs: str = "truth") -> str:
    key = {"format": CACHE_FORMAT, "shape": list(shape) if shape else None,
           "input": json.loads(input_settings.to_json()), "source": case_source_version(seed)}
    if lungs != "truth":  # the lung U-Net's lungs: its weights shape the prepared case
        key["lungs"] = f"{lungs} {bundled_lung_unet_hash()}"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _lung_unet():
    from ct_ai_node.pipeline.run import create_lung_segmenter

    return create_lung_segmenter("unet", "cpu")


def phantom_planes(seed, kind: str, shape, input_settings: InfectionSettings,
                   lungs: str = "truth") -> dict[str, np.ndarray]:
    """One phantom (or site case) prepared for the infection U-Net: x uint8 (K, H, W),
    lesion, inside and lung bool (K, H, W), plus the voxel volume (ml) of the planes.
    ``lungs`` "predicted": the region the network sees is the lung U-Net's lungs on this
    very image (what inference has: at times too much, soft tissue at the apex; at times
    too little, dense consolidation) joined with the true lungs, so that it learns what is
    not opacity inside a lung mask that is too large and still sees every lesion."""
    ph = make_case(seed, shape, kind)
    region = ph.lung_labels
    if lungs == "predicted":
        pred = _lung_unet()(np.asarray(ph.hu, np.float32), ph.spacing, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
        region = ((np.asarray(pred) > 0) | (np.asarray(ph.lung_labels) > 0)).astype(np.uint8)
    elif lungs != "truth":
        raise ValueError(f"lungs: 'truth' or 'predicted', not {lungs!r}")
    planes = prepare_planes(ph.hu, ph.spacing, region, input_settings, lesion=ph.lesion_mask)
    if planes is None:  # never for phantoms; keep the loader total anyway
        raise ValueError(f"phantom {seed} has no lung")
    return {
        "x": np.round(planes.x * 255).astype(np.uint8),
        "lesion": planes.lesion,
        "inside": planes.inside,
        "lung": planes.lung,
        "voxel_ml": np.float64(planes.voxel_ml),
        "seed": np.int64(case_id(seed)),
        "kind": np.array(ph.kind),
        "source": np.array(case_source(seed)),
    }


def _load_or_make(args) -> dict[str, np.ndarray]:
    seed, shape, input_json, cache_dir, lungs = args
    input_settings = InfectionSettings.from_json(input_json)
    kind = case_kind(seed)
    path = None
    if cache_dir:
        scan = site_scan(seed)
        site = "" if scan is None else "-" + hashlib.sha256(scan.encode()).hexdigest()[:8]
        path = Path(cache_dir) / f"infection-{_cache_key(seed, shape, input_settings, lungs)}-{case_id(seed)}{site}.npz"
        if path.is_file():
            try:
                with np.load(path) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError):
                logger.warning("cached %s unreadable; generating again", path.name)
    sample = phantom_planes(seed, kind, shape, input_settings, lungs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **sample)
        os.replace(tmp, path)
    return sample


def load_cases(seeds: Iterable[int], settings: InfectionTrainSettings, advance=None,
               transform=None) -> list[dict[str, np.ndarray]]:
    """Prepared phantoms of ``seeds`` (from the cache, or generated in ``settings.workers``
    processes and cached); ``transform`` is applied to each case as it arrives."""
    transform = transform or (lambda case: case)
    jobs = [(s, settings.shape, settings.input.to_json(), settings.cache_dir, settings.lungs) for s in seeds]
    return [transform(case) for case in map_cases(_load_or_make, jobs, settings.workers, advance)]


# ----------------------------------------------------------------------------- sampling


def _crop_origin(size: int, crop: int, centre: int | None, rng: np.random.Generator) -> int:
    if size <= crop:
        return 0
    if centre is None:
        return int(rng.integers(0, size - crop + 1))
    jitter = int(rng.integers(-crop // 3, crop // 3 + 1))
    return int(np.clip(centre - crop // 2 + jitter, 0, size - crop))


def hard_negative_pixels(x: np.ndarray, lung: np.ndarray, lesion: np.ndarray, window_hu: tuple[float, float],
                         pixel_mm: float, min_hu: float = -450.0, size_mm: float = 7.5) -> np.ndarray:
    """Pixels (K, H, W) of prepared planes where the lungs hold dense tissue that is not
    lesion: the mean HU over a ``size_mm`` square is at least ``min_hu`` (wider than most
    vessels, so masses, atelectasis, dependent density and whatever soft tissue the lung
    mask took in), at least two pixels away from any lesion. ``x`` is the network input
    in [0, 1] or uint8 (0-255) on ``window_hu``."""
    lo, hi = window_hu
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    level = (min_hu - lo) / (hi - lo) * scale
    size = max(int(round(size_mm / pixel_mm)), 1)
    # the mean over the lung pixels of the square only: at the lungs' edge the chest wall
    # and mediastinum would otherwise make every border pixel "dense"
    w = lung.astype(np.float32)
    total = ndimage.uniform_filter(x.astype(np.float32) * w, size=(1, size, size), mode="constant")
    share = ndimage.uniform_filter(w, size=(1, size, size), mode="constant")
    dense = (total >= level * np.maximum(share, 1e-6)) & (share >= 0.5)
    near_lesion = ndimage.binary_dilation(lesion, structure=np.ones((1, 5, 5), bool)) if lesion.any() else lesion
    return dense & lung & ~near_lesion


def _compact(case: dict[str, np.ndarray], hard: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A training case in two bytes per pixel: x and flags (bit 0 lesion, bit 1 inside,
    bit 2 hard negative)."""
    flags = case["lesion"].astype(np.uint8) | (case["inside"].astype(np.uint8) << 1)
    if hard is not None:
        flags |= hard.astype(np.uint8) << 2
    return {"x": case["x"], "flags": flags, "kind": case["kind"], "seed": case["seed"]}


def _compact_with_hard_negatives(settings: "InfectionTrainSettings"):
    """The ``load_cases`` transform of training cases: :func:`_compact` with the hard
    negatives of ``settings`` flagged (none when ``hard_negative_fraction`` is 0)."""

    def transform(case: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hard = None
        if settings.hard_negative_fraction > 0:
            # planes have pixel_mm pixels unless the lungs' box is wider than max_size of
            # them (rare; the square is then a little wider in mm)
            hard = hard_negative_pixels(case["x"], case["lung"], case["lesion"], settings.input.hu_window,
                                        settings.input.pixel_mm, settings.hard_negative_hu, settings.hard_negative_mm)
        return _compact(case, hard)

    return transform


def _pick_focus_pixel(region: np.ndarray, rng: np.random.Generator, by_focus: bool) -> tuple[int, int]:
    """A pixel of ``region`` (2D bool): of a focus (connected part) drawn uniformly when
    ``by_focus``, so that a small focus beside a large one is the centre as often;
    otherwise uniformly over all pixels."""
    if by_focus:
        labels, n = ndimage.label(region)
        if n > 1:
            region = labels == int(rng.integers(1, n + 1))
    ys, xs = np.nonzero(region)
    i = int(rng.integers(ys.size))
    return int(ys[i]), int(xs[i])


def lesion_rows_per_case(table: np.ndarray, has_lesion: np.ndarray) -> list[np.ndarray]:
    """The rows of ``table`` (case, plane) with lesion, grouped by case (cases without
    lesion left out)."""
    rows = np.flatnonzero(has_lesion)
    cases = table[rows, 0]
    return [rows[cases == c] for c in np.unique(cases)]


def draw_lesion_rows(lesion_rows: np.ndarray, by_case: list[np.ndarray], n: int, case_balanced: float,
                     rng: np.random.Generator) -> np.ndarray:
    """``n`` lesion rows: the first ``round(n * case_balanced)`` case by case (a case
    uniformly among ``by_case``, then one of its rows), the others uniformly over
    ``lesion_rows``."""
    n_case = int(round(n * case_balanced)) if by_case else 0
    out = np.empty(n, dtype=np.int64)
    for j, c in enumerate(rng.integers(0, len(by_case), n_case) if n_case else ()):
        out[j] = rng.choice(by_case[c])
    out[n_case:] = rng.choice(lesion_rows, n - n_case)
    return out


def _batch(cases, table: np.ndarray, rows: np.ndarray, crop: int, rng: np.random.Generator,
           hard: np.ndarray | None = None, by_focus: bool = False):
    """(x (n, 3, crop, crop) float in [0, 1], lesion (n, 1, ...), inside (n, 1, ...)).
    Crops of a plane with lesion are centred near a lesion pixel, those where ``hard`` is
    true near a hard-negative pixel (flag bit 2), the others anywhere; ``by_focus``: the
    centre's focus is drawn first (:func:`_pick_focus_pixel`)."""
    n = len(rows)
    x = np.zeros((n, 3, crop, crop), np.float32)
    y = np.zeros((n, 1, crop, crop), np.float32)
    m = np.zeros((n, 1, crop, crop), np.float32)
    for j, r in enumerate(rows):
        c, k = int(table[r, 0]), int(table[r, 1])
        case = cases[c]
        _, H, W = case["x"].shape
        cy = cx = None
        les = (case["flags"][k] & 1).astype(bool)
        centre_on = (case["flags"][k] & 4).astype(bool) if hard is not None and hard[j] else les
        if centre_on.any():
            cy, cx = _pick_focus_pixel(centre_on, rng, by_focus)
        y0, x0 = _crop_origin(H, crop, cy, rng), _crop_origin(W, crop, cx, rng)
        h, w = min(crop, H), min(crop, W)
        stack = plane_stack(case["x"], np.array([k])).numpy()[0]
        x[j, :, :h, :w] = stack[:, y0 : y0 + h, x0 : x0 + w] / 255.0
        y[j, 0, :h, :w] = les[y0 : y0 + h, x0 : x0 + w]
        m[j, 0, :h, :w] = (case["flags"][k, y0 : y0 + h, x0 : x0 + w] >> 1) & 1
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(m)


def scanner_variation_3ch(x: torch.Tensor, inside: torch.Tensor, window_hu: float, hu_offset: float = 60.0,
                          gain: float = 0.08, noise_hu: tuple[float, float] = (0.0, 40.0), blur_px: float = 1.0):
    """HU offset and gain, blur and noise, the same for the three planes of a sample
    (x is (n, 3, H, W) on a window ``window_hu`` wide); air outside ``inside`` stays air."""
    n = x.shape[0]
    dev = x.device
    off = (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * hu_offset / window_hu
    gn = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * gain
    sig = torch.empty(n, 1, 1, 1, device=dev).uniform_(*noise_hu) / window_hu
    y = x * gn + off
    s = float(torch.rand(1).item() * blur_px)
    if s > 0.05:
        y = blur(y.reshape(-1, 1, *y.shape[-2:]), s).reshape(y.shape)
    y = y + torch.randn_like(y) * sig
    return torch.where(inside > 0, y, x).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def evaluate_cases(model: torch.nn.Module, cases, device: torch.device,
                   thresholds: Iterable[float] = (0.3, 0.4, 0.5, 0.6, 0.7), batch_size: int = 16) -> dict:
    """Lesion Dice on whole prepared phantoms at the network's resolution (the mask is
    inside the lungs, as the segmenter's): pooled in ml over all cases (so false positives
    on lesion-free cases lower it; this picks the threshold), the mean per case with
    lesion (also by kind), and the false-positive volume (ml) on cases without lesion."""
    thresholds = tuple(float(t) for t in thresholds)
    seg = InfectionSegmenter(model, device=device, batch_size=batch_size)
    inter = {t: 0.0 for t in thresholds}
    sums = {t: 0.0 for t in thresholds}
    per_case = {t: [] for t in thresholds}
    fp_ml = {t: [] for t in thresholds}
    by_kind: dict[str, dict[float, list[float]]] = {}
    for case in cases:
        x = case["x"].astype(np.float32) / 255.0
        planes = Planes(x=x, inside=case["inside"], lung=case["lung"], positions=np.arange(x.shape[0], dtype=float),
                        z_range=(0, x.shape[0] - 1), box=(0, x.shape[1], 0, x.shape[2]), work_hw=x.shape[1:],
                        pixel_mm=1.0, step_mm=1.0)
        prob = seg.plane_probabilities(planes)
        truth = case["lesion"]
        kind = str(case["kind"]) if "source" not in case else f"{case['source']}: {case['kind']}"
        ml = float(case["voxel_ml"])
        for t in thresholds:
            pred = (prob >= t) & case["lung"]
            i, s = float((pred & truth).sum()), float(pred.sum() + truth.sum())
            # pooled in ml over every case: false positives of lesion-free cases count too
            inter[t] += i * ml
            sums[t] += s * ml
            if truth.any():
                d = 2 * i / max(s, 1.0)
                per_case[t].append(d)
                by_kind.setdefault(kind, {tt: [] for tt in thresholds})[t].append(d)
            else:
                fp_ml[t].append(float(pred.sum()) * ml)
    pooled = {t: 2 * inter[t] / sums[t] if sums[t] > 0 else 1.0 for t in thresholds}
    best = max(thresholds, key=lambda t: (pooled[t], -abs(t - 0.5)))
    return {
        "dice_pooled": {str(t): round(v, 4) for t, v in pooled.items()},
        "dice_case_mean": {str(t): round(float(np.mean(v)), 4) if v else None for t, v in per_case.items()},
        "dice_case_mean_by_kind": {k: {str(t): round(float(np.mean(v)), 4) for t, v in d.items()}
                                   for k, d in by_kind.items()},
        "false_positive_ml_mean_normal": {str(t): round(float(np.mean(v)), 3) if v else None for t, v in fp_ml.items()},
        "best_threshold": best,
        "dice": round(pooled[best], 4),
    }


# ----------------------------------------------------------------------------- training


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoProgress(), (lambda k=1: None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = Progress(TextColumn(desc), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                 TimeRemainingColumn(), transient=False)
    task = p.add_task(desc, total=total)
    return p, (lambda k=1: p.advance(task, k))


def train_infection_unet(seeds_train: Iterable[int], seeds_val: Iterable[int],
                         settings: InfectionTrainSettings | None, device: torch.device | str = "cpu",
                         progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train ``infection_unet`` on phantoms ``seeds_train`` (kinds by
    :func:`ct_ai_node.training.data.kind_for_index`), validate on ``seeds_val``.
    Returns the model (eval mode, on ``device``) and a metrics dict (losses, validation
    Dice by threshold, the best threshold, timings); save it with :func:`save_infection_unet`."""
    s = settings or InfectionTrainSettings()
    device = torch.device(device)
    seeds_train, seeds_val = list(seeds_train), list(seeds_val)  # phantom seeds or site cases
    check_fit_cases(seeds_train, seeds_val)
    # a site scan without a lesion mask teaches nothing about lesions here
    seeds_train = [r for r in seeds_train if getattr(r, "lesion_mask", True) or case_kind(r) != "covid"]
    seeds_val = [r for r in seeds_val if getattr(r, "lesion_mask", True) or case_kind(r) != "covid"]
    if s.crop % SIZE_MULTIPLE:
        raise ValueError(f"crop must be a multiple of {SIZE_MULTIPLE}, got {s.crop}")
    if 2 ** (len(s.channels) - 1) > SIZE_MULTIPLE:
        raise ValueError(f"at most {SIZE_MULTIPLE.bit_length()} U-Net levels (planes are padded to {SIZE_MULTIPLE})")
    t0 = time.time()
    prog, adv = _progress(progress, len(seeds_train) + len(seeds_val), "prepare infection phantoms")
    with prog:
        train = load_cases(seeds_train, s, adv, transform=_compact_with_hard_negatives(s))
        val = load_cases(seeds_val, s, adv)
    t_data = time.time() - t0

    # (case, plane) table; planes with lesion are oversampled
    table = np.array([(c, k) for c, case in enumerate(train) for k in range(case["x"].shape[0])], dtype=np.int64)
    has_lesion = np.array([bool((train[c]["flags"][k] & 1).any()) for c, k in table])
    lesion_rows = np.flatnonzero(has_lesion)
    lesion_rows_by_case = lesion_rows_per_case(table, has_lesion)
    hard_rows = np.flatnonzero([bool((train[c]["flags"][k] & 4).any()) for c, k in table])
    steps_per_epoch = s.steps_per_epoch or max(1, len(table) // s.batch_size)
    n_les = int(round(s.batch_size * s.lesion_plane_fraction)) if lesion_rows.size else 0
    n_hard = min(int(round(s.batch_size * s.hard_negative_fraction)), s.batch_size - n_les) if hard_rows.size else 0
    hard_slots = np.zeros(s.batch_size, bool)
    hard_slots[n_les:n_les + n_hard] = True

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model = build(ARCHITECTURE, channels=tuple(s.channels), num_res_units=s.num_res_units).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    total = s.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=max(total, 1), pct_start=0.15)
    dice_loss = DiceLoss(sigmoid=True, batch=True)
    amp = device.type == "cuda"
    window = float(s.input.hu_window[1] - s.input.hu_window[0])
    losses: list[float] = []
    t1 = time.time()
    prog, adv = _progress(progress, total, "train infection U-Net")
    with prog:
        for epoch in range(s.epochs):
            model.train()
            ep = []
            for _ in range(steps_per_epoch):
                rows = rng.integers(0, len(table), s.batch_size)
                if n_les:
                    rows[:n_les] = draw_lesion_rows(lesion_rows, lesion_rows_by_case, n_les,
                                                    s.lesion_case_balanced_fraction, rng)
                if n_hard:
                    rows[n_les:n_les + n_hard] = rng.choice(hard_rows, n_hard)
                xb, yb, mb = (t.to(device, non_blocking=True)
                              for t in _batch(train, table, rows, s.crop, rng, hard_slots, s.centre_by_focus))
                if s.augment:
                    xb = scanner_variation_3ch(xb, mb, window)
                    xb, yb = random_affine(xb, yb)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(xb).float()
                bce = F.binary_cross_entropy_with_logits(logits, yb)
                loss = s.dice_weight * dice_loss(logits, yb) + s.bce_weight * bce
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ep.append(float(loss.item()))
                adv()
            losses.append(float(np.mean(ep)))
            logger.info("infection U-Net epoch %d/%d loss %.4f", epoch + 1, s.epochs, losses[-1])
    t_train = time.time() - t1
    model.eval()
    val_metrics = evaluate_cases(model, val, device, s.val_thresholds) if val else {}
    metrics = {
        "train_cases": len(train),
        "val_cases": len(val),
        "train_planes": int(len(table)),
        "train_planes_with_lesion": int(lesion_rows.size),
        "train_cases_with_lesion": len(lesion_rows_by_case),
        "train_planes_with_hard_negatives": int(hard_rows.size),
        "steps": int(total),
        "loss_by_epoch": [round(v, 5) for v in losses],
        "val": val_metrics,
        "threshold": float(val_metrics.get("best_threshold", 0.5)),
        "val_dice": val_metrics.get("dice"),
        "train_seeds": describe_cases(seeds_train),
        "val_seeds": describe_cases(seeds_val),
        "arch_kwargs": arch_kwargs_of(model),
        "settings": json.loads(json.dumps(asdict(s), default=str)),
        "data_seconds": round(t_data, 1),
        "train_seconds": round(t_train, 1),
        "seconds": round(time.time() - t0, 1),
        "device": str(device),
    }
    return model, metrics


def trained_on_text(train_cases: str) -> str:
    """What the weights learnt from, as shown to the radiologist (``describe_cases`` text in)."""
    if "real-background" in train_cases:
        return "synthetic phantoms + real CT with synthetic lesions"  # docs/models.md says which real CT
    return "synthetic chest-CT phantoms only"


def save_infection_unet(model: torch.nn.Module, weights_dir: Path, metrics: dict,
                        input_settings: InfectionSettings | None = None, version: str = MODEL_VERSION) -> str:
    """Write ``weights_dir/infection_unet.safetensors`` (fp16) with the metadata the
    segmenter reads (``threshold``, ``input_settings``) and update the manifest;
    returns the file's SHA-256."""
    if input_settings is None:
        input_settings = InfectionSettings.from_json(json.dumps(metrics.get("settings", {}).get("input", {})))
    extra = {
        "threshold": str(float(metrics.get("threshold", 0.5))),
        "input_settings": input_settings.to_json(),
        "trained_on": trained_on_text(str(metrics.get("train_seeds", ""))),
        "val_dice": str(metrics.get("val_dice")),
        "train_seeds": str(metrics.get("train_seeds", "")),
        "val_seeds": str(metrics.get("val_seeds", "")),
    }
    return save_model(model.cpu(), Path(weights_dir) / f"{WEIGHTS_NAME}.safetensors", architecture=ARCHITECTURE,
                      arch_kwargs=arch_kwargs_of(model), version=version, extra=extra)
