"""Evaluation of a pipeline on held-out synthetic phantoms (seeds from ``TEST_SEED0``,
never used for training or calibration). Runs the same stages as ``analyze`` on an
in-memory volume and compares with the phantom's ground truth."""

from __future__ import annotations

import json
import os
from collections import deque
import time
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.pipeline.methods import create_method
from ct_ai_node.pipeline.run import PipelineSettings, analyse_volume, create_lung_segmenter
from ct_ai_node.training.data import (
    KIND_CLASS,
    TEST_SEED0,
    SliceLabelRule,
    case_kind,
    describe_cases,
    make_case,
    phantom_pool,
    slice_labels,
)
from ct_ai_node.training.metrics import confusion, dice, heat_in_lesion_fraction, pointing_game_hit, roc_auc
from ct_ai_node.synthetic import phantom_volume  # noqa: F401 - also imported from here

def evaluate_case(ph, method, lungs, other_lungs=None, settings: PipelineSettings | None = None,
                  infection=None) -> dict:
    vol = phantom_volume(ph)
    t = time.perf_counter()
    res = analyse_volume(vol, method, lungs, settings, infection_segmenter=infection)
    seconds = time.perf_counter() - t
    truth_lung = ph.lung_labels > 0
    vox = float(np.prod(ph.spacing)) / 1000.0
    lesion_ml = float(ph.lesion_mask.sum()) * vox
    row = {
        "seed": ph.seed, "kind": ph.kind, "label": int(ph.kind == "covid"), "probability": res.probability,
        "predicted": int(res.probability >= res.threshold), "ratio": res.positive_slice_ratio,
        "lung_dice": dice(res.lung_labels > 0, truth_lung),
        "lung_lr_dice": float(np.mean([dice(res.lung_labels == k, ph.lung_labels == k) for k in (1, 2)])),
        "lung_ml_true": float(truth_lung.sum()) * vox, "lung_ml_pred": res.lung_volume_ml,
        "lesion_ml_true": lesion_ml, "lesion_ml_pred": res.lesion_volume_ml,
        "lesion_dice": dice(res.infection_mask, ph.lesion_mask) if ph.lesion_mask.any() else None,
        "lesion_fraction_true": lesion_ml / max(float(truth_lung.sum()) * vox, 1e-6),
        "case_class": res.case_class, "class_probabilities": res.class_probabilities,
        "method_probability": res.method_probability,
        "corona_score_ml": res.corona_score_ml, "seconds": seconds, "shape": list(ph.hu.shape),
        "spacing": [round(float(s), 3) for s in ph.spacing],
    }
    # slice labels as in training: slices of COVID-like cases with a clear lesion are
    # positive, every other lung slice negative, slices with a trace of lesion left out;
    # a site's COVID-19 scan without a lesion mask has no slice labels
    if getattr(ph, "has_lesion_mask", True) or ph.kind != "covid":
        labels, weights = slice_labels(ph.lesion_mask, truth_lung, ph.kind, ph.spacing, SliceLabelRule())
        keep = (weights > 0) & truth_lung.any(axis=(1, 2))
        row["slice_labels"] = labels[keep].astype(int).tolist()
        row["slice_scores"] = [round(float(v), 5) for v in np.asarray(res.slice_scores, np.float64)[keep]]
        if res.method_slice_scores is not None:
            row["method_slice_scores"] = [round(float(v), 5)
                                          for v in np.asarray(res.method_slice_scores, np.float64)[keep]]
    if other_lungs is not None:
        t = time.perf_counter()
        other = other_lungs(vol.hu, vol.spacing, vol.orientation)
        row["other_lungs_seconds"] = time.perf_counter() - t
        row["other_lung_dice"] = dice(other > 0, truth_lung)
    # localisation quality on slices that hold a lesion and were analysed with Grad-CAM
    hits, fracs = [], []
    for z in res.positive_slices:
        if ph.lesion_mask[z].sum() >= 20 and res.heatmap[z].max() > 0:
            hits.append(pointing_game_hit(res.heatmap[z], ph.lesion_mask[z], tolerance_px=int(round(5 / ph.spacing[1]))))
            fracs.append(heat_in_lesion_fraction(res.heatmap[z], ph.lesion_mask[z]))
    row["pointing_hits"] = int(sum(hits))
    row["pointing_slices"] = len(hits)
    row["heat_in_lesion"] = float(np.mean(fracs)) if fracs else None
    return row


