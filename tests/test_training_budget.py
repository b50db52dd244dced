"""Fitting training runs to the machine: time budget, --set overrides, phantoms prepared
once for several trainers, coarse-matrix phantoms, installing weights trained elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_ai_node.errors import ModelError
from ct_ai_node.models.weights import install_weights, load_model, read_manifest, save_model
from ct_ai_node.training.budget import apply_overrides, out_of_time, prepare_caches
from ct_ai_node.training.train_c import TrainCSettings
from ct_ai_node.training.train_d import TrainDSettings


def test_out_of_time_projects_one_more_epoch():
    assert not out_of_time(None, 0.0, 3, now=1e9)
    assert not out_of_time(100.0, 0.0, 0, now=50.0)
    # 2 epochs in 60 s: a third would end at 90 s
    assert not out_of_time(100.0, 0.0, 2, now=60.0)
    assert out_of_time(80.0, 0.0, 2, now=60.0)


def test_overrides_parse_json_tuples_paths_and_name_bad_keys():
    s = apply_overrides(TrainDSettings(), ["epochs=3", "lr_max=3e-4", 'arch_kwargs={"norm": "group"}',
                                           "cache_dir=/tmp/x", "shape=[0, 256, 256]", "keep_best=false"])
    assert (s.epochs, s.lr_max, s.arch_kwargs, s.keep_best) == (3, 3e-4, {"norm": "group"}, False)
    assert s.cache_dir == Path("/tmp/x") and s.shape == (0, 256, 256)
    with pytest.raises(ValueError, match="--set nope: no such setting for TrainDSettings"):
        apply_overrides(TrainDSettings(), ["nope=1"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        apply_overrides(TrainDSettings(), ["epochs"])
    with pytest.raises(ValueError, match="--set input: a group of settings"):
        apply_overrides(TrainCSettings(), ["input=1"])


def test_cli_train_set_unknown_key_is_one_line_reason(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ct_ai_node", "train", "resnext-lstm", "--out", str(tmp_path),
                        "--cases", "2", "--val-cases", "1", "--set", "nope=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "--set nope: no such setting for TrainDSettings" in r.stderr
    assert not list(tmp_path.iterdir())


def test_prepare_makes_each_phantom_once_for_every_cache(tmp_path, monkeypatch):
    import ct_ai_node.synthetic as synthetic
    from ct_ai_node.training import data

    made = []
    real = synthetic.generate_phantom

    def counting(seed, **kw):
        made.append(seed)
        return real(seed, **kw)

    monkeypatch.setattr(synthetic, "generate_phantom", counting)
    data._phantom.cache_clear()
    shape = (24, 64, 64)
    n = prepare_caches(["dual-sampling", "resnext-lstm"], [1000, 1002], tmp_path, shape, workers=1)
    assert n == 2 and made == [1000, 1002]
    names = sorted(p.name.split("_")[0] + "_" + p.name.split("_")[1] for p in tmp_path.glob("*.npz"))
    assert names == ["c_1000", "c_1002", "d_1000", "d_1002"]
    # the trainers find them: no phantom is made again
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    data._phantom.cache_clear()
    prepare_caches(["dual-sampling", "resnext-lstm"], [1000, 1002], tmp_path, shape, workers=1)
    assert made == [1000, 1002]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npz")}
    with pytest.raises(ValueError, match="--methods ctnet: nothing to prepare"):
        prepare_caches(["ctnet"], [1000], tmp_path, shape, workers=1)


def test_memoised_phantom_is_read_only():
    from ct_ai_node.training.data import make_case

    ph = make_case(1001, (16, 48, 48))
    assert make_case(1001, (16, 48, 48)) is ph
    with pytest.raises(ValueError):
        ph.hu[0, 0, 0] = 0


def test_coarse_matrix_phantom_keeps_the_scan_geometry():
    from ct_ai_node.synthetic import generate_phantom

    full = generate_phantom(1002, kind="covid")
    coarse = generate_phantom(1002, kind="covid", shape=(0, 256, 256))
    assert coarse.hu.shape == (full.hu.shape[0], 256, 256)
    assert coarse.spacing[0] == full.spacing[0]
    assert coarse.spacing[1] == pytest.approx(full.spacing[1] * 2)
    # same anatomy and lesion plan (pixels under 2 mm): lung and lesion volumes agree
    ml = lambda m, sp: float(m.sum()) * sp[0] * sp[1] * sp[2] / 1000  # noqa: E731
    assert ml(coarse.lung_labels > 0, coarse.spacing) == pytest.approx(ml(full.lung_labels > 0, full.spacing), rel=0.05)
    assert ml(coarse.lesion_mask, coarse.spacing) == pytest.approx(ml(full.lesion_mask, full.spacing), rel=0.15)


def test_install_weights_enters_the_manifest_and_refuses_foreign_files(tmp_path):
    from safetensors.torch import save_file

    from ct_ai_node.models.networks import build

    src = tmp_path / "elsewhere"
    model = build("resnet34_3d_attention", width=4)
    digest = save_model(model, src / "method_c_uniform.safetensors", architecture="resnet34_3d_attention",
                        arch_kwargs={"width": 4}, version="9.9.9")
    site = tmp_path / "site"
    assert install_weights(src / "method_c_uniform.safetensors", site) == digest
    entry = json.loads((site / "manifest.json").read_text())["method_c_uniform.safetensors"]
    assert entry == {"sha256": digest, "architecture": "resnet34_3d_attention", "version": "9.9.9"}
    assert read_manifest(site)["method_c_uniform.safetensors"] == digest
    assert load_model("method_c_uniform", site).metadata["architecture"] == "resnet34_3d_attention"
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelError, match="metadata lacks architecture, version"):
        install_weights(tmp_path / "foreign.safetensors", site)
    assert not (site / "foreign.safetensors").exists()
