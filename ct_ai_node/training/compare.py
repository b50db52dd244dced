"""Side-by-side evaluation of several pipelines on the same held-out phantoms.

Every phantom is generated once and its lungs segmented once (the default U-Net);
each pipeline then runs the same stages as ``analyze`` on that volume. The rows
and the per-pipeline summaries (AUC, sensitivity, specificity, F1, slice-level AUC, lung and lesion
Dice, volume errors, pointing game, heat in lesion, seconds per case) are written
to ``out_dir`` and feed the table in ``docs/models.md``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.errors import ModelError
from ct_ai_node.pipeline.ensemble import NAME as ENSEMBLE
from ct_ai_node.pipeline.ensemble import EnsembleMethod
from ct_ai_node.pipeline.methods import DEFAULT_PIPELINE, create_method
from ct_ai_node.pipeline.run import PipelineSettings, create_lung_segmenter
from ct_ai_node.training.data import TEST_SEED0, describe_cases, phantom_pool
from ct_ai_node.training.evaluate import _prefetch, evaluate_case, phantom_volume, rows_json, summarise


def _fingerprint(hu: np.ndarray, spacing) -> tuple:
    # every pipeline gets a fresh copy of the same phantom: key on a cheap fingerprint
    return (hu.shape, tuple(spacing), float(hu[::7, ::13, ::13].sum(dtype=np.float64)))


class _CachedMethod:
    """A member pipeline whose output on the current phantom is kept, so the ensemble
    combines the very outputs the members were scored with instead of running every
    member a second time. ``seconds`` is the member's own time on that phantom."""

    def __init__(self, method):
        self.method = method
        self.name = getattr(method, "name", "method")
        self.algorithm = getattr(method, "algorithm", None)
        self._key = None
        self._out = None
        self.seconds = 0.0

    def __call__(self, hu, spacing, orientation, lung_labels):
        key = _fingerprint(hu, spacing)
        if key != self._key:
            t = time.perf_counter()
            self._out = self.method(hu, spacing, orientation, lung_labels)
            self.seconds = time.perf_counter() - t
            self._key = key
        return self._out


