"""The networks of an analysis, built once and kept loaded in a long-lived process.

``ct-ai-node analyze`` builds them for one series and exits. A worker analyses series after
series: building the networks again for each (weights read and hash-checked, modules built)
and paying the first forward passes' one-time costs (oneDNN kernel choice, thread pools)
inside the first series' time would add 1-2 s to what the radiologist waits for (issue 15,
docs/performance.md). :class:`ModelCache` keeps the last few sets keyed by what was asked for
and by the weight files' sizes and times, so weights a site replaces are loaded again;
:meth:`ModelCache.warm_up` runs them once on a small phantom before the first series.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ct_ai_node.errors import InputRejected

logger = logging.getLogger(__name__)


@dataclass
class ModelSet:
    """What ``analyse_volume`` needs besides the volume."""

    method: object
    lungs: object
    #: the opacity U-Net, or None when the mask comes from the method's heat map
    infection: object | None
    #: the lobe U-Net, or None when the weights folder has none (then no lobes, no CT
    #: severity score; the rest of the analysis is the same)
    lobes: object | None = None


def create_infection_source(kind: str, device, weights_dir: Path | None):
    """None: the infection mask comes from the method's heat map; "unet": the U-Net."""
    if kind == "heatmap":
        return None
    if kind == "unet":
        from ct_ai_node.pipeline.infection import create_infection_segmenter

        return create_infection_segmenter(device, weights_dir)
    raise InputRejected(f"--infection {kind!r}: use 'heatmap' or 'unet'")


def build_models(pipeline: str, lungs: str, infection: str, device: torch.device,
                 weights_dir: Path | None) -> ModelSet:
    """Build the networks. An unknown pipeline or lung segmentation is refused in one line."""
    from ct_ai_node.pipeline.methods import create_method
    from ct_ai_node.pipeline.run import create_lung_segmenter

    try:
        method = create_method(pipeline, device, weights_dir)
        lung_segmenter = create_lung_segmenter(lungs, device, weights_dir)
    except ValueError as exc:  # an unknown name: the caller's mistake, said in one line
        raise InputRejected(" ".join(str(exc).split())) from None
    return ModelSet(method, lung_segmenter, create_infection_source(infection, device, weights_dir),
                    create_lobe_source(device, weights_dir))


def create_lobe_source(device, weights_dir: Path | None):
    """The lobe U-Net when the weights folder lists one (a site's own weights may not)."""
    from ct_ai_node.models.weights import read_manifest, weights_folder
    from ct_ai_node.pipeline.lobes import WEIGHTS_NAME, create_lobe_segmenter

    try:
        listed = f"{WEIGHTS_NAME}.safetensors" in read_manifest(weights_folder(weights_dir))
    except Exception:  # noqa: BLE001 - no manifest: the other models say what is wrong
        listed = False
    return create_lobe_segmenter(device, weights_dir) if listed else None


def weights_fingerprint(weights_dir: Path | None) -> tuple:
    """Name, size and modification time of every file in the weights folder (a few stat
    calls): a replaced file or manifest changes it."""
    from ct_ai_node.models.weights import weights_folder

    folder = weights_folder(weights_dir)
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return (str(folder),)
    out = [str(folder)]
    for path in entries:
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((path.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


class ModelCache:
    """The last ``capacity`` model sets, least recently used dropped first. One process, one
    analysis at a time (a worker): not shared between threads."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._sets: OrderedDict[tuple, ModelSet] = OrderedDict()

    def get(self, pipeline: str, lungs: str, infection: str, device: torch.device,
            weights_dir: Path | None) -> ModelSet:
        key = (pipeline, lungs, infection, str(device), weights_fingerprint(weights_dir))
        models = self._sets.get(key)
        if models is not None:
            self._sets.move_to_end(key)
            return models
        models = build_models(pipeline, lungs, infection, device, weights_dir)
        if self.capacity > 0:
            self._sets[key] = models
            while len(self._sets) > self.capacity:
                self._sets.popitem(last=False)
        return models

    def warm_up(self, pipeline: str, lungs: str, infection: str, device: torch.device,
                weights_dir: Path | None) -> float:
        """Build the set and run it once on a small synthetic chest (48 slices of 256 x 256);
        returns the seconds it took. The first forward passes of each network pay one-time
        costs that would otherwise fall into the first series' analysis."""
        from ct_ai_node.pipeline.run import analyse_volume
        from ct_ai_node.synthetic import generate_phantom, phantom_volume

        start = time.perf_counter()
        models = self.get(pipeline, lungs, infection, device, weights_dir)
        volume = phantom_volume(generate_phantom(1, kind="covid", shape=(48, 256, 256), spacing=(5.0, 1.4, 1.4)))
        analyse_volume(volume, models.method, models.lungs, pipeline_name=pipeline, infection_segmenter=models.infection,
                       lobe_segmenter=models.lobes)
        return time.perf_counter() - start


__all__ = ["ModelCache", "ModelSet", "build_models", "create_infection_source", "create_lobe_source",
           "weights_fingerprint"]
