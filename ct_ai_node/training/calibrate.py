"""``ct-ai-node calibrate PIPELINE``: fit the case decision of a slice-ratio pipeline
(methods A and B: positive when the share of lung slices scoring >= 0.5 exceeds a
threshold) on validation cases, without retraining the network.

The pipeline runs on the validation phantoms (seeds from ``VAL_SEED0``, never the
held-out test set) or on a site's own labelled scans (``--data``), exactly as
``analyze`` does; the ratio threshold (best Youden index) and the probability slope are
fitted to the per-case ratios, written into the weight file's metadata, and the
manifest's hash is updated. The network's tensors are not touched.

Method D (``resnext-lstm``) has no ratio decision; for it ``calibrate`` chooses the heat
level that turns its localisation map into the "suspected infection" mask (best lesion
Dice on the COVID-19-like validation phantoms, as at the end of its training). Run it
again whenever the map changes (a new layer or CAM variant), since the level depends on
how the map is spread.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from ct_ai_node.models.weights import load_model, rewrite_metadata, weights_folder
from ct_ai_node.training.compare import compare_pipelines
from ct_ai_node.training.data import VAL_SEED0, case_kind, describe_cases
from ct_ai_node.training.train import fit_ratio_decision

#: pipeline -> its weight file (without .safetensors) whose "case_decision" it reads
RATIO_PIPELINES = {"radlogics": "method_a_slice_classifier", "ctnet": "method_b_attention"}
#: pipelines whose "infection_threshold" (heat level of the infection mask) is calibrated
HEAT_PIPELINES = ("resnext-lstm",)


def calibrate_pipeline(pipeline: str, device: torch.device, *, cases: int = 60, site_cases: list | None = None,
                       weights_dir: Path | None = None, out_dir: Path, shape=None, log=print) -> dict:
    """Run ``pipeline`` on the validation cases, fit its case decision, write it into
    the weight file; returns the decision, the calibration report and the new hash.
    ``shape``: phantom shape (None: drawn realistic geometries, as for training)."""
    if pipeline in HEAT_PIPELINES:
        if site_cases is not None:
            raise ValueError(f"{pipeline}: the heat level is calibrated on phantoms (their lesion masks); "
                             "--data is not supported for it")
        return calibrate_method_d_heat(device, cases=cases, weights_dir=weights_dir, shape=shape,
                                       cache_dir=Path(out_dir) / "method_d_cache", log=log)
    if pipeline not in RATIO_PIPELINES:
        raise ValueError(f"{pipeline!r} has nothing to calibrate; one of: {', '.join([*RATIO_PIPELINES, *HEAT_PIPELINES])}")
    folder = weights_folder(weights_dir)
    # the method's own decision is what is fitted: its own map and ratio, not the opacity model's
    res = compare_pipelines(out_dir, [pipeline], cases, device, seed0=VAL_SEED0, weights_dir=folder, log=log,
                            infection="heatmap",
                            cases=site_cases, shape=shape)
    if pipeline in res["skipped"]:
        raise ValueError(f"{pipeline}: {res['skipped'][pipeline]}")
    rows = res["rows"][pipeline]
    ratios = np.array([r["ratio"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    if labels.min() == labels.max():
        raise ValueError("calibration needs COVID-19-like and other cases among the validation cases")
    decision, report = fit_ratio_decision(ratios, labels)
    seeds = describe_cases(site_cases) if site_cases is not None else f"{VAL_SEED0}..{VAL_SEED0 + cases - 1}"
    report["cases"] = seeds
    path = folder / f"{RATIO_PIPELINES[pipeline]}.safetensors"
    sha = rewrite_metadata(path, {"case_decision": json.dumps(asdict(decision)),
                                  "case_decision_calibration": json.dumps(report)})
    log(f"{pipeline}: ratio threshold {decision.ratio_threshold:.3f}, slope {decision.slope:.1f} "
        f"(validation AUC {report['val_auc']:.3f} on {len(rows)} cases); {path.name} sha256 {sha[:12]}")
    return {"decision": asdict(decision), "calibration": report, "sha256": sha}


def calibrate_method_d_heat(device: torch.device, *, cases: int = 60, weights_dir: Path | None = None,
                            shape=None, workers: int | None = None, cache_dir: Path | None = None,
                            log=print) -> dict:
    """Method D: prepare the validation phantoms as its training did (the phantom shape
    and crop named in the weight file), compute its heat maps, and write the level with
    the best lesion Dice into the weight file as ``infection_threshold``."""
    from ct_ai_node.pipeline.method_d import WEIGHTS_NAME
    from ct_ai_node.training.train_d import TrainDSettings, build_cache, evaluate, load_case

    folder = weights_folder(weights_dir)
    model = load_model(WEIGHTS_NAME, folder, device)
    training = json.loads(model.metadata.get("training", "{}"))
    if shape is None and training.get("shape"):
        shape = tuple(training["shape"])
    size = json.loads(model.metadata["input"])["size"] if "input" in model.metadata else training.get("input_size")
    settings = TrainDSettings(shape=shape, workers=workers or max(1, (os.cpu_count() or 2) - 1))
    if size:
        settings.input_size = int(size)
    if cache_dir:
        settings.cache_dir = Path(cache_dir)
    # only the COVID-19-like cases have lesions to compare the mask with
    seeds = [s for s in range(VAL_SEED0, VAL_SEED0 + cases) if case_kind(s) == "covid"]
    if not seeds:
        raise ValueError("calibration needs COVID-19-like cases among the validation cases")
    val = [load_case(p) for p in build_cache(seeds, settings)]
    report = evaluate(model.module, val, device, settings.chunk, with_heat=True)
    if "infection_threshold" not in report:
        raise ValueError(f"{WEIGHTS_NAME}: its heat maps do not overlap the lesions at any level; nothing written")
    level = float(report["infection_threshold"])
    calibration = {"cases": f"the {len(seeds)} COVID-19-like of {VAL_SEED0}..{VAL_SEED0 + cases - 1}",
                   "shape": list(shape) if shape else None,
                   "lesion_dice_by_threshold": report["lesion_dice_by_threshold"],
                   "slice_auc_in_covid_volumes": report["slice_auc_in_covid_volumes"]}
    path = folder / f"{WEIGHTS_NAME}.safetensors"
    sha = rewrite_metadata(path, {"infection_threshold": str(level),
                                  "infection_threshold_calibration": json.dumps(calibration)})
    dice = report["lesion_dice_by_threshold"][str(level)]
    log(f"resnext-lstm: infection threshold {level} (lesion Dice {dice:.3f} on {calibration['cases']}); "
        f"{path.name} sha256 {sha[:12]}")
    return {"infection_threshold": level, "calibration": calibration, "sha256": sha}