def summarise(rows: list[dict]) -> dict:
    y = np.array([r["label"] for r in rows])
    p = np.array([r["probability"] for r in rows])
    pred = np.array([r["predicted"] for r in rows])
    conf = confusion(y, pred)
    les = [r for r in rows if r["lesion_ml_true"] > 0]
    pg_n = sum(r["pointing_slices"] for r in rows)
    out = {
        "cases": len(rows), "covid": int(y.sum()), "other": int((1 - y).sum()),
        "auc": roc_auc(y, p), **{k: conf[k] for k in ("sensitivity", "specificity", "f1", "accuracy", "tp", "tn", "fp", "fn")},
        "lung_dice_mean": float(np.mean([r["lung_dice"] for r in rows])),
        "lung_dice_min": float(np.min([r["lung_dice"] for r in rows])),
        "lung_lr_dice_mean": float(np.mean([r["lung_lr_dice"] for r in rows])),
        "lung_volume_error_pct_mean": float(np.mean([abs(r["lung_ml_pred"] - r["lung_ml_true"]) / r["lung_ml_true"] * 100 for r in rows])),
        "lesion_dice_mean_covid": float(np.mean([r["lesion_dice"] for r in les if r["kind"] == "covid"])) if any(r["kind"] == "covid" for r in les) else None,
        "lesion_volume_abs_error_ml_mean_covid": float(np.mean([abs(r["lesion_ml_pred"] - r["lesion_ml_true"]) for r in les if r["kind"] == "covid"])) if les else None,
        "pointing_game": (sum(r["pointing_hits"] for r in rows) / pg_n) if pg_n else None,
        "heat_in_lesion_mean": float(np.mean([r["heat_in_lesion"] for r in rows if r["heat_in_lesion"] is not None])) if any(r["heat_in_lesion"] is not None for r in rows) else None,
        "seconds_per_case_mean": float(np.mean([r["seconds"] for r in rows])),
    }
    out.update(lesion_summary(les, rows))
    out.update(class_summary(rows))
    labelled = [r for r in rows if "slice_labels" in r]
    if labelled:
        # pooled over every labelled lung slice of every case that has slice labels
        sy = np.concatenate([np.asarray(r["slice_labels"], int) for r in labelled])
        ss = np.concatenate([np.asarray(r["slice_scores"], float) for r in labelled])
        out["slice_auc"] = roc_auc(sy, ss) if 0 < sy.sum() < sy.size else None
        out["slices_positive"], out["slices_negative"] = int(sy.sum()), int(sy.size - sy.sum())
        if all("method_slice_scores" in r for r in labelled):  # the method's own, beside the opacity's
            ms = np.concatenate([np.asarray(r["method_slice_scores"], float) for r in labelled])
            out["method_slice_auc"] = roc_auc(sy, ms) if 0 < sy.sum() < sy.size else None
        # infection slices against slices without infection: CAP-like cases (whose slices with
        # consolidation count as negatives above) left out, and within the COVID-19-like cases
        for suffix, keep in (("_without_cap", lambda r: r["kind"] != "cap"), ("_within_covid", lambda r: r["kind"] == "covid")):
            sub = [r for r in labelled if keep(r)]
            if not sub:
                continue
            y = np.concatenate([np.asarray(r["slice_labels"], int) for r in sub])
            for key, name in (("slice_scores", "slice_auc"), ("method_slice_scores", "method_slice_auc")):
                if all(key in r for r in sub) and 0 < y.sum() < y.size:
                    out[name + suffix] = roc_auc(y, np.concatenate([np.asarray(r[key], float) for r in sub]))
    if "other_lung_dice" in rows[0]:
        out["other_lung_dice_mean"] = float(np.mean([r["other_lung_dice"] for r in rows]))
    return out


#: lesions below this share of the lungs are "small" (the issue's small-lesion figure)
SMALL_LESION_FRACTION = 0.03


def lesion_summary(les: list[dict], rows: list[dict]) -> dict:
    """Lesion Dice by kind and for small lesions, volume error in %, false-positive ml."""
    def mean(vals):
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    normal = [r for r in rows if r["lesion_ml_true"] == 0]
    return {
        "lesion_dice_mean_cap": mean(r["lesion_dice"] for r in les if r["kind"] == "cap"),
        "lesion_dice_mean_small": mean(r["lesion_dice"] for r in les if r.get("lesion_fraction_true", 1) < SMALL_LESION_FRACTION),
        "lesion_cases_small": sum(1 for r in les if r.get("lesion_fraction_true", 1) < SMALL_LESION_FRACTION),
        "lesion_volume_error_pct_mean": mean(abs(r["lesion_ml_pred"] - r["lesion_ml_true"]) / r["lesion_ml_true"] * 100
                                             for r in les),
        "lesion_volume_error_pct_mean_covid": mean(abs(r["lesion_ml_pred"] - r["lesion_ml_true"]) / r["lesion_ml_true"]
                                                   * 100 for r in les if r["kind"] == "covid"),
        "lesion_volume_error_pct_mean_cap": mean(abs(r["lesion_ml_pred"] - r["lesion_ml_true"]) / r["lesion_ml_true"]
                                                 * 100 for r in les if r["kind"] == "cap"),
        "false_positive_ml_mean_no_lesion": mean(r["lesion_ml_pred"] for r in normal),
    }


