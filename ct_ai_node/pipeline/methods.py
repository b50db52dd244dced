"""The method interface and the registry of selectable pipelines.

A *method* turns a HU volume plus its lung labels into a volume probability, per-slice
scores and a voxel heat map in the volume's geometry. Methods register a factory by
name; ``ct-ai-node pipelines`` lists them and ``--pipeline NAME`` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from ct_ai_node.pipeline.types import AlgorithmInfo


@dataclass
class MethodOutput:
    probability: float
    #: probability at or above which the case is called positive
    threshold: float
    slice_scores: np.ndarray  # (z,) float32
    positive_slices: np.ndarray  # z indices
    positive_slice_ratio: float
    heatmap: np.ndarray  # (z, y, x) float32 in [0, 1]
    algorithm: AlgorithmInfo
    model_versions: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    #: heat-map level above which a voxel joins the infection mask (calibrated per model)
    infection_threshold: float | None = None
    #: slices the classifier actually ran on (the others' scores are interpolated);
    #: None when every slice was scored
    scored_slices: np.ndarray | None = None


def ratio_decision_output(decision, scores: np.ndarray, lung_slices: np.ndarray, heatmap: np.ndarray, *,
                          algorithm: AlgorithmInfo, model_versions: dict[str, str], timings_s: dict[str, float],
                          infection_threshold: float | None, scored_slices: np.ndarray | None) -> MethodOutput:
    """The output of a slice method whose case decision is the positive-slice ratio
    (``scoring.CaseDecision``): methods A and B."""
    ratio = decision.ratio(scores, lung_slices)
    return MethodOutput(
        probability=decision.probability(ratio),
        threshold=0.5,
        slice_scores=scores,
        positive_slices=decision.positive_slices(scores, lung_slices),
        positive_slice_ratio=ratio,
        heatmap=heatmap,
        algorithm=algorithm,
        model_versions=model_versions,
        timings_s=timings_s,
        infection_threshold=infection_threshold,
        scored_slices=scored_slices,
    )


class Method(Protocol):
    name: str

    def __call__(self, hu: np.ndarray, spacing: tuple[float, float, float], orientation: tuple[float, ...],
                 lung_labels: np.ndarray) -> MethodOutput: ...


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    factory: Callable[[torch.device, Path | None], Method]
    #: weight files (names without .safetensors) the pipeline needs
    weights: tuple[str, ...] = ()

    def missing_weights(self, folder: Path | None = None) -> list[str]:
        from ct_ai_node.models.weights import BUNDLED_WEIGHTS

        folder = Path(folder) if folder else BUNDLED_WEIGHTS
        return [w for w in self.weights if not (folder / f"{w}.safetensors").is_file()]


PIPELINES: dict[str, PipelineSpec] = {}
DEFAULT_PIPELINE = "radlogics"


def register_pipeline(name: str, description: str, weights: tuple[str, ...] = ()):
    def _wrap(factory):
        PIPELINES[name] = PipelineSpec(name, description, factory, tuple(weights))
        return factory

    return _wrap


def create_method(name: str, device: torch.device | str = "cpu", weights_dir: Path | None = None) -> Method:
    _import_builtin_methods()
    try:
        spec = PIPELINES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; available: {', '.join(sorted(PIPELINES))}") from None
    return spec.factory(torch.device(device), weights_dir)


def available_pipelines() -> list[PipelineSpec]:
    _import_builtin_methods()
    return [PIPELINES[k] for k in sorted(PIPELINES)]


def _import_builtin_methods() -> None:
    # Imported lazily so that listing the registry does not pay for every network.
    from ct_ai_node.pipeline import ensemble, method_a, method_b, method_c, method_d  # noqa: F401
