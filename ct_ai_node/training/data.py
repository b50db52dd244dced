"""Training data from synthetic phantoms (or a site's own labelled volumes).

Seeds are split so that no case is shared: training seeds start at
``TRAIN_SEED0``, validation (threshold calibration) at ``VAL_SEED0``, the held-out
test set at ``TEST_SEED0``. The held-out set is never used to fit anything.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from ct_ai_node.pipeline.geometry import resize_slices
from ct_ai_node.pipeline.slice_input import SliceInputSettings, lung_slice_indices, roi_box, slice_tensors

logger = logging.getLogger(__name__)

TRAIN_SEED0 = 1_000
VAL_SEED0 = 50_000
TEST_SEED0 = 90_000

KINDS = ("covid", "cap", "normal")
#: phantom / site kind -> the case class it is (pipeline.types.CASE_CLASSES)
KIND_CLASS = {"covid": "covid_like", "cap": "other_pneumonia", "normal": "no_pneumonia", "other": "no_pneumonia"}


@dataclass(frozen=True)
class SliceLabelRule:
    """A slice of a COVID-like case is positive when its lesion covers at least
    ``min_lesion_mm2`` and ``min_lesion_fraction`` of the slice's lung area; slices
    with some lesion below that are ambiguous and left out of training."""

    min_lesion_mm2: float = 40.0
    min_lesion_fraction: float = 0.005


def kind_for_index(i: int) -> str:
    return KINDS[i % len(KINDS)]


# A training case is a phantom seed (int), a row of a site's labels.csv (SiteCase) or a real
# background with inserted lesions (real_backgrounds.BackgroundCase).

def _is_seed(ref) -> bool:
    return isinstance(ref, (int, np.integer))


def site_scan(ref) -> str | None:
    """The scan file of a site case (what its cache entries are keyed on), None for a seed."""
    return None if _is_seed(ref) else ref.scan


def case_kind(ref) -> str:
    """"covid", "cap", "normal" (phantoms, from the seed) or the site's label."""
    return kind_for_index(ref) if _is_seed(ref) else ref.kind


def case_source(ref) -> str:
    """"phantom", "real background" (a real scan with inserted lesions) or "site" (a site's
    labelled scan): how reports group cases."""
    if _is_seed(ref):
        return "phantom"
    return "real background" if hasattr(ref, "load") else "site"


def case_source_version(ref) -> str:
    """What a prepared case depends on besides its id, for cache keys: the phantom
    generator's version; for a real background with inserted lesions also the lung U-Net
    that planned them (its SHA-256); "" for a site's scan."""
    from ct_ai_node.synthetic.phantom import GENERATOR_VERSION

    if _is_seed(ref):
        return f"generator {GENERATOR_VERSION}"
    if hasattr(ref, "load"):
        return f"generator {GENERATOR_VERSION} lungs {bundled_lung_unet_hash()}"
    return ""


def bundled_lung_unet_hash() -> str:
    """The first 12 hex digits of the shipped lung U-Net's SHA-256 ("" when absent)."""
    from ct_ai_node.models.weights import BUNDLED_WEIGHTS, read_manifest
    from ct_ai_node.pipeline.run import LUNG_UNET_WEIGHTS

    return read_manifest(BUNDLED_WEIGHTS).get(f"{LUNG_UNET_WEIGHTS}.safetensors", "")[:12]


def case_id(ref) -> int:
    """An int naming the case in arrays and cache files: the seed, or the site case's
    (negative) row id."""
    return int(ref) if _is_seed(ref) else int(ref.id)


def fit_phantoms(n_train: int, n_val: int) -> tuple[list[int], list[int]]:
    """The first ``n_train`` training and ``n_val`` validation phantom seeds."""
    return list(range(TRAIN_SEED0, TRAIN_SEED0 + n_train)), list(range(VAL_SEED0, VAL_SEED0 + n_val))


def make_case(ref, shape: tuple[int, int, int] | None, kind: str | None = None):
    """The phantom of seed ``ref`` (kind from the seed unless given; ``shape`` None draws
    a realistic geometry), or the site scan ``ref`` loaded as one (``shape`` unused)."""
    if _is_seed(ref):
        return _phantom(int(ref), None if shape is None else tuple(shape), kind or kind_for_index(int(ref)))
    if hasattr(ref, "load"):  # a real background with inserted lesions (training.real_backgrounds)
        return ref.load()
    from ct_ai_node.training.site_data import load_site_case

    return load_site_case(ref)


