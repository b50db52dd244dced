"""``ct-ai-node train METHOD``: one entry point per trainable model.

Seeds: training phantoms from ``TRAIN_SEED0``, validation (calibration, model
selection) from ``VAL_SEED0``; held-out test seeds (``TEST_SEED0`` and up) are
never used here. Every trainer writes fp16 safetensors plus its manifest entry
into ``out_dir``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from ct_ai_node.training.budget import apply_overrides
from ct_ai_node.training.data import describe_cases, fit_phantoms

#: METHOD argument -> what it trains
TRAINABLE = {
    "default": "method A slice classifier + lung U-Net (the bundled default models)",
    "ctnet": "method B residual attention network",
    "dual-sampling": "method C uniform + size-balanced 3D networks",
    "resnext-lstm": "method D ResNeXt + CBAM + BiLSTM",
    "infection": "2.5D infection U-Net",
    "lungs": "lung U-Net alone (fine-tunes the shipped one; with --backgrounds on real scans too)",
    "lobes": "lobe U-Net (five lobes, on phantoms whose fissures the generator draws)",
}


def _with(settings, **changes):
    """A settings dataclass with the options that were given (None = keep its default)."""
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})


def fit_cases(cases: int, val_cases: int, data_dir: Path | None = None, backgrounds: Path | None = None,
              held_out: Sequence[str] = (), log=print) -> tuple[list, list]:
    """(training, validation) case references: the first ``cases`` / ``val_cases``
    phantoms of the training / validation seed ranges, or a site's scans (``labels.csv``
    split column; its "test" rows are never used here); plus, with ``backgrounds``, real
    scans with synthetic lesions inserted (:mod:`ct_ai_node.training.real_backgrounds`)
    from every series under that folder except those ``held_out`` names."""
    train, val = _fit_cases(cases, val_cases, data_dir)
    if backgrounds is not None:
        from ct_ai_node.training.real_backgrounds import background_fit_cases

        bg_train, bg_val = background_fit_cases(Path(backgrounds), tuple(held_out), log=log)
        train, val = train + bg_train, val + bg_val
    return train, val


def _fit_cases(cases: int, val_cases: int, data_dir: Path | None) -> tuple[list, list]:
    if data_dir is None:
        return fit_phantoms(cases, val_cases)
    from ct_ai_node.errors import InputRejected
    from ct_ai_node.training.site_data import read_site_cases, split_cases

    rows = read_site_cases(Path(data_dir))
    train, val = split_cases(rows, "train"), split_cases(rows, "val")
    if not train or not val:
        raise InputRejected(f"--data {data_dir}: {len(train)} training and {len(val)} validation scans; "
                            "both are needed (split column, or at least 5 rows)")
    return train, val


def train_method(method: str, out_dir: Path, device: torch.device, *, cases: int, val_cases: int,
                 epochs: int | None = None, shape=None, cache_dir: Path | None = None, log=print,
                 data_dir: Path | None = None, workers: int | None = None, overrides: Sequence[str] = (),
                 backgrounds: Path | None = None, held_out: Sequence[str] = ()) -> dict:
    """Train METHOD on phantoms (``cases`` / ``val_cases``) or on a site's scans
    (``data_dir``, see :mod:`ct_ai_node.training.site_data`), plus real ``backgrounds``
    with inserted lesions (except ``held_out``). ``overrides`` are
    ``KEY=VALUE`` changes of the method's training settings (``--set``)."""
    out_dir = Path(out_dir)
    train, val = fit_cases(cases, val_cases, data_dir, backgrounds, held_out, log)

    def settings_of(defaults, **changes):
        try:
            return apply_overrides(_with(defaults, **changes), overrides)
        except ValueError as exc:
            from ct_ai_node.errors import InputRejected

            raise InputRejected(str(exc)) from None

    if method == "ctnet":
        from ct_ai_node.training.train_b import TrainBSettings, save_method_b, train_method_b

        settings = settings_of(TrainBSettings(), epochs=epochs, shape=shape, workers=workers)
        model, metrics = train_method_b(train, val, settings, device, log=log)
        return {"sha256": save_method_b(model, metrics, out_dir), "metrics": metrics}
    if method == "dual-sampling":
        from ct_ai_node.training.train_c import TrainCSettings, train_method_c_models

        settings = settings_of(TrainCSettings(), epochs=epochs, shape=shape, cache_dir=cache_dir, workers=workers)
        return train_method_c_models(out_dir, train, val, settings, device, progress=False, log=log)
    if method == "resnext-lstm":
        from ct_ai_node.training.train_d import TrainDSettings, save_method_d, train_method_d

        settings = settings_of(TrainDSettings(), epochs=epochs, shape=shape, cache_dir=cache_dir, workers=workers)
        model, metrics = train_method_d(train, val, settings, device, log=log)
        seeds = f"train {describe_cases(train)}, val {describe_cases(val)}"
        return {"sha256": save_method_d(model, metrics, out_dir, seeds=seeds), "metrics": metrics}
    if method == "infection":
        from ct_ai_node.training.train_infection import (
            InfectionTrainSettings,
            save_infection_unet,
            train_infection_unet,
        )

        settings = settings_of(InfectionTrainSettings(), epochs=epochs, shape=shape,
                               cache_dir=None if cache_dir is None else str(cache_dir), workers=workers)
        model, metrics = train_infection_unet(train, val, settings, device)
        return {"sha256": save_infection_unet(model, out_dir, metrics, settings.input), "metrics": metrics}
    if method == "lungs":
        from ct_ai_node.training.train_lungs import LungTrainSettings, save_lung_unet, train_lung_model

        settings = settings_of(LungTrainSettings(), epochs=epochs, shape=shape, workers=workers,
                               cache_dir=None if cache_dir is None else str(cache_dir))
        model, metrics = train_lung_model(train, val, settings, device, log=log)
        return {"sha256": save_lung_unet(model, out_dir, metrics), "metrics": metrics}
    if method == "lobes":
        from ct_ai_node.errors import InputRejected
        from ct_ai_node.training.data import _is_seed
        from ct_ai_node.training.train_lobes import LobeTrainSettings, save_lobe_unet, train_lobe_unet

        if not all(_is_seed(r) for r in list(train) + list(val)):
            raise InputRejected("lobes: trained on phantoms only (no lobe labels in site scans or backgrounds)")
        settings = settings_of(LobeTrainSettings(), epochs=epochs, shape=shape, workers=workers)
        model, metrics = train_lobe_unet(list(train), list(val), settings, device, log=log)
        return {"sha256": save_lobe_unet(model, out_dir, metrics, settings.input), "metrics": metrics}
    raise ValueError(f"unknown METHOD {method!r}; one of: {', '.join(TRAINABLE)}")