def class_summary(rows: list[dict]) -> dict:
    """Three-class accuracy and confusion (truth -> predicted) when the rows have classes."""
    with_class = [r for r in rows if r.get("case_class")]
    if not with_class:
        return {}
    conf: dict[str, dict[str, int]] = {}
    for r in with_class:
        t = KIND_CLASS.get(r["kind"], "no_pneumonia")
        conf.setdefault(t, {}).setdefault(r["case_class"], 0)
        conf[t][r["case_class"]] += 1
    hits = sum(1 for r in with_class if KIND_CLASS.get(r["kind"]) == r["case_class"])
    mp = [r.get("method_probability") for r in rows]
    method_auc = roc_auc([int(r["kind"] == "covid") for r in rows], mp) if None not in mp else None
    non_covid = [r["probability"] for r in rows if r["kind"] != "covid"]
    covid = [r["probability"] for r in rows if r["kind"] == "covid"]
    return {"class_accuracy": hits / len(with_class), "class_confusion": conf, "method_auc": method_auc,
            "highest_probability_non_covid": max(non_covid) if non_covid else None,
            "lowest_probability_covid": min(covid) if covid else None}


def evaluate_pipeline(out_dir: Path, n_cases: int, device: torch.device, pipeline: str = "radlogics",
                      lungs: str = "classical", shape=None, log=print, seed0: int = TEST_SEED0,
                      weights_dir: Path | None = None, workers: int | None = None,
                      infection: str = "unet", cases: list | None = None) -> dict:
    """``cases``: site cases (``--data``) instead of the held-out phantoms ``seed0`` ..."""
    from ct_ai_node.pipeline.model_cache import create_infection_source

    out_dir.mkdir(parents=True, exist_ok=True)
    method = create_method(pipeline, device, weights_dir)
    infection_model = create_infection_source(infection, device, weights_dir)
    seg = create_lung_segmenter(lungs, device, weights_dir)
    other = create_lung_segmenter("unet" if lungs == "classical" else "classical", device, weights_dir)
    seeds = cases if cases is not None else [seed0 + i for i in range(n_cases)]
    n_workers = max(1, min(workers or (os.cpu_count() or 2) - 1, 12))
    with phantom_pool(n_workers) as pool:
        rows = _evaluate_all(_prefetch(pool, seeds, shape, 2 * n_workers), method, seg, other, len(seeds), log,
                             infection_model)
    summary = summarise(rows)
    summary.update({"pipeline": pipeline, "lungs": lungs, "infection": infection, "seeds": describe_cases(seeds),
                    "device": str(device)})
    (out_dir / "cases.json").write_text(rows_json(rows))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def rows_json(rows) -> str:
    """Per-case rows as JSON text, one row per line (the per-slice lists make an indented
    file ten times larger); ``rows`` is a list of rows or a dict of such lists."""
    def block(rs: list[dict], pad: str) -> str:
        return "[\n" + ",\n".join(pad + "  " + json.dumps(r, default=float) for r in rs) + "\n" + pad + "]"

    if isinstance(rows, dict):
        body = ",\n".join(f"  {json.dumps(k)}: {block(v, '  ')}" for k, v in rows.items())
        return "{\n" + body + "\n}\n"
    return block(rows, "") + "\n"


def _prefetch(pool, seeds, shape, depth: int):
    """Phantoms generated in worker processes, at most ``depth`` ahead of the evaluation
    (a full-size phantom holds about 300 MB)."""
    pending = deque()
    for seed in seeds:
        pending.append(pool.submit(_generate, (seed, case_kind(seed), shape)))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _generate(args):
    seed, kind, shape = args
    return make_case(seed, shape, kind)


def _evaluate_all(phantoms, method, seg, other, n_cases, log, infection=None) -> list[dict]:
    rows = []
    for i, ph in enumerate(phantoms):
        seed = ph.seed
        row = evaluate_case(ph, method, seg, other, infection=infection)
        rows.append(row)
        log(f"case {i + 1}/{n_cases} seed {seed} {ph.kind:6s} p={row['probability']:.3f} lung Dice {row['lung_dice']:.3f}"
            f" (other {row.get('other_lung_dice', float('nan')):.3f}) lesion Dice {row['lesion_dice']} {row['seconds']:.1f} s")
    return rows
