"""Training of method B (COVID CT-Net residual attention network) on synthetic
phantom slices, then calibration on separate validation phantoms of what the method
needs at inference (case decision, infection level of each Grad-CAM variant).

Recipe of Yazdani, Minaee et al. 2020: binary cross-entropy, RMSProp at lr 0.01, batch
16, augmented slices. Here the slices are method A's lung-ROI crops with slice labels
(:func:`ct_ai_node.training.data.build_slice_dataset`), classes balanced by sampling
(the paper's data set was balanced), augmented on every batch with the rotation /
scale / shift / flip and scanner variation of method A. When RMSProp diverges
(a non-finite loss, or an epoch's mean loss above ``divergence_loss``) training
restarts from the same initialisation with Adam (``fallback_lr``); ``metrics
["optimizer"]`` says which one produced the weights.

    model, metrics = train_method_b(range(1000, 1300), range(50000, 50060), TrainBSettings(), device)
    save_method_b(model, metrics, out_dir)   # or TrainBSettings(out_dir=...)
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ct_ai_node.models.net_b import ARCHITECTURE, CAM_LAYER, parameter_count
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import save_model
from ct_ai_node.pipeline.method_b import WEIGHTS_NAME, BatchGradCAMpp, _minmax
from ct_ai_node.training.augment import random_affine, scanner_variation
from ct_ai_node.training.data import build_slice_dataset, case_id, case_kind, check_fit_cases, describe_cases
from ct_ai_node.training.metrics import confusion, roc_auc
from ct_ai_node.training.train import calibrate_case_decision

MODEL_VERSION = "0.1.0"


@dataclass
class TrainBSettings:
    #: phantom shape (z, y, x); None draws realistic full-size geometries (48 slices per case)
    shape: tuple[int, int, int] | None = None
    epochs: int = 20
    batch_size: int = 16
    #: "rmsprop" (the paper's) or "adam"
    optimizer: str = "rmsprop"
    lr: float = 0.01
    #: RMSProp smoothing constant (Keras' default 0.9, which the paper's code used)
    rmsprop_alpha: float = 0.9
    #: "constant" (the paper's) or "cosine" (decay to 0 over the run)
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    #: restart with Adam at ``fallback_lr`` when RMSProp diverges
    fallback_to_adam: bool = True
    fallback_lr: float = 1e-3
    #: an epoch whose mean loss exceeds this counts as diverged (chance level is ln 2 = 0.69)
    divergence_loss: float = 2.0
    width: int = 16
    #: network input side; the 224 crops of build_slice_dataset are resized when different.
    #: 128 (the bundled weights; the paper: 224) costs a third of 224 on a CPU
    input_size: int = 128
    augment: bool = True
    #: validation slices used to pick the infection level of each explanation (0: skip)
    calibration_slices: int = 400
    seed: int = 0
    workers: int | None = None
    #: when set, the weights (+ manifest) are written here as method_b_attention.safetensors
    out_dir: Path | None = None
    arch_kwargs: dict = field(default_factory=dict)


def _resize_uint8(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size:
        return x
    t = torch.from_numpy(x).float()[:, None]
    r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return r[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _resize_mask(m: np.ndarray, size: int) -> np.ndarray:
    if m.shape[-1] == size:
        return m
    t = torch.from_numpy(m.astype(np.float32))[:, None]
    return (F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0] >= 0.5).numpy()


def _dataset(seeds: list[int], settings: TrainBSettings, progress_cb=None) -> dict[str, np.ndarray]:
    data = build_slice_dataset(seeds, settings.shape, settings.workers, progress_cb)
    data["x"] = _resize_uint8(data["x"], settings.input_size)
    data["lesion"] = _resize_mask(data["lesion"], settings.input_size)
    return data


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        class _Null:
            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

        return _Null(), (lambda k=1: None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = Progress(TextColumn(desc), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                 TimeRemainingColumn(), transient=False)
    task = p.add_task(desc, total=total)
    return p, (lambda k=1: p.advance(task, k))


def _make_optimizer(name: str, params, settings: TrainBSettings, lr: float):
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=settings.rmsprop_alpha, eps=1e-7,
                                   weight_decay=settings.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=settings.weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'rmsprop' or 'adam'")


class _Diverged(Exception):
    pass


def _fit(data: dict, settings: TrainBSettings, device: torch.device, optimizer: str, lr: float,
         init_state: dict, progress: bool, log) -> tuple[torch.nn.Module, list[float]]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build(ARCHITECTURE, width=settings.width, **settings.arch_kwargs)
    model.load_state_dict(init_state)
    model.to(device)
    keep = data["w"] > 0
    x_all, y_all = data["x"][keep], data["y"][keep]
    if len(y_all) < settings.batch_size:
        raise ValueError(f"only {len(y_all)} usable training slices for batch size {settings.batch_size}")
    pos = float(y_all.mean())
    sw = np.where(y_all > 0.5, 0.5 / max(pos, 1e-3), 0.5 / max(1 - pos, 1e-3))
    per_epoch = len(y_all) // settings.batch_size
    steps = settings.epochs * per_epoch
    opt = _make_optimizer(optimizer, model.parameters(), settings, lr)
    sched = None
    if settings.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    elif settings.lr_schedule != "constant":
        raise ValueError(f"unknown lr_schedule {settings.lr_schedule!r}; use 'constant' or 'cosine'")
    amp = device.type == "cuda"
    log(f"method B: {len(y_all)} slices, {pos:.1%} positive, {steps} steps, {optimizer} lr {lr} on {device}")
    epoch_losses: list[float] = []
    prog, adv = _progress(steps, f"train method B ({optimizer})", progress)
    with prog:
        for epoch in range(settings.epochs):
            model.train()
            losses = []
            order = rng.choice(len(y_all), size=per_epoch * settings.batch_size, replace=True, p=sw / sw.sum())
            for i in range(per_epoch):
                idx = order[i * settings.batch_size : (i + 1) * settings.batch_size]
                xb = torch.from_numpy(x_all[idx]).to(device).float()[:, None] / 255.0
                yb = torch.from_numpy(y_all[idx]).to(device)
                if settings.augment:
                    xb = scanner_variation(xb, inside=xb > 0)  # inputs are air (0) outside the dilated lung
                    (xb,) = random_affine(xb)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(xb)[:, 0].float()
                loss = F.binary_cross_entropy_with_logits(logits, yb)
                if not torch.isfinite(loss):
                    raise _Diverged(f"non-finite loss at epoch {epoch + 1}, step {i + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                losses.append(loss.item())
                adv()
            mean = float(np.mean(losses))
            epoch_losses.append(mean)
            if progress:
                log(f"  epoch {epoch + 1}/{settings.epochs} loss {mean:.4f}")
            if not math.isfinite(mean) or mean > settings.divergence_loss:
                raise _Diverged(f"epoch {epoch + 1} mean loss {mean:.3g} > {settings.divergence_loss}")
    return model.eval(), epoch_losses


@torch.no_grad()
def slice_probabilities(model: torch.nn.Module, x_uint8: np.ndarray, device: torch.device,
                        batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(x_uint8), batch):
        xb = torch.from_numpy(x_uint8[i : i + batch]).to(device).float()[:, None] / 255.0
        out.append(torch.sigmoid(model(xb)[:, 0].float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def calibrate_infection_thresholds(model: torch.nn.Module, data: dict, device: torch.device,
                                   max_slices: int = 400) -> tuple[dict[str, float], dict]:
    """Per explanation (Grad-CAM, Grad-CAM++ of ``attention3``): the heat level with the
    best lesion Dice on positive validation slices at the crop (voxels below -750 HU
    never count, as in the pipeline)."""
    from monai.visualize import GradCAM
    import warnings

    pos = np.flatnonzero((data["y"] > 0.5) & (data["w"] > 0))[:max_slices]
    if pos.size == 0 or max_slices <= 0:
        return {}, {}
    model = copy.deepcopy(model).eval()  # MONAI's CAM hooks stay on the copy, not on the returned model
    for p in model.parameters():
        p.requires_grad_(True)
    cams = {"gradcam": GradCAM(model, target_layers=CAM_LAYER, postprocessing=_minmax),
            "gradcampp": BatchGradCAMpp(model, target_layers=CAM_LAYER, postprocessing=_minmax)}
    hu_ok = data["x"][pos] >= int(0.25 * 255)  # >= -750 HU
    truth = data["lesion"][pos]
    levels = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
    best, report = {}, {}
    for kind, cam in cams.items():
        maps = []
        for i in range(0, pos.size, 32):
            xb = torch.from_numpy(data["x"][pos[i : i + 32]]).to(device).float()[:, None] / 255.0
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                maps.append(cam(xb, class_idx=0)[:, 0].detach().float().cpu().numpy())
        heat = np.concatenate(maps)
        res = {}
        for t in levels:
            pred = (heat >= t) & hu_ok
            res[t] = float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
        best[kind] = float(max(res, key=res.get))
        report[f"lesion_dice_by_level_val_{kind}"] = res
    return best, report


def _threshold_table(labels: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    """Sensitivity / specificity / precision at the paper's thresholds 0.1 ... 0.9."""
    out = {}
    for t in np.round(np.arange(0.1, 0.91, 0.1), 1):
        c = confusion(labels, scores >= t)
        out[f"{t:.1f}"] = {k: c[k] for k in ("sensitivity", "specificity", "precision", "f1", "accuracy")}
    return out