@functools.lru_cache(maxsize=1)
def _phantom(seed: int, shape: tuple[int, int, int] | None, kind: str):
    """The last phantom made in this process, so that preparing one case for several
    methods (``ct-ai-node prepare``) generates it once. Its arrays are read-only: a
    caller that changed them in place would change them for the next caller too."""
    from ct_ai_node.synthetic import generate_phantom

    ph = generate_phantom(seed, kind=kind, shape=shape)
    for a in (ph.hu, ph.lung_labels, ph.lesion_mask):
        a.flags.writeable = False
    return ph


def describe_cases(refs) -> str:
    """"1000..1059,1070" for phantom seeds, plus "N site scans" for site cases."""
    seeds = sorted(int(r) for r in refs if _is_seed(r))
    n_real = sum(1 for r in refs if hasattr(r, "load"))
    n_site = sum(1 for r in refs if not _is_seed(r) and not hasattr(r, "load"))
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(f"{seeds[i]}..{seeds[j]}" if j > i else str(seeds[i]))
        i = j + 1
    if n_site:
        parts.append(f"{n_site} site scans")
    if n_real:
        names = sorted({r.name for r in refs if hasattr(r, "load")})
        parts.append(f"{n_real} real-background cases ({', '.join(names)})")
    return ",".join(parts)


def check_fit_cases(train: list, val: list) -> None:
    """Refuse held-out test seeds and cases in both sets (one-line ValueError)."""
    bad = [case_id(r) for r in list(train) + list(val) if _is_seed(r) and int(r) >= TEST_SEED0]
    if bad:
        raise ValueError(f"seeds >= {TEST_SEED0} are the held-out test set and never used for fitting: {bad[:5]}")
    both = {case_id(r) for r in train} & {case_id(r) for r in val}
    if both:
        raise ValueError(f"training and validation cases overlap: {sorted(both)[:5]}")


def slice_labels(lesion: np.ndarray, lung: np.ndarray, kind: str, spacing, rule: SliceLabelRule) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice (label, weight): label 1 for clearly infected slices of a COVID-like case;
    weight 0 for ambiguous slices."""
    px_mm2 = spacing[1] * spacing[2]
    les = lesion.reshape(lesion.shape[0], -1).sum(axis=1) * px_mm2
    lung_a = lung.reshape(lung.shape[0], -1).sum(axis=1) * px_mm2
    clear = (les >= rule.min_lesion_mm2) & (les >= rule.min_lesion_fraction * np.maximum(lung_a, 1))
    labels = np.zeros(lesion.shape[0], np.float32)
    weights = np.ones(lesion.shape[0], np.float32)
    if kind == "covid":
        labels[clear] = 1.0
        weights[(les > 0) & ~clear] = 0.0
    return labels, weights


def _evenly(indices: np.ndarray, at_most: int) -> np.ndarray:
    if indices.size <= at_most:
        return indices
    return indices[np.linspace(0, indices.size - 1, at_most).round().astype(int)]


def phantom_samples(seed, kind: str, shape: tuple[int, int, int] | None,
                    settings: SliceInputSettings = SliceInputSettings(), rule: SliceLabelRule = SliceLabelRule(),
                    lung_size: int = 256, max_slices: int = 48) -> dict[str, np.ndarray]:
    """One phantom -> classifier inputs (uint8, 224x224) with labels, and lung U-Net
    inputs (uint8 HU window, ``lung_size``²) with lung masks.

    With ``shape`` None the phantom has a realistic, randomly drawn geometry (0.5-5 mm
    slices, so thin noisy slices are seen as well as thick ones) and at most
    ``max_slices`` evenly spaced slices are kept, so every case weighs about the same.
    ``seed`` may also be a site case (:mod:`ct_ai_node.training.site_data`); without a
    lesion mask every lung slice of its COVID-19-like scan is labelled positive."""
    ph = make_case(seed, shape, kind)
    hu = ph.hu.astype(np.float32)
    lung = ph.lung_labels > 0
    zs = _evenly(lung_slice_indices(lung, settings.min_lung_fraction), max_slices)
    box = roi_box(lung, ph.spacing, settings)
    x = slice_tensors(hu[zs], lung[zs], box, ph.spacing, settings)
    labels, weights = slice_labels(ph.lesion_mask, lung, ph.kind, ph.spacing, rule)
    if not getattr(ph, "has_lesion_mask", True) and ph.kind == "covid":
        labels[:], weights[:] = 1.0, 1.0  # a volume label only: weak slice labels
    crops_lesion = ph.lesion_mask[zs][:, box.y0 : box.y1, box.x0 : box.x1].astype(np.float32)
    lesion_224 = resize_slices(torch.from_numpy(crops_lesion)[:, None], (settings.size, settings.size))[:, 0] >= 0.5
    lung_part = lung_unet_samples(hu, lung, None, lung_size, max_slices)
    return {
        "x": (x[:, 0].numpy() * 255).round().astype(np.uint8),
        "y": labels[zs],
        "w": weights[zs],
        "lesion": lesion_224.numpy(),
        "case": np.full(zs.size, case_id(seed), np.int64),
        **lung_part,
    }


def lung_unet_samples(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray | None, size: int = 256,
                      max_slices: int = 48, ignore: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Lung U-Net inputs of one scan: at most ``max_slices`` evenly spaced slices, with and
    without lung, HU window [-1000, 0] as uint8 at ``size``², the lung mask (which holds
    the lesions: consolidation is lung) and, when ``lesion`` is given, the lesion mask at
    that size (``lung_lesion``); when ``ignore`` is given, where the lung mask is not
    known (``lung_ignore``: no loss there, see :func:`uncertain_lung_target`)."""
    zl = _evenly(np.arange(hu.shape[0]), max_slices)
    t = torch.from_numpy(np.clip((np.asarray(hu[zl], np.float32) + 1000.0) / 1000.0, 0, 1))[:, None]
    lung_x = resize_slices(t, (size, size))[:, 0]

    def mask(m):
        return resize_slices(torch.from_numpy(m[zl].astype(np.float32))[:, None], (size, size))[:, 0].numpy() >= 0.5

    out = {"lung_x": (lung_x.numpy() * 255).round().astype(np.uint8), "lung_y": mask(lung)}
    if lesion is not None:
        out["lung_lesion"] = mask(lesion)
    if ignore is not None:
        out["lung_ignore"] = mask(ignore)
    return out


