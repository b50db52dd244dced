"""``ct-ai-node train lungs``: the lung U-Net alone, on phantoms and real backgrounds.

Why: trained on phantoms only, the lung U-Net left dense consolidation against the chest
wall of a real scan out of the lungs, and the opacity stage only looks inside the lungs
(CAP-like insertions into real scans: lesion Dice 0.33, docs/models.md). Real chest CT
with synthetic lesions inserted (:mod:`ct_ai_node.training.real_backgrounds`) teaches it
that consolidation and ground glass inside the lung's outline are lung: the target is
the scan's lungs as planned before the insertion, which hold the lesions.

By default the shipped lung U-Net is fine-tuned (``--set init=scratch`` trains anew).
The report gives, on the validation cases, before and after: lung Dice and the share
of each kind's lesion that falls inside the predicted lungs (what the opacity stage can
see), phantoms and real backgrounds apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import load_model, save_model
from ct_ai_node.pipeline.run import LUNG_UNET_WEIGHTS
from ct_ai_node.training.data import (
    build_slice_dataset,
    case_id,
    case_kind,
    case_source,
    case_source_version,
    check_fit_cases,
    describe_cases,
)
from ct_ai_node.training.train import MODEL_VERSION, TrainSettings, _progress, train_lung_unet
from ct_ai_node.training.train_infection import trained_on_text


@dataclass
class LungTrainSettings:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 3e-4
    #: "bundled": fine-tune the shipped lung U-Net; "scratch": a new network
    init: str = "bundled"
    #: the recipe's extra noise inside the lungs only (True) or on the whole slice (False):
    #: fine-tuned with it inside the lungs only, the network took the noise for the lung
    #: (validation lung Dice on real backgrounds 0.91 -> 0.51)
    noise_inside_lungs: bool = False
    shape: tuple[int, int, int] | None = None
    workers: int | None = None
    seed: int = 0
    #: folder keeping the prepared slices between runs (keyed on the cases and generator)
    cache_dir: str | None = None

    def __post_init__(self):
        if self.init not in ("bundled", "scratch"):
            raise ValueError(f"init: {self.init!r}; use 'bundled' or 'scratch'")


@torch.no_grad()
def predict_lungs(model: torch.nn.Module, x_uint8: np.ndarray, device: torch.device, batch: int = 32) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(x_uint8), batch):
        xb = torch.from_numpy(x_uint8[i : i + batch]).to(device).float()[:, None] / 255.0
        out.append((torch.sigmoid(model(xb)) >= 0.5).cpu().numpy()[:, 0])
    return np.concatenate(out) if out else np.zeros((0,) + x_uint8.shape[1:], bool)


def lung_metrics(pred: np.ndarray, data: dict[str, np.ndarray], refs) -> dict[str, float]:
    """Lung Dice (where the target is known: ``lung_ignore``) and lesion-inside-lungs
    share, pooled over the slices of each group (source: phantom / real background; kind:
    covid / cap / normal)."""
    ids = {case_id(r): (case_source(r), case_kind(r)) for r in refs}
    source = np.array([ids[int(c)][0] for c in data["case"]])
    kind = np.array([ids[int(c)][1] for c in data["case"]])
    truth, les = data["lung_y"], data["lung_lesion"]
    known = ~data["lung_ignore"] if "lung_ignore" in data else np.ones_like(truth)
    out: dict[str, float] = {}
    for src in dict.fromkeys(source):  # each source present, in order of appearance
        sel = source == src
        p, t = pred[sel] & known[sel], truth[sel] & known[sel]
        out[f"{src} lung dice"] = float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
        for k in ("covid", "cap"):
            s2 = sel & (kind == k)
            n = int(les[s2].sum())
            if n:
                out[f"{src} {k} lesion inside lungs"] = float((les[s2] & pred[s2]).sum() / n)
    return out


def _datasets(train_refs: list, val_refs: list, settings: LungTrainSettings) -> tuple[dict, dict]:
    """The lung slices of the training and validation cases, from ``settings.cache_dir``
    when an earlier run with the same cases, generator and lung U-Net left them there."""
    path = None
    if settings.cache_dir:
        key = json.dumps([describe_cases(train_refs), describe_cases(val_refs), settings.shape, "ignore",
                          sorted({case_source_version(r) for r in list(train_refs) + list(val_refs)})])
        path = Path(settings.cache_dir) / f"lungs-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
        if path.is_file():
            with np.load(path) as z:
                return ({k[6:]: z[k] for k in z.files if k.startswith("train_")},
                        {k[4:]: z[k] for k in z.files if k.startswith("val_")})
    prog, adv = _progress(len(train_refs) + len(val_refs), "lung U-Net cases")
    with prog:
        train = build_slice_dataset(train_refs, settings.shape, settings.workers, adv, lungs_only=True)
        val = build_slice_dataset(val_refs, settings.shape, settings.workers, adv, lungs_only=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()})
        tmp.replace(path)
    return train, val


def train_lung_model(train_refs: list, val_refs: list, settings: LungTrainSettings, device: torch.device,
                     log=print) -> tuple[torch.nn.Module, dict]:
    check_fit_cases(train_refs, val_refs)
    t0 = time.time()
    train, val = _datasets(train_refs, val_refs, settings)
    t_data = time.time() - t0
    log(f"data: {len(train['lung_x'])} training, {len(val['lung_x'])} validation slices in {t_data:.0f} s")

    before = {}
    if settings.init == "bundled":
        model = load_model(LUNG_UNET_WEIGHTS, device=device).module.float().to(device)
        before = lung_metrics(predict_lungs(model, val["lung_x"], device), val, val_refs)
        log(f"before (bundled): {json.dumps(before)}")
    else:
        model = build("lung_unet2d").to(device)
    core = TrainSettings(lung_epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                         seed=settings.seed)
    t1 = time.time()
    model = train_lung_unet(train, core, device, log, model=model, noise_inside_lungs=settings.noise_inside_lungs)
    after = lung_metrics(predict_lungs(model, val["lung_x"], device), val, val_refs)
    log(f"after: {json.dumps(after)}")
    metrics = {
        "before_bundled": before, "after": after, "train_cases": describe_cases(train_refs),
        "val_cases": describe_cases(val_refs), "train_slices": int(len(train["lung_x"])),
        "val_slices": int(len(val["lung_x"])), "data_seconds": round(t_data, 1),
        "train_seconds": round(time.time() - t1, 1), "device": str(device),
        "settings": {k: v for k, v in asdict(settings).items() if k != "workers"},
    }
    return model, metrics


def save_lung_unet(model: torch.nn.Module, out_dir: Path, metrics: dict) -> str:
    out_dir = Path(out_dir)
    after = metrics["after"]
    digest = save_model(model.cpu(), out_dir / f"{LUNG_UNET_WEIGHTS}.safetensors", architecture="lung_unet2d",
                        arch_kwargs={}, version=MODEL_VERSION,
                        extra={"trained_on": trained_on_text(metrics["train_cases"]),
                               "val_dice_2d": f"{after.get('phantom lung dice', float('nan')):.4f}",
                               "train_seeds": metrics["train_cases"], "val_seeds": metrics["val_cases"],
                               "settings": json.dumps(metrics["settings"])})
    (out_dir / "lung_unet_training.json").write_text(json.dumps({**metrics, "sha256": digest}, indent=2) + "\n")
    return digest
