"""Training of the bundled models on synthetic phantoms: the method A slice
classifier and the lung U-Net, then calibration of the case decision on separate
validation phantoms. ``ct-ai-node train`` calls :func:`train_default_models`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import save_model
from ct_ai_node.pipeline.localisation import FusedGradCAM
from ct_ai_node.pipeline.method_a import WEIGHTS_NAME
from ct_ai_node.pipeline.run import LUNG_UNET_WEIGHTS
from ct_ai_node.pipeline.scoring import CaseDecision
from ct_ai_node.training.augment import random_affine, scanner_variation
from ct_ai_node.training.data import (
    build_slice_dataset,
    case_id,
    case_kind,
    check_fit_cases,
    describe_cases,
    fit_phantoms,
)
from ct_ai_node.training.metrics import roc_auc

logger = logging.getLogger(__name__)

MODEL_VERSION = "0.1.0"


@dataclass
class TrainSettings:
    n_train_cases: int = 300
    n_val_cases: int = 60
    #: phantom shape (z, y, x); None draws realistic full-size geometries (0.5-5 mm
    #: slices, 512x512) of which at most 48 slices per case are used
    shape: tuple[int, int, int] | None = None
    classifier_epochs: int = 12
    lung_epochs: int = 4
    batch_size: int = 48
    lr: float = 1e-3
    seed: int = 0
    workers: int | None = None


def _batches(n: int, batch: int, rng: np.random.Generator, weights: np.ndarray | None = None):
    if weights is None:
        order = rng.permutation(n)
    else:
        order = rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    for i in range(0, n - batch + 1, batch):
        yield order[i : i + batch]


def _progress(total: int, desc: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = Progress(TextColumn(desc), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                 TimeRemainingColumn(), transient=False)
    task = p.add_task(desc, total=total)
    return p, (lambda k=1: p.advance(task, k))


def train_slice_classifier(data: dict, settings: TrainSettings, device: torch.device, log=print) -> torch.nn.Module:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build("slice_resnet50_w16").to(device)
    keep = data["w"] > 0
    x_all, y_all = data["x"][keep], data["y"][keep]
    lung_inside = x_all > 0  # the inputs are air (0) outside the dilated lung
    pos = float(y_all.mean())
    # balance classes by sampling
    sw = np.where(y_all > 0.5, 0.5 / max(pos, 1e-3), 0.5 / max(1 - pos, 1e-3))
    steps = settings.classifier_epochs * (len(y_all) // settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=max(steps, 1), pct_start=0.15)
    amp = device.type == "cuda"
    log(f"classifier: {len(y_all)} slices, {pos:.1%} positive, {steps} steps on {device}")
    prog, adv = _progress(steps, "train slice classifier")
    with prog:
        step = 0
        for epoch in range(settings.classifier_epochs):
            model.train()
            losses = []
            for idx in _batches(len(y_all), settings.batch_size, rng, sw):
                xb = torch.from_numpy(x_all[idx]).to(device, non_blocking=True).float()[:, None] / 255.0
                mb = torch.from_numpy(lung_inside[idx]).to(device)[:, None]
                yb = torch.from_numpy(y_all[idx]).to(device)
                xb = scanner_variation(xb, inside=mb)
                (xb,) = random_affine(xb)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = model(xb)[:, 0].float()
                loss = F.binary_cross_entropy_with_logits(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                adv()
            log(f"  epoch {epoch + 1}/{settings.classifier_epochs} loss {np.mean(losses):.4f}")
    return model.eval()


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                   smooth: float = 1e-5) -> torch.Tensor:
    """Dice + binary cross-entropy counted only where ``weight`` is 1 (a target that is
    not known is left out, not called background); per sample and channel, like MONAI's
    ``DiceCELoss(sigmoid=True)``, to which it is equal when ``weight`` is all ones."""
    ce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp(min=1)
    p = torch.sigmoid(logits) * weight
    t = target * weight
    dims = tuple(range(2, logits.ndim))
    dice = 1.0 - (2.0 * (p * t).sum(dims) + smooth) / (p.sum(dims) + t.sum(dims) + smooth)
    return dice.mean() + ce


def train_lung_unet(data: dict, settings: TrainSettings, device: torch.device, log=print,
                    model: torch.nn.Module | None = None, noise_inside_lungs: bool = True) -> torch.nn.Module:
    """Train ``model`` (default: a new lung U-Net) on ``data``'s lung slices.
    ``noise_inside_lungs``: the methods.md recipe's extra Gaussian noise inside the true
    lungs only; False adds it to the whole slice (see train_lungs: noise only inside the
    label is a cue to the label, and a fine-tuned network learned to follow it)."""
    torch.manual_seed(settings.seed + 1)
    rng = np.random.default_rng(settings.seed + 1)
    model = (model if model is not None else build("lung_unet2d")).to(device)
    x_all, y_all = data["lung_x"], data["lung_y"]
    ignore_all = data.get("lung_ignore")
    steps = settings.lung_epochs * (len(x_all) // settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=max(steps, 1), pct_start=0.15)
    loss_fn = DiceCELoss(sigmoid=True)
    amp = device.type == "cuda"
    log(f"lung U-Net: {len(x_all)} slices, {steps} steps on {device}")
    prog, adv = _progress(steps, "train lung U-Net")
    with prog:
        for epoch in range(settings.lung_epochs):
            model.train()
            losses = []
            for idx in _batches(len(x_all), settings.batch_size, rng):
                xb = torch.from_numpy(x_all[idx]).to(device).float()[:, None] / 255.0
                yb = torch.from_numpy(y_all[idx]).to(device).float()[:, None]
                # Gaussian noise inside the lung (methods.md, lung U-Net) keeps infected lungs inside the mask
                xb = scanner_variation(xb)
                noisy = (xb + 0.1 * torch.randn_like(xb) * 0.8).clamp(0, 1)
                xb = torch.where(yb > 0, noisy, xb) if noise_inside_lungs else noisy
                if ignore_all is None:
                    xb, yb = random_affine(xb, yb, flip=False)
                else:
                    known = 1.0 - torch.from_numpy(ignore_all[idx]).to(device).float()[:, None]
                    xb, yb, known = random_affine(xb, yb, known, flip=False)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(xb).float()
                loss = loss_fn(out, yb) if ignore_all is None else masked_dice_ce(out, yb, known)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                adv()
            log(f"  epoch {epoch + 1}/{settings.lung_epochs} loss {np.mean(losses):.4f}")
    return model.eval()


@torch.no_grad()
def slice_scores(model: torch.nn.Module, x_uint8: np.ndarray, device: torch.device, batch: int = 128) -> np.ndarray:
    out = []
    for i in range(0, len(x_uint8), batch):
        xb = torch.from_numpy(x_uint8[i : i + batch]).to(device).float()[:, None] / 255.0
        out.append(torch.sigmoid(model(xb)[:, 0].float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def calibrate_case_decision(scores: np.ndarray, cases: np.ndarray, case_labels: dict[int, int],
                            slice_threshold: float = 0.5) -> tuple[CaseDecision, dict]:
    """Choose the positive-slice-ratio threshold with the best Youden index on the
    validation cases and fit the probability slope by maximum likelihood."""
    ids = sorted(case_labels)
    ratios = np.array([float((scores[cases == c] >= slice_threshold).mean()) if (cases == c).any() else 0.0 for c in ids])
    labels = np.array([case_labels[c] for c in ids])
    return fit_ratio_decision(ratios, labels, slice_threshold)


def fit_ratio_decision(ratios: np.ndarray, labels: np.ndarray, slice_threshold: float = 0.5) -> tuple[CaseDecision, dict]:
    """The positive-slice-ratio threshold with the best Youden index (midway between
    observed ratios) and the probability slope by maximum likelihood, from one ratio and
    one label per validation case."""
    ratios, labels = np.asarray(ratios, float), np.asarray(labels, int)
    cands = np.unique(np.concatenate([[0.0], ratios]))
    best_t, best_j = 0.1, -1.0
    for i, t in enumerate(cands):
        nxt = cands[i + 1] if i + 1 < len(cands) else t + 0.05
        thr = (t + nxt) / 2  # between observed ratios
        pred = ratios > thr
        sens = pred[labels == 1].mean() if (labels == 1).any() else 0.0
        spec = (~pred[labels == 0]).mean() if (labels == 0).any() else 0.0
        if sens + spec - 1 > best_j:
            best_j, best_t = sens + spec - 1, float(thr)
    best_slope, best_ll = 30.0, -np.inf
    for slope in np.geomspace(2, 500, 60):
        p = 1 / (1 + np.exp(-slope * (ratios - best_t)))
        p = np.clip(p, 1e-6, 1 - 1e-6)
        ll = float(np.sum(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
        if ll > best_ll:
            best_ll, best_slope = ll, float(slope)
    decision = CaseDecision(slice_threshold=slice_threshold, ratio_threshold=best_t, slope=best_slope)
    report = {"val_cases": len(labels), "val_auc": roc_auc(labels, ratios), "youden_j": best_j, **asdict(decision)}
    return decision, report


def calibrate_infection_threshold(model, data: dict, device: torch.device, max_slices: int = 600) -> tuple[float, dict]:
    """Pick the heat-map threshold giving the best lesion Dice on positive validation slices
    (at the 224 crop; voxels below -750 HU never count, as in the pipeline)."""
    pos = np.flatnonzero((data["y"] > 0.5) & (data["w"] > 0))[:max_slices]
    if pos.size == 0:
        return 0.5, {}
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    cam = FusedGradCAM(model)
    maps = []
    for i in range(0, pos.size, 32):
        xb = torch.from_numpy(data["x"][pos[i : i + 32]]).to(device).float()[:, None] / 255.0
        maps.append(cam(xb)[1].cpu().numpy())
    heat = np.concatenate(maps)
    hu_ok = data["x"][pos] >= int(0.25 * 255)  # >= -750 HU
    truth = data["lesion"][pos]
    res = {}
    for t in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5):
        pred = (heat >= t) & hu_ok
        inter = (pred & truth).sum()
        res[t] = float(2 * inter / max(pred.sum() + truth.sum(), 1))
    best = max(res, key=res.get)
    return float(best), {"lesion_dice_by_threshold_val": res}


def train_default_models(out_dir: Path, settings: TrainSettings, device: torch.device, log=print,
                         cases: tuple[list, list] | None = None) -> dict:
    """Train and save the method A classifier and the lung U-Net. ``cases``: (train,
    validation) case references (phantom seeds or site cases); by default the first
    ``n_train_cases`` / ``n_val_cases`` phantoms of the training / validation ranges."""
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_refs, val_refs = cases if cases is not None else fit_phantoms(settings.n_train_cases, settings.n_val_cases)
    check_fit_cases(train_refs, val_refs)
    prog, adv = _progress(len(train_refs) + len(val_refs), "generate phantoms")
    with prog:
        train = build_slice_dataset(train_refs, settings.shape, settings.workers, adv)
        val = build_slice_dataset(val_refs, settings.shape, settings.workers, adv)
    t_data = time.time() - t0
    log(f"data: {len(train['y'])} train slices, {len(val['y'])} val slices in {t_data:.0f} s")

    clf = train_slice_classifier(train, settings, device, log)
    val_scores = slice_scores(clf, val["x"], device)
    keep = val["w"] > 0
    slice_auc = roc_auc(val["y"][keep], val_scores[keep])
    case_labels = {case_id(r): int(case_kind(r) == "covid") for r in val_refs}
    decision, cal = calibrate_case_decision(val_scores, val["case"], case_labels)
    inf_t, inf_rep = calibrate_infection_threshold(clf, val, device)
    log(f"val slice AUC {slice_auc:.3f}; case decision {decision}; infection threshold {inf_t}")

    lung = train_lung_unet(train, settings, device, log)
    with torch.no_grad():
        xb = torch.from_numpy(val["lung_x"]).float()[:, None] / 255.0
        preds = []
        for i in range(0, len(xb), 64):
            preds.append((torch.sigmoid(lung(xb[i : i + 64].to(device))) >= 0.5).cpu().numpy()[:, 0])
        pred = np.concatenate(preds)
        truth = val["lung_y"]
        lung_dice = float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
    log(f"val lung U-Net Dice (2D, 256) {lung_dice:.4f}")

    train_info = {
        "train_seeds": describe_cases(train_refs),
        "val_seeds": describe_cases(val_refs),
        "settings": json.dumps({k: v for k, v in asdict(settings).items() if k != "workers"}),
    }
    digest_a = save_model(clf.cpu(), out_dir / f"{WEIGHTS_NAME}.safetensors", architecture="slice_resnet50_w16",
                          arch_kwargs={}, version=MODEL_VERSION,
                          extra={"case_decision": json.dumps(asdict(decision)), "infection_threshold": str(inf_t),
                                 "trained_on": "synthetic chest-CT phantoms (ct_ai_node.synthetic)",
                                 "val_slice_auc": f"{slice_auc:.4f}", **train_info})
    digest_l = save_model(lung.cpu(), out_dir / f"{LUNG_UNET_WEIGHTS}.safetensors", architecture="lung_unet2d",
                          arch_kwargs={}, version=MODEL_VERSION,
                          extra={"trained_on": "synthetic chest-CT phantoms (ct_ai_node.synthetic)",
                                 "val_dice_2d": f"{lung_dice:.4f}", **train_info})
    report = {
        "train_slices": int(len(train["y"])), "val_slices": int(len(val["y"])), "val_slice_auc": slice_auc,
        "calibration": cal, "infection_threshold": inf_t, **inf_rep, "lung_unet_val_dice_2d": lung_dice,
        "sha256": {WEIGHTS_NAME: digest_a, LUNG_UNET_WEIGHTS: digest_l}, "seconds": round(time.time() - t0, 1),
        "data_seconds": round(t_data, 1), "device": str(device), **train_info,
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report