class _CachedLungs:
    """The lung labels of the current phantom, computed once for all pipelines."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.name = getattr(segmenter, "name", "lungs")
        self.version = getattr(segmenter, "version", "1")
        self._key = None
        self._labels = None
        self.seconds = 0.0

    def __call__(self, hu, spacing, orientation):
        key = _fingerprint(hu, spacing)
        if key != self._key:
            t = time.perf_counter()
            self._labels = self.segmenter(hu, spacing, orientation)
            self.seconds = time.perf_counter() - t
            self._key = key
        return self._labels


class _CachedInfection:
    """The opacity U-Net's mask of the current phantom, computed once for all pipelines
    (its case model and settings are the segmenter's)."""

    def __init__(self, segmenter):
        self.segmenter = segmenter
        self.name, self.version = segmenter.name, segmenter.version
        self.case_model, self.trained_on = segmenter.case_model, segmenter.trained_on
        self._key = None
        self._out = None

    def __call__(self, hu, spacing, lung_labels):
        key = _fingerprint(hu, spacing)
        if key != self._key:
            self._out = self.segmenter(hu, spacing, lung_labels)
            self._key = key
        return self._out


def compare_pipelines(out_dir: Path, pipelines: list[str], n_cases: int, device: torch.device, *,
                      lungs: str = "unet", shape=None, seed0: int = TEST_SEED0, weights_dir: Path | None = None,
                      settings: dict[str, PipelineSettings] | None = None, workers: int | None = None,
                      log=print, cases: list | None = None, infection: str = "unet") -> dict:
    """``cases``: site cases (``--data``) instead of the held-out phantoms ``seed0`` ...;
    ``infection``: "unet" (the opacity U-Net and its case model decide, the same for every
    pipeline; each method's own probability and slice scores are scored beside) or
    "heatmap" (each pipeline's own map and decision)."""
    from ct_ai_node.pipeline.model_cache import create_infection_source

    inf = create_infection_source(infection, device, weights_dir)
    inf = _CachedInfection(inf) if inf is not None else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods, skipped = {}, {}
    for name in pipelines:
        if name == ENSEMBLE:
            continue
        try:
            methods[name] = _CachedMethod(create_method(name, device, weights_dir))
        except (ModelError, ValueError) as exc:
            skipped[name] = " ".join(str(exc).split())
            log(f"{name}: skipped ({skipped[name]})")
    if ENSEMBLE in pipelines:
        # the ensemble of the evaluated members, on their kept outputs (last, after them);
        # its time per case is the sum of the members' times plus its own
        try:
            methods[ENSEMBLE] = EnsembleMethod(dict(methods))
        except ModelError as exc:
            skipped[ENSEMBLE] = " ".join(str(exc).split())
            log(f"{ENSEMBLE}: skipped ({skipped[ENSEMBLE]})")
    lungs_cached = _CachedLungs(create_lung_segmenter(lungs, device, weights_dir))
    seeds = cases if cases is not None else [seed0 + i for i in range(n_cases)]
    n_cases = len(seeds)
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    n_workers = max(1, min(workers or (os.cpu_count() or 2) - 1, 8))
    with phantom_pool(n_workers) as pool:
        for i, ph in enumerate(_prefetch(pool, seeds, shape, 2 * n_workers)):
            vol = phantom_volume(ph)
            lungs_cached(vol.hu, vol.spacing, vol.orientation)  # once, outside every pipeline's time
            del vol
            for name, method in methods.items():
                row = evaluate_case(ph, method, lungs_cached, None, (settings or {}).get(name), infection=inf)
                if name == ENSEMBLE:
                    row["seconds"] += sum(m.seconds for m in method.members.values())
                row["pipeline"] = name
                row["lung_seconds"] = lungs_cached.seconds
                rows[name].append(row)
                log(f"case {i + 1}/{n_cases} seed {ph.seed} {ph.kind:6s} {name:14s} p={row['probability']:.3f} "
                    f"lesion Dice {row['lesion_dice']} {row['seconds']:.1f} s")
    summaries = {}
    for name, r in rows.items():
        if r:
            summaries[name] = {**summarise(r), "pipeline": name, "lungs": lungs, "infection": infection,
                               "seeds": describe_cases(seeds), "device": str(device)}
    (out_dir / "compare_cases.json").write_text(rows_json(rows))
    (out_dir / "compare_summary.json").write_text(json.dumps({"summaries": summaries, "skipped": skipped},
                                                             indent=2, default=float) + "\n")
    (out_dir / "compare_table.md").write_text(summary_table(summaries))
    return {"summaries": summaries, "skipped": skipped, "rows": rows}


#: (summary key, row label, format) of the side-by-side table
TABLE_ROWS = (
    ("auc", "AUC (COVID-19-like vs other)", "{:.3f}"),
    ("class_accuracy", "three-class accuracy (COVID-19-like / other pneumonia / none)", "{:.3f}"),
    ("method_auc", "AUC of the method's own probability", "{:.3f}"),
    ("sensitivity", "sensitivity at the pipeline's threshold", "{:.3f}"),
    ("specificity", "specificity", "{:.3f}"),
    ("f1", "F1", "{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("slice_auc", "slice-level AUC (slices with lesion in COVID-19-like cases vs all other lung slices)", "{:.3f}"),
    ("method_slice_auc", "slice-level AUC of the method's own slice scores", "{:.3f}"),
    ("lung_dice_mean", "lung Dice (U-Net, shared by all)", "{:.3f}"),
    ("lung_volume_error_pct_mean", "lung volume error, mean abs (%)", "{:.1f}"),
    ("lesion_dice_mean_covid", "lesion Dice, COVID-19-like (the suspected-infection mask: the opacity U-Net's, or with "
     "--infection heatmap the pipeline's own map)", "{:.3f}"),
    ("lesion_dice_mean_cap", "lesion Dice, CAP-like", "{:.3f}"),
    ("lesion_dice_mean_small", "lesion Dice, lesions under 3 % of the lung", "{:.3f}"),
    ("lesion_volume_abs_error_ml_mean_covid", "lesion volume error, COVID-19-like, mean abs (ml)", "{:.1f}"),
    ("lesion_volume_error_pct_mean", "lesion volume error, every case with lesion, mean abs (%)", "{:.1f}"),
    ("pointing_game", "pointing game (heat maximum within 5 mm of a lesion)", "{:.3f}"),
    ("heat_in_lesion_mean", "share of the heat on the lesion", "{:.3f}"),
    ("seconds_per_case_mean", "seconds per case (pipeline + mask + scores, lungs excluded)", "{:.1f}"),
)


def summary_table(summaries: dict[str, dict], seconds_300: dict[str, float] | None = None) -> str:
    """The side-by-side table (markdown): one column per pipeline, one row per metric;
    ``seconds_300`` adds the CPU seconds per 300-slice scan (benchmarks/pipelines.py)."""
    names = list(summaries)
    lines = ["| metric | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    first = summaries[names[0]] if names else {}
    lines.append("| cases (COVID-19-like / other) | "
                 + " | ".join(f"{summaries[n]['cases']} ({summaries[n]['covid']} / {summaries[n]['other']})" for n in names)
                 + " |")
    for key, label, fmt in TABLE_ROWS:
        cells = []
        for n in names:
            v = summaries[n].get(key)
            cells.append("-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if seconds_300:
        cells = [f"{seconds_300[n]:.1f}" if n in seconds_300 else "-" for n in names]
        lines.append("| CPU seconds per 300-slice scan (method only) | " + " | ".join(cells) + " |")
    if first:
        lines.append("")
        lines.append(f"Cases: seeds {first.get('seeds')}; lungs: {first.get('lungs')}; device: {first.get('device')}.")
    return "\n".join(lines) + "\n"


def seconds_per_scan(pipelines: list[str], device: torch.device, *, slices: int = 300, size: int = 512,
                     seed: int = 777, weights_dir: Path | None = None, log=print) -> dict[str, float]:
    """Wall seconds of each pipeline's method (lungs excluded, measured once) on one
    ``slices`` x ``size``² phantom at 1 mm: the 'CPU seconds per 300-slice scan' column."""
    from ct_ai_node.synthetic import generate_phantom

    ph = generate_phantom(seed, kind="covid", shape=(slices, size, size), spacing=(1.0, 0.7, 0.7))
    vol = phantom_volume(ph)
    seg = create_lung_segmenter("unet", device, weights_dir)
    t = time.perf_counter()
    labels = seg(vol.hu, vol.spacing, vol.orientation)
    out = {"lungs (U-Net)": time.perf_counter() - t}
    heat_mask_of = None
    for name in pipelines:
        try:
            method = create_method(name, device, weights_dir)
        except (ModelError, ValueError) as exc:
            log(f"{name}: skipped ({exc})")
            continue
        t = time.perf_counter()
        res = method(vol.hu, vol.spacing, vol.orientation, labels)
        out[name] = time.perf_counter() - t
        log(f"{name}: {out[name]:.1f} s on {slices}x{size}x{size}")
        if name == DEFAULT_PIPELINE:
            heat_mask_of = res
    out.update(infection_stage_seconds(vol, labels, heat_mask_of, device, weights_dir, log))
    return {k: float(np.round(v, 2)) for k, v in out.items()}


def infection_stage_seconds(vol, labels, method_output, device, weights_dir, log=print) -> dict[str, float]:
    """Seconds of the two ways to the suspected-infection mask: thresholding the default
    method's heat map (the stage before issue 12), and the opacity U-Net with the
    ground-glass / consolidation split and the three-class case model (now)."""
    from ct_ai_node.pipeline import scoring
    from ct_ai_node.pipeline.infection import create_infection_segmenter
    from ct_ai_node.pipeline.run import segment_opacities

    out: dict[str, float] = {}
    lung = labels > 0
    if method_output is not None:
        t = time.perf_counter()
        heat = np.zeros_like(method_output.heatmap)
        heat[method_output.positive_slices] = method_output.heatmap[method_output.positive_slices]
        scoring.infection_mask_from_heatmap(heat, lung, vol.hu, vol.spacing,
                                            threshold=method_output.infection_threshold or 0.5, min_hu=-750.0)
        out["heat-map mask"] = time.perf_counter() - t
    try:
        seg = create_infection_segmenter(device, weights_dir)
    except ModelError as exc:
        log(f"opacity U-Net: skipped ({exc})")
        return out
    t = time.perf_counter()
    segment_opacities(seg, vol.hu, vol.spacing, vol.orientation, labels)
    out["opacity U-Net + case model"] = time.perf_counter() - t
    return out
