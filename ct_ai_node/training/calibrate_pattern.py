"""``ct-ai-node calibrate pattern``: fit the three-class case model on validation cases.

The infection U-Net (the weights in ``weights_dir``) segments the opacities of every
validation case exactly as ``analyze`` does (lung U-Net, then the segmenter); the
pattern features of :mod:`ct_ai_node.pipeline.pattern` are computed on its mask, and a
multinomial logistic regression (COVID-19-like / other pneumonia / no pneumonia) is
fitted to them. The regression, its features' scaling and how it was fitted (cases,
cross-validated figures) are written into the segmenter's weight file (metadata
``case_model``; tensors unchanged, new hash), so that the mask and the decision read
from it always travel together.

Cases: validation phantoms (seeds from ``VAL_SEED0``; their normal class holds nodules,
atelectasis and emphysema), plus real scans with lesions inserted and real scans as they
are (real negatives) from ``--backgrounds`` (:mod:`ct_ai_node.training.real_backgrounds`,
draws from ``CALIBRATION_DRAW0``, so none is an insertion the segmenter was trained or
validated on; the real scans themselves are shared with its training, named in the
report). Both sources weigh the same in the fit, and the classes the same within each.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import numpy as np

from ct_ai_node.models.weights import rewrite_metadata, weights_folder
from ct_ai_node.pipeline.pattern import FEATURES, PatternModel, fit_pattern_model, pattern_features
from ct_ai_node.pipeline.types import CASE_CLASSES
from ct_ai_node.training.data import KIND_CLASS, VAL_SEED0, case_kind, case_source, describe_cases, make_case, map_cases

logger = logging.getLogger(__name__)

CALIBRATION_DRAW0 = 2000
#: background insertions per real scan for the calibration
CALIBRATION_KINDS = {"covid": 3, "cap": 3, "normal": 1}
L2_GRID = (0.1, 1.0, 10.0)
#: COVID-19-like cases whose lesion is under this share of the lungs are left out of the
#: fit: a few ml of ground glass is too little to call a pattern (a reader would call it
#: indeterminate), and fitting it as COVID-19-like makes every small dependent density on
#: a normal scan (atelectasis, the commonest mimic) COVID-19-like too
MIN_COVID_INVOLVEMENT = 0.01


@functools.lru_cache(maxsize=1)
def _models(weights_dir: str | None):
    from ct_ai_node.pipeline.infection import create_infection_segmenter
    from ct_ai_node.pipeline.run import create_lung_segmenter

    folder = Path(weights_dir) if weights_dir else None
    return create_lung_segmenter("unet", "cpu", folder), create_infection_segmenter("cpu", folder)


def case_row(job) -> dict:
    """Features and mask figures of one case (runs in a worker process)."""
    import torch

    from ct_ai_node.pipeline.run import segment_opacities
    from ct_ai_node.pipeline.scoring import volume_ml
    from ct_ai_node.training.evaluate import phantom_volume
    from ct_ai_node.training.metrics import dice

    torch.set_num_threads(1)
    ref, weights_dir = job
    t = time.perf_counter()
    ph = make_case(ref, None)
    vol = phantom_volume(ph)
    lungs, seg = _models(weights_dir)
    labels = lungs(vol.hu, vol.spacing, vol.orientation)
    lung = labels > 0
    # the features of the stage as analyse_volume runs it (the case model may be absent here)
    found = segment_opacities(seg, vol.hu, vol.spacing, vol.orientation, labels)
    inf = found.mask
    feats = found.features or pattern_features(vol.hu, vol.spacing, vol.orientation, labels, inf, found.consolidation)
    truth = np.asarray(ph.lesion_mask, bool)
    return {
        "case": ref.name + f" {ref.kind} #{ref.draw}" if hasattr(ref, "load") else int(ref),
        "source": case_source(ref),
        "kind": case_kind(ref),
        "class": KIND_CLASS[case_kind(ref)],
        "features": {k: round(float(v), 5) for k, v in feats.items()},
        "lung_ml": round(volume_ml(lung, vol.spacing), 1),
        "lesion_ml_true": round(volume_ml(truth, vol.spacing), 2),
        "lesion_ml_pred": round(volume_ml(inf, vol.spacing), 2),
        "lesion_dice": round(dice(inf, truth), 4) if truth.any() else None,
        "seconds": round(time.perf_counter() - t, 1),
    }


def _weights(rows: list[dict]) -> np.ndarray:
    """Each source the same total weight, each class the same within its source."""
    w = np.zeros(len(rows))
    sources = sorted({r["source"] for r in rows})
    for s in sources:
        idx = [i for i, r in enumerate(rows) if r["source"] == s]
        classes = sorted({rows[i]["class"] for i in idx})
        for c in classes:
            sel = [i for i in idx if rows[i]["class"] == c]
            w[sel] = 1.0 / (len(sources) * len(classes) * len(sel))
    return w


def _xy(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    X = np.array([[r["features"][k] for k in FEATURES] for r in rows], np.float64)
    y = np.array([CASE_CLASSES.index(r["class"]) for r in rows])
    return X, y


def cross_validate(rows: list[dict], l2: float, folds: int = 5, seed: int = 0) -> dict:
    """Stratified k-fold predictions -> weighted log loss, accuracy, COVID-19-like AUC."""
    from ct_ai_node.training.metrics import roc_auc

    X, y = _xy(rows)
    w = _weights(rows)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(rows), int)
    for c in range(len(CASE_CLASSES)):
        idx = np.flatnonzero(y == c)
        fold[rng.permutation(idx)] = np.arange(idx.size) % folds
    P = np.zeros((len(rows), len(CASE_CLASSES)))
    for k in range(folds):
        tr, te = fold != k, fold == k
        if not te.any():
            continue
        m = fit_pattern_model(X[tr], y[tr], w[tr], l2=l2)
        for i in np.flatnonzero(te):
            p = m.probabilities(dict(zip(FEATURES, X[i])))
            P[i] = [p[c] for c in CASE_CLASSES]
    pred = np.array([_decide(p) for p in P])
    ll = -float(np.sum(w * np.log(np.clip(P[np.arange(len(y)), y], 1e-9, 1))) / w.sum())
    return {"l2": l2, "log_loss": round(ll, 4), "accuracy": round(float((pred == y).mean()), 4),
            "auc_covid_like": round(float(roc_auc((y == 0).astype(int), P[:, 0])), 4),
            "predictions": P}


def _decide(p) -> int:
    """The node's rule (pipeline/run.py): COVID-19-like at P >= 0.5, else the likelier other."""
    return 0 if p[0] >= 0.5 else (1 if p[1] >= p[2] else 2)


