"""The ensemble pipeline: every method whose weights are present, combined.

Probability: the mean of the members' probabilities (each already calibrated so that
0.5 is its own decision point). Slice scores and heat maps: the means of the members'
(every member's map is in [0, 1] in the volume's geometry). Positive slices: lung
slices whose mean score is at least 0.5. A member that fails makes the whole
ensemble fail (a silent fallback to fewer members would change what the report says).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ct_ai_node import __version__
from ct_ai_node.errors import ModelError, WeightsMissing
from ct_ai_node.pipeline.methods import PIPELINES, MethodOutput, create_method, register_pipeline
from ct_ai_node.pipeline.slice_input import lung_slice_indices
from ct_ai_node.pipeline.types import AlgorithmInfo

NAME = "ensemble"
MIN_LUNG_FRACTION = 0.02


class EnsembleMethod:
    name = NAME

    def __init__(self, members: dict[str, object]):
        if len(members) < 2:
            raise ModelError(f"the ensemble needs at least two pipelines with weights; found {len(members)}")
        self.members = members
        self.algorithm = AlgorithmInfo(name=f"ct-ai-node ensemble ({', '.join(members)})", version=__version__)

    def __call__(self, hu, spacing, orientation, lung_labels) -> MethodOutput:
        outs: dict[str, MethodOutput] = {}
        timings: dict[str, float] = {}
        for name, method in self.members.items():
            t = time.perf_counter()
            outs[name] = method(hu, spacing, orientation, lung_labels)
            timings[name] = round(time.perf_counter() - t, 3)
        n = len(outs)
        probability = float(np.mean([o.probability for o in outs.values()]))
        scores = np.mean([o.slice_scores for o in outs.values()], axis=0).astype(np.float32)
        heat = np.zeros(hu.shape, np.float32)
        for o in outs.values():
            heat += o.heatmap / n
        zs = lung_slice_indices(lung_labels > 0, MIN_LUNG_FRACTION)
        positive = zs[scores[zs] >= 0.5]
        thresholds = [o.infection_threshold for o in outs.values() if o.infection_threshold is not None]
        versions: dict[str, str] = {}
        for o in outs.values():
            versions.update(o.model_versions)
        return MethodOutput(
            probability=probability,
            threshold=0.5,
            slice_scores=scores,
            positive_slices=positive,
            positive_slice_ratio=float(positive.size / max(zs.size, 1)),
            heatmap=np.clip(heat, 0.0, 1.0),
            algorithm=self.algorithm,
            model_versions=versions,
            timings_s={f"{k}": v for k, v in timings.items()},
            infection_threshold=float(np.mean(thresholds)) if thresholds else None,
        )


def ensemble_members(device: torch.device, weights_dir: Path | None) -> dict[str, object]:
    members = {}
    for name in sorted(PIPELINES):
        if name == NAME:
            continue
        try:
            members[name] = create_method(name, device, weights_dir)
        except WeightsMissing:
            continue  # no weights: not a member. Weights present but refused (hash, damage) raise
    return members


@register_pipeline(NAME, "Ensemble: mean probability, slice scores and heat maps of every pipeline whose weights "
                   "are present")
def _factory(device: torch.device, weights_dir: Path | None) -> EnsembleMethod:
    return EnsembleMethod(ensemble_members(device, weights_dir))
