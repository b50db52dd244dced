"""Networks kept loaded in a worker (issue 15): built once per set of choices, built again
when a site replaces a weights file, and warmed up on a small phantom."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from ct_ai_node.errors import InputRejected
from ct_ai_node.models.weights import BUNDLED_WEIGHTS
from ct_ai_node.pipeline.model_cache import ModelCache, weights_fingerprint

CPU = torch.device("cpu")


def test_the_same_choices_reuse_the_loaded_networks():
    cache = ModelCache(capacity=1)
    first = cache.get("radlogics", "classical", "heatmap", CPU, None)
    assert cache.get("radlogics", "classical", "heatmap", CPU, None) is first
    other = cache.get("radlogics", "unet", "heatmap", CPU, None)
    assert other is not first and other.lungs.name == "unet" and other.infection is None
    # capacity 1: the first set was dropped and is built again
    assert cache.get("radlogics", "classical", "heatmap", CPU, None) is not first


def test_a_replaced_weights_file_is_loaded_again(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(BUNDLED_WEIGHTS, folder)
    cache = ModelCache()
    first = cache.get("radlogics", "classical", "heatmap", CPU, folder)
    before = weights_fingerprint(folder)
    target = folder / "method_a_slice_classifier.safetensors"
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a site copies new weights in
    assert weights_fingerprint(folder) != before
    assert cache.get("radlogics", "classical", "heatmap", CPU, folder) is not first


def test_unknown_choices_are_refused_in_one_line():
    with pytest.raises(InputRejected, match="unknown pipeline 'nope'"):
        ModelCache().get("nope", "unet", "unet", CPU, None)
    with pytest.raises(InputRejected, match="--infection 'nope'"):
        ModelCache().get("radlogics", "unet", "nope", CPU, None)


def test_warm_up_runs_the_networks_and_keeps_them():
    cache = ModelCache()
    seconds = cache.warm_up("radlogics", "unet", "unet", CPU, None)
    assert seconds > 0
    models = cache.get("radlogics", "unet", "unet", CPU, None)
    # the warm-up analysed a phantom: the opacity U-Net ran (its timings are kept)
    assert models.infection is not None and models.infection.last_timings_s
