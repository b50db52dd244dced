"""``ct-ai-node train lobes`` and ``ct-ai-node evaluate lobes``: the lobe U-Net
(:mod:`ct_ai_node.pipeline.lobes`) on phantoms whose lobes the generator draws.

The phantom generator divides each lung by an oblique fissure (and the right lung by a
horizontal one) with a random tilt per patient, and renders the fissures faintly, so the
lobes are known voxel by voxel. No real scan in ``../shared/data/real`` carries lobe labels
(the TotalSegmentator test files there are CT only), so training and the reported Dice are
phantom-only; docs/models.md says so.

Training slices: up to ``slices_per_case`` lung slices of each phantom, spread over the
lungs' height, prepared exactly as inference prepares them (``lobe_inputs``), once with the
phantom's true lungs as the mask channels and once with the lungs the node's own lung U-Net
finds (``lung_masks: both``); with a predicted mask, a mask pixel outside the true lungs is
taught its nearest true lobe. Trained on true masks alone, the network leant on them: on the
dev set (90300-90319) the right middle lobe's Dice fell from 0.92 with the true lungs to 0.82
with the U-Net's (whose right/left split and outline differ), although the true lobes inside
the U-Net's lungs would have scored 0.99 (docs/models.md).

Evaluation: the whole pipeline's way, the lobe U-Net on every lung slice of held-out phantoms
at full resolution, with the true lungs and with the lung U-Net's lungs, Dice per lobe.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import save_model
from ct_ai_node.pipeline.lobes import WEIGHTS_NAME, LobeSegmenter, LobeSettings, lobe_inputs, lobe_targets, lung_height
from ct_ai_node.pipeline.types import LOBES
from ct_ai_node.training.data import TEST_SEED0, describe_cases
from ct_ai_node.training.train import MODEL_VERSION, _batches, _progress

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # the phantoms' orientation (z index 0 inferior)


@dataclass
class LobeTrainSettings:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    #: per mask source: "both" gives twice this many slices per case
    slices_per_case: int = 32
    #: the lung masks given to the network: the phantom's (truth), the lung U-Net's (unet), or both
    lung_masks: str = "both"
    #: phantom shape; (0, 256, 256) draws the realistic geometry on a 256 matrix (cheaper)
    shape: tuple[int, int, int] | None = (0, 256, 256)
    workers: int | None = None
    seed: int = 0
    input: LobeSettings = LobeSettings()


_LUNG_SEGMENTER = None  # one per pool process: loaded on its first case


def _one_thread() -> None:
    torch.set_num_threads(1)  # a pool process per core already


def _unet_lungs(hu: np.ndarray, spacing) -> np.ndarray:
    global _LUNG_SEGMENTER
    if _LUNG_SEGMENTER is None:
        from ct_ai_node.pipeline.run import create_lung_segmenter

        _LUNG_SEGMENTER = create_lung_segmenter("unet", torch.device("cpu"))
    return _LUNG_SEGMENTER(hu, spacing, AXIAL)


def nearest_lobe_labels(lobe_labels: np.ndarray, lung_labels: np.ndarray) -> np.ndarray:
    """Lobe labels for every voxel of ``lung_labels`` (a predicted lung mask): the true lobe
    where there is one, else the nearest true lobe voxel's lobe (slice by slice); 0 outside."""
    from scipy import ndimage

    out = np.zeros_like(lobe_labels)
    for z in range(lobe_labels.shape[0]):
        lab, want = lobe_labels[z], lung_labels[z] > 0
        if not want.any() or not lab.any():
            continue
        _, (iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
        out[z] = np.where(want, lab[iy, ix], 0)
    return out


def _case_slices(args) -> dict[str, np.ndarray]:
    seed, shape, per_case, settings, lung_masks = args
    from ct_ai_node.synthetic import generate_phantom

    ph = generate_phantom(int(seed), shape=shape)
    hu = ph.hu.astype(np.float32)
    sources = []
    if lung_masks in ("truth", "both"):
        sources.append((ph.lung_labels, ph.lobe_labels))
    if lung_masks in ("unet", "both"):
        predicted = _unet_lungs(hu, ph.spacing)
        sources.append((predicted, nearest_lobe_labels(ph.lobe_labels, predicted)))
    xs, ys = [], []
    for lungs, targets in sources:
        zs = np.flatnonzero(lungs.reshape(lungs.shape[0], -1).any(axis=1))
        if zs.size == 0:
            continue
        pick = zs[np.unique(np.linspace(0, zs.size - 1, min(per_case, zs.size)).round().astype(int))]
        height = lung_height(hu.shape[0], zs, AXIAL)
        xs.append(lobe_inputs(hu, lungs, pick, height, settings).numpy().astype(np.float16))
        ys.append(lobe_targets(targets, pick, settings).numpy().astype(np.uint8))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return {"x": x, "y": y, "case": np.full(len(x), int(seed), np.int32)}


def lobe_dataset(seeds: list[int], settings: LobeTrainSettings, log=print) -> dict[str, np.ndarray]:
    bad = [s for s in seeds if int(s) >= TEST_SEED0]
    if bad:
        raise ValueError(f"seeds >= {TEST_SEED0} are the held-out test set and never used for fitting: {bad[:5]}")
    if settings.lung_masks not in ("truth", "unet", "both"):
        raise ValueError(f"lung_masks: truth, unet or both, not {settings.lung_masks!r}")
    jobs = [(s, settings.shape, settings.slices_per_case, settings.input, settings.lung_masks) for s in seeds]
    parts = []
    prog, adv = _progress(len(jobs), "lobe phantoms")
    # spawned, not forked: the lung U-Net runs in the pool, and torch's OpenMP threads do not
    # survive a fork of a process that has used them (the child hangs)
    with prog, ProcessPoolExecutor(settings.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_one_thread) as pool:
        for part in pool.map(_case_slices, jobs):
            parts.append(part)
            adv()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _dice_per_lobe(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    out = {}
    for i, name in enumerate(LOBES, start=1):
        p, t = pred == i, truth == i
        denom = int(p.sum() + t.sum())
        out[name] = float(2 * (p & t).sum() / denom) if denom else float("nan")
    return out


@torch.no_grad()
def _val_dice(model: torch.nn.Module, val: dict, device: torch.device) -> dict[str, float]:
    model.eval()
    preds = []
    for i in range(0, len(val["x"]), 64):
        xb = torch.from_numpy(val["x"][i : i + 64].astype(np.float32)).to(device)
        logits = model(xb).float()
        # read as inference does: every lung pixel takes the likeliest of the five lobes
        lung = (xb[:, 1] > 0.5) | (xb[:, 2] > 0.5)
        best = torch.argmax(logits[:, 1:], 1) + 1
        preds.append(torch.where(lung, best, torch.zeros_like(best)).cpu().numpy())
    return _dice_per_lobe(np.concatenate(preds), val["y"])


def train_lobe_unet(train_seeds: list[int], val_seeds: list[int], settings: LobeTrainSettings,
                    device: torch.device, log=print) -> tuple[torch.nn.Module, dict]:
    from monai.losses import DiceCELoss

    from ct_ai_node.training.augment import random_affine, scanner_variation

    t0 = time.time()
    train = lobe_dataset(train_seeds, settings, log)
    val = lobe_dataset(val_seeds, settings, log)
    t_data = time.time() - t0
    log(f"data: {len(train['x'])} training, {len(val['x'])} validation slices in {t_data:.0f} s")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = build(WEIGHTS_NAME).to(device)
    steps = settings.epochs * (len(train["x"]) // settings.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=max(steps, 1), pct_start=0.15)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    t1 = time.time()
    history = []
    for epoch in range(settings.epochs):
        model.train()
        losses = []
        for idx in _batches(len(train["x"]), settings.batch_size, rng):
            xb = torch.from_numpy(train["x"][idx].astype(np.float32)).to(device)
            yb = torch.from_numpy(train["y"][idx]).to(device).float()[:, None]
            height = xb[:, 3:4].clone()
            image = scanner_variation(xb[:, :1])
            image, masks, yb = random_affine(image, xb[:, 1:3], yb, flip=False)
            xb = torch.cat([image, masks, height.expand_as(image)], 1)
            loss = loss_fn(model(xb), yb.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        dice = _val_dice(model, val, device)
        history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4),
                        "val_dice": {k: round(v, 4) for k, v in dice.items()}})
        log(f"  epoch {epoch + 1}/{settings.epochs} loss {np.mean(losses):.4f} val Dice "
            + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
    metrics = {
        "train_cases": describe_cases(train_seeds), "val_cases": describe_cases(val_seeds),
        "train_slices": int(len(train["x"])), "val_slices": int(len(val["x"])),
        "val_dice_work_resolution": history[-1]["val_dice"] if history else {}, "history": history,
        "data_seconds": round(t_data, 1), "train_seconds": round(time.time() - t1, 1), "device": str(device),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("workers", "input")},
    }
    return model.eval(), metrics


def save_lobe_unet(model: torch.nn.Module, out_dir: Path, metrics: dict, settings: LobeSettings) -> str:
    out_dir = Path(out_dir)
    digest = save_model(model.cpu(), out_dir / f"{WEIGHTS_NAME}.safetensors", architecture=WEIGHTS_NAME,
                        arch_kwargs={}, version=MODEL_VERSION,
                        extra={"trained_on": "synthetic chest-CT phantoms only",
                               "input_settings": settings.to_json(),
                               "train_seeds": metrics["train_cases"], "val_seeds": metrics["val_cases"],
                               "val_dice": json.dumps(metrics["val_dice_work_resolution"])})
    (out_dir / "lobe_unet_training.json").write_text(json.dumps({**metrics, "sha256": digest}, indent=2) + "\n")
    return digest


def evaluate_lobes(seeds: list[int], device: torch.device, weights_dir: Path | None = None,
                   shape: tuple[int, int, int] | None = None, log=print) -> dict:
    """On held-out phantoms (seeds >= TEST_SEED0): Dice per lobe, the lobe U-Net on every lung
    slice at the phantom's resolution, with the true lungs and with the lung U-Net's lungs
    (what the node does); and the CT severity score as the node computes it (lung U-Net,
    lobe U-Net, opacity U-Net) against the phantom's truth (its lobes and lesion mask): the
    share of lobes graded exactly, and of cases whose total is within 2."""
    from ct_ai_node.pipeline.infection import create_infection_segmenter
    from ct_ai_node.pipeline.lobes import create_lobe_segmenter
    from ct_ai_node.pipeline.run import create_lung_segmenter, segment_opacities
    from ct_ai_node.pipeline.severity import lobe_involvement
    from ct_ai_node.synthetic import generate_phantom

    early = [s for s in seeds if int(s) < TEST_SEED0]
    if early:
        raise ValueError(f"held-out seeds start at {TEST_SEED0}: {early[:5]}")
    lobes: LobeSegmenter = create_lobe_segmenter(device, weights_dir)
    lungs = create_lung_segmenter("unet", device, weights_dir)
    opacity = create_infection_segmenter(device, weights_dir)
    rows = []
    for seed in seeds:
        ph = generate_phantom(int(seed), shape=shape)
        hu = ph.hu.astype(np.float32)
        t = time.perf_counter()
        with_truth = lobes(hu, ph.spacing, AXIAL, ph.lung_labels)
        seconds = time.perf_counter() - t
        predicted_lungs = lungs(hu, ph.spacing, AXIAL)
        with_unet = lobes(hu, ph.spacing, AXIAL, predicted_lungs)
        found = segment_opacities(opacity, hu, ph.spacing, AXIAL, predicted_lungs)
        predicted = lobe_involvement(with_unet, found.mask, found.consolidation, ph.spacing)
        truth = lobe_involvement(ph.lobe_labels, ph.lesion_mask, None, ph.spacing)
        row = {"seed": int(seed), "kind": ph.kind, "slices": int(hu.shape[0]), "seconds": round(seconds, 2),
               "true_lungs": _dice_per_lobe(with_truth, ph.lobe_labels),
               "unet_lungs": _dice_per_lobe(with_unet, ph.lobe_labels),
               "severity_true": [lobe.severity for lobe in truth],
               "severity_node": [lobe.severity for lobe in predicted],
               "involvement_true": [round(lobe.involvement_percent, 2) for lobe in truth],
               "involvement_node": [round(lobe.involvement_percent, 2) for lobe in predicted]}
        rows.append(row)
        log(f"seed {seed} ({ph.kind}): " + ", ".join(f"{k} {v:.3f}" for k, v in row["unet_lungs"].items())
            + f"; severity true {row['severity_true']} node {row['severity_node']}")
    summary = {"seeds": describe_cases(seeds), "cases": len(rows)}
    for which in ("true_lungs", "unet_lungs"):
        summary[which] = {name: round(float(np.nanmean([r[which][name] for r in rows])), 4) for name in LOBES}
        summary[which]["min_case_mean"] = round(float(min(np.nanmean(list(r[which].values())) for r in rows)), 4)
    grades = [(t, p) for r in rows for t, p in zip(r["severity_true"], r["severity_node"])]
    summary["severity_exact_lobes"] = round(float(np.mean([t == p for t, p in grades])), 4) if grades else None
    summary["severity_total_within_2"] = round(float(np.mean(
        [abs(sum(r["severity_true"]) - sum(r["severity_node"])) <= 2 for r in rows])), 4) if rows else None
    return {"summary": summary, "rows": rows}


__all__ = ["LobeTrainSettings", "evaluate_lobes", "lobe_dataset", "save_lobe_unet", "train_lobe_unet"]