def train_method_b(seeds_train: Iterable, seeds_val: Iterable, settings: TrainBSettings | None = None,
                   device: torch.device | str = "cpu", progress: bool = True,
                   log=print) -> tuple[torch.nn.Module, dict]:
    """Train the residual attention slice classifier on phantoms ``seeds_train``, then
    calibrate on ``seeds_val``: the positive-slice-ratio case decision and the
    infection level of Grad-CAM / Grad-CAM++. Returns ``(model, metrics)``;
    ``metrics["weights_metadata"]`` holds what :func:`save_method_b` stores beside the
    tensors (and the method reads at inference)."""
    s = settings or TrainBSettings()
    device = torch.device(device)
    seeds_train, seeds_val = list(seeds_train), list(seeds_val)  # phantom seeds or site cases
    check_fit_cases(seeds_train, seeds_val)
    if not progress:
        log = lambda *a, **k: None  # noqa: E731
    t0 = time.time()
    prog, adv = _progress(len(seeds_train) + len(seeds_val), "generate phantoms", progress)
    with prog:
        train = _dataset(seeds_train, s, adv)
        val = _dataset(seeds_val, s, adv)
    t_data = time.time() - t0
    log(f"data: {len(train['y'])} train slices, {len(val['y'])} val slices in {t_data:.0f} s")

    torch.manual_seed(s.seed)
    init = build(ARCHITECTURE, width=s.width, **s.arch_kwargs)
    init_state = {k: v.clone() for k, v in init.state_dict().items()}
    fallback_reason = None
    optimizer, lr = s.optimizer, s.lr
    try:
        model, losses = _fit(train, s, device, optimizer, lr, init_state, progress, log)
    except _Diverged as exc:
        if optimizer != "rmsprop" or not s.fallback_to_adam:
            raise RuntimeError(f"method B training diverged with {optimizer} lr {lr}: {exc}") from None
        fallback_reason = f"rmsprop lr {lr} diverged ({exc})"
        log(f"{fallback_reason}; restarting with Adam lr {s.fallback_lr}")
        optimizer, lr = "adam", s.fallback_lr
        try:
            model, losses = _fit(train, s, device, optimizer, lr, init_state, progress, log)
        except _Diverged as exc2:
            raise RuntimeError(f"method B training diverged with adam lr {lr} too: {exc2}") from None
    t_train = time.time() - t0 - t_data

    val_scores = slice_probabilities(model, val["x"], device)
    keep = val["w"] > 0
    labels = val["y"][keep]
    slice_auc = roc_auc(labels, val_scores[keep])
    case_labels = {case_id(r): int(case_kind(r) == "covid") for r in seeds_val}
    decision, cal = calibrate_case_decision(val_scores, val["case"], case_labels)
    inf, inf_rep = calibrate_infection_thresholds(model, val, device, s.calibration_slices)
    model.eval()
    log(f"val slice AUC {slice_auc:.3f}; case decision {decision}; infection levels {inf}")

    hist_bins = np.linspace(0, 1, 11)
    meta = {
        "case_decision": json.dumps(asdict(decision)),
        "input_size": str(s.input_size),
        "trained_on": "synthetic chest-CT phantoms (ct_ai_node.synthetic)",
        "val_slice_auc": f"{slice_auc:.4f}",
        "optimizer": f"{optimizer} lr {lr}" + (f" (fallback: {fallback_reason})" if fallback_reason else ""),
        "train_seeds": describe_cases(seeds_train),
        "val_seeds": describe_cases(seeds_val),
        "settings": json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()
                                if k not in ("workers", "out_dir")}),
    }
    for kind, level in inf.items():
        meta[f"infection_threshold_{kind}"] = str(level)
    if "gradcampp" in inf:
        meta["infection_threshold"] = str(inf["gradcampp"])
    metrics = {
        "train_slices": int(len(train["y"])), "val_slices": int(len(val["y"])),
        "train_loss_by_epoch": losses, "optimizer": optimizer, "lr": lr, "fallback_reason": fallback_reason,
        "val_slice_auc": slice_auc, "val_slice_thresholds": _threshold_table(labels, val_scores[keep]),
        "val_score_histogram": {
            "bins": hist_bins.tolist(),
            "positive": np.histogram(val_scores[keep][labels > 0.5], hist_bins)[0].tolist(),
            "negative": np.histogram(val_scores[keep][labels <= 0.5], hist_bins)[0].tolist(),
        },
        "calibration": cal, "infection_thresholds": inf, **inf_rep,
        "parameters": parameter_count(model), "arch_kwargs": {"width": s.width, **s.arch_kwargs},
        "seconds": round(time.time() - t0, 1), "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1),
        "device": str(device), "weights_metadata": meta,
    }
    if s.out_dir is not None:
        metrics["sha256"] = save_method_b(model, metrics, Path(s.out_dir))
    return model, metrics


def save_method_b(model: torch.nn.Module, metrics: dict, out_dir: Path, version: str = MODEL_VERSION) -> str:
    """Write ``out_dir/method_b_attention.safetensors`` (fp16) with the calibration in
    its metadata, update the manifest; returns the SHA-256."""
    return save_model(model.cpu(), Path(out_dir) / f"{WEIGHTS_NAME}.safetensors", architecture=ARCHITECTURE,
                      arch_kwargs=metrics["arch_kwargs"], version=version, extra=metrics["weights_metadata"])