def calibration_cases(cases: int, backgrounds: Path | None, held_out: tuple[str, ...], log=print) -> list:
    refs: list = list(range(VAL_SEED0, VAL_SEED0 + cases))
    if backgrounds is not None:
        from ct_ai_node.training.real_backgrounds import background_cases, usable_backgrounds

        refs += background_cases(usable_backgrounds(Path(backgrounds), held_out, log=log), CALIBRATION_KINDS,
                                 first_draw=CALIBRATION_DRAW0)
    return refs


def calibrate_pattern(*, cases: int = 45, backgrounds: Path | None = None, held_out: tuple[str, ...] = (),
                      weights_dir: Path | None = None, out_dir: Path, workers: int | None = None,
                      write: bool = True, rows_file: Path | None = None, log=print) -> dict:
    """Compute the features of the calibration cases (or read them from ``rows_file``, a
    ``pattern_calibration_cases.json`` of an earlier run with the same weights), choose
    the penalty by cross-validation, fit, and write the model into the segmenter's weight
    file."""
    from ct_ai_node.pipeline.infection import CASE_MODEL_KEY, WEIGHTS_NAME

    folder = weights_folder(weights_dir)
    if rows_file is not None:
        rows = [{k: v for k, v in r.items() if k != "cv_probabilities"} for r in json.loads(Path(rows_file).read_text())]
        earlier = Path(rows_file).with_name("pattern_calibration.json")  # the earlier run's report
        described = json.loads(earlier.read_text()).get("cases") if earlier.is_file() else None
        described = described or f"the {len(rows)} cases of {Path(rows_file).name}"
    else:
        refs = calibration_cases(cases, backgrounds, held_out, log)
        t0 = time.time()
        rows = list(map_cases(case_row, [(r, str(folder)) for r in refs], workers))
        log(f"features of {len(rows)} cases in {time.time() - t0:.0f} s")
        described = describe_cases(refs)
    # too little opacity to characterise is not fitted as COVID-19-like (see MIN_COVID_INVOLVEMENT)
    fit_rows = [r for r in rows if not _too_little(r)]
    cv = [cross_validate(fit_rows, l2) for l2 in L2_GRID]
    best = min(cv, key=lambda r: r["log_loss"])
    X, y = _xy(fit_rows)
    model = fit_pattern_model(X, y, _weights(fit_rows), l2=best["l2"])
    P = iter(best.pop("predictions"))
    for r in rows:
        if _too_little(r):
            r["left_out"] = f"COVID-19-like with {100 * r['lesion_ml_true'] / r['lung_ml']:.2f} % of the lung"
            continue
        r["cv_probabilities"] = {c: round(float(v), 4) for c, v in zip(CASE_CLASSES, next(P))}
    for r in cv:
        r.pop("predictions", None)
    report = {
        "cases": described, "held_out_backgrounds": list(held_out), "n": len(fit_rows),
        "left_out": sum(1 for r in rows if _too_little(r)), "min_covid_involvement": MIN_COVID_INVOLVEMENT,
        "by_class": {c: int((y == i).sum()) for i, c in enumerate(CASE_CLASSES)},
        "cross_validation": cv, "chosen_l2": best["l2"], "features": list(FEATURES),
        "weights": [list(w) for w in model.weights], "bias": list(model.bias),
        "segmentation": segmentation_summary(rows),
    }
    model = PatternModel(model.features, model.mean, model.scale, model.weights, model.bias,
                         provenance=f"fitted by ct-ai-node calibrate pattern on {described}"
                                    f" ({report['left_out']} COVID-19-like under {100 * MIN_COVID_INVOLVEMENT:g} % "
                                    f"involvement left out); 5-fold CV log loss {best['log_loss']}, "
                                    f"accuracy {best['accuracy']}, AUC COVID-19-like {best['auc_covid_like']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pattern_calibration_cases.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "pattern_calibration.json").write_text(json.dumps(report, indent=1))
    sha = None
    if write:
        sha = rewrite_metadata(folder / f"{WEIGHTS_NAME}.safetensors", {CASE_MODEL_KEY: model.to_json()})
        log(f"case model written into {WEIGHTS_NAME}.safetensors (sha256 {sha[:12]}); CV: "
            + ", ".join(f"l2 {r['l2']}: log loss {r['log_loss']}, accuracy {r['accuracy']}" for r in cv))
    return {"report": report, "sha256": sha}


def segmentation_summary(rows: list[dict]) -> dict[str, float | list[float]]:
    """What the opacity stage did on these validation cases (inference path), per source and
    kind: mean lesion Dice and mean absolute volume error (%) where there is a lesion, the
    opacity ml found where there is none."""
    out: dict[str, float | list[float]] = {}
    for source in sorted({r["source"] for r in rows}):
        for kind in ("covid", "cap", "normal"):
            sel = [r for r in rows if r["source"] == source and r["kind"] == kind]
            if not sel:
                continue
            if kind == "normal":
                out[f"{source} normal opacity ml"] = [r["lesion_ml_pred"] for r in sel]
                continue
            dice = [r["lesion_dice"] for r in sel if r["lesion_dice"] is not None]
            err = [abs(r["lesion_ml_pred"] - r["lesion_ml_true"]) / r["lesion_ml_true"] * 100
                   for r in sel if r["lesion_ml_true"] > 0]
            out[f"{source} {kind} lesion dice mean"] = round(float(np.mean(dice)), 3) if dice else float("nan")
            out[f"{source} {kind} volume error pct mean abs"] = round(float(np.mean(err)), 1) if err else float("nan")
            out[f"{source} {kind} cases"] = len(sel)
    return out


def _too_little(row: dict) -> bool:
    return row["class"] == "covid_like" and row["lesion_ml_true"] < MIN_COVID_INVOLVEMENT * row["lung_ml"]
