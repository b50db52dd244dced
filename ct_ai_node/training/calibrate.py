"""``ct-ai-node calibrate PIPELINE``: fit the case decision of a slice-ratio pipeline
(methods A and B: positive when the share of lung slices scoring >= 0.5 exceeds a
threshold) on validation cases, without retraining the network.

The pipeline runs on the validation phantoms (seeds from ``VAL_SEED0``, never the
held-out test set) or on a site's own labelled scans (``--data``), exactly as
``analyze`` does; the ratio threshold (best Youden index) and the probability slope are
fitted to the per-case ratios, written into the weight file's metadata, and the
manifest's hash is updated. The network's tensors are not touched.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from ct_ai_node.models.weights import BUNDLED_WEIGHTS, rewrite_metadata
from ct_ai_node.training.compare import compare_pipelines
from ct_ai_node.training.data import VAL_SEED0, describe_cases
from ct_ai_node.training.train import fit_ratio_decision

#: pipeline -> its weight file (without .safetensors) whose "case_decision" it reads
RATIO_PIPELINES = {"radlogics": "method_a_slice_classifier", "ctnet": "method_b_attention"}


def calibrate_pipeline(pipeline: str, device: torch.device, *, cases: int = 60, site_cases: list | None = None,
                       weights_dir: Path | None = None, out_dir: Path, shape=None, log=print) -> dict:
    """Run ``pipeline`` on the validation cases, fit its case decision, write it into
    the weight file; returns the decision, the calibration report and the new hash.
    ``shape``: phantom shape (None: drawn realistic geometries, as for training)."""
    if pipeline not in RATIO_PIPELINES:
        raise ValueError(f"{pipeline!r} has no positive-slice-ratio decision to calibrate; "
                         f"one of: {', '.join(RATIO_PIPELINES)}")
    folder = Path(weights_dir) if weights_dir else BUNDLED_WEIGHTS
    res = compare_pipelines(out_dir, [pipeline], cases, device, seed0=VAL_SEED0, weights_dir=folder, log=log,
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