#: a lung target's soft-tissue density from which its label is not trusted (HU)
UNCERTAIN_TARGET_HU = -400.0


def uncertain_lung_target(hu: np.ndarray, lung: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Where a real background's lung target is not known: its lungs come from an earlier
    lung U-Net, which is right about aerated lung but not about dense tissue it took in
    (stomach contents and the diaphragm's partial volume under the domes of thick slices,
    tumours, hila; issue 12). Dense voxels of the target that are not an inserted lesion
    (those are lung by construction) are left to the phantoms, whose lungs are exact."""
    return lung & ~lesion & (np.asarray(hu) > UNCERTAIN_TARGET_HU)


def _job(args):
    seed, kind, shape = args
    return phantom_samples(seed, kind, shape)


def _lung_job(args):
    ref, kind, shape = args
    ph = make_case(ref, shape, kind)
    lung = ph.lung_labels > 0
    # a phantom's lungs are exact; a real background's come from an earlier lung U-Net
    ignore = np.zeros_like(lung) if case_source(ref) == "phantom" else uncertain_lung_target(ph.hu, lung, ph.lesion_mask)
    out = lung_unet_samples(ph.hu, lung, ph.lesion_mask, ignore=ignore)
    out["case"] = np.full(len(out["lung_x"]), case_id(ref), np.int64)
    return out


def phantom_pool(workers: int) -> ProcessPoolExecutor:
    """Processes that generate phantoms. Started with ``spawn``: a process forked from a
    parent whose torch/OpenMP threads are running can hang on a lock it inherited (seen
    here: a training run stuck in futex waits)."""
    import multiprocessing

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def map_cases(fn, jobs: list, workers: int | None, progress=None):
    """``fn(job)`` for every job, yielded in order: in this process when ``workers`` is 1
    (or there is one job), else in ``workers`` spawned processes (None: one per core);
    ``progress()`` after each."""
    workers = min(workers or max(1, os.cpu_count() or 1), max(len(jobs), 1))
    if workers <= 1:
        results = map(fn, jobs)
        pool = None
    else:
        pool = phantom_pool(workers)
        results = pool.map(fn, jobs, chunksize=1)
    try:
        for r in results:
            yield r
            if progress:
                progress()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def build_slice_dataset(seeds: Iterable[int], shape: tuple[int, int, int] | None, workers: int | None = None,
                        progress=None, lungs_only: bool = False) -> dict[str, np.ndarray]:
    """Generate phantoms (or load cases) in parallel processes and concatenate their
    samples; ``lungs_only``: the lung U-Net's samples alone (:func:`lung_unet_samples`)."""
    jobs = [(s, case_kind(s), shape) for s in seeds]
    parts = list(map_cases(_lung_job if lungs_only else _job, jobs, workers, progress))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
