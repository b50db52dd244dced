"""Training of method D (weakly-supervised ResNeXt+) with volume labels only.

Recipe (IEEE Access 2020, adapted to phantoms and the node's budget):

* ``volumes_per_step`` volumes per step (8), each its own sequence through the head;
  label 1 for COVID-like phantoms, 0 for CAP and normal; two-logit softmax and
  cross-entropy. The paper fed one volume per step to an ImageNet-pretrained backbone;
  from scratch that fails: batch norm then takes its statistics from one volume's
  slices, which makes every volume look alike on average (5,000 GPU steps stayed at
  chance). With 4 volumes per step GPU runs learnt slowly (validation AUC 0.63-0.87
  after 7-8 epochs), with 8 all five runs reached 0.88-0.96 within 16-20 epochs
  (``docs/evaluation/method_d_gpu_runs.json``);
* deep supervision (``aux_weight`` 1.0, training only): a linear classifier on each
  volume's mean slice feature adds its cross-entropy to the loss, a short gradient path
  to the backbone while the LSTM-attention head is still learning to use it; it is not
  part of the saved network (not in the paper; the shipped run used it);
* at most ``max_slices`` (32; the paper: 50) lung slices per volume and step, drawn by
  **stratified sampling**: the lung range is cut into ``max_slices`` equal bins and one random slice
  is taken from each, so the sequence keeps its axial order and covers the whole lungs
  (the LSTM sees apex to base) while every epoch sees other slices; volumes with fewer
  lung slices use them all. Inference uses every lung slice;
* Adam with a triangular cyclic learning rate between ``lr_min`` and ``lr_max``
  (1e-4 and 1e-3: ten times the paper's, for training from scratch), ``cycle_epochs``
  (8) per full cycle;
* class imbalance: the positives are **resampled** (drawn with replacement) until an
  epoch holds as many positive as negative volumes;
* augmentation per volume (the same for all its slices): rotation, scale, shift,
  left-right flip of image and mask; HU offset and gain, blur and noise inside the mask;
* after each epoch batch norm's running statistics are recomputed over training batches
  (:func:`recalibrate_batch_norm`), then the epoch with the lowest validation loss is
  kept; the heat-map level for the infection mask is calibrated on the validation
  COVID-like volumes (best lesion Dice).

Phantoms are prepared once with :func:`ct_ai_node.pipeline.method_d.prepare_volume`
(the same code as inference) and cached as ``.npz`` in ``settings.cache_dir``.
Seeds: training from 1000, validation from 50000; seeds >= 90000 (held-out test set)
are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ct_ai_node.models.net_d import ARCHITECTURE, ResNeXtLSTM
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import save_model
from ct_ai_node.pipeline.geometry import resize_slices
from ct_ai_node.pipeline.method_d import (
    INPUT_SIZE,
    WEIGHTS_NAME,
    MethodDSettings,
    make_gradcam,
    predict_volume,
    prepare_volume,
    to_tensor,
)
from ct_ai_node.pipeline.slice_input import SliceInputSettings
from ct_ai_node.training.augment import blur, random_affine
from ct_ai_node.training.budget import out_of_time
from ct_ai_node.training.data import (
    case_source_version,
    SliceLabelRule,
    case_id,
    case_kind,
    check_fit_cases,
    make_case,
    map_cases,
    site_scan,
    slice_labels,
)
from ct_ai_node.training.metrics import confusion, roc_auc

logger = logging.getLogger(__name__)

MODEL_VERSION = "0.1.0"
#: bump when the cached preparation changes
_CACHE_FORMAT = 1


@dataclass
class TrainDSettings:
    cache_dir: Path = Path(".cache/method_d")
    #: phantom shape (z, y, x); None draws realistic full-size geometries
    shape: tuple[int, int, int] | None = None
    input_size: int = INPUT_SIZE
    epochs: int = 10
    #: slices sampled per volume in training (the paper: at most 50; 32 halves the
    #: CPU cost of a step)
    max_slices: int = 32
    #: volumes per optimiser step: their slices share the backbone's batch norm statistics
    volumes_per_step: int = 8
    #: before each validation (and so in the saved weights), batch norm's running
    #: statistics are recomputed as the plain average over this many training steps' worth
    #: of volumes (0: keep the moving averages of training)
    recalibrate_steps: int = 32
    #: cyclic learning rate bounds (10x the paper's: from scratch on about 60 volumes,
    #: 1e-4 left the network at chance within a CPU-sized run)
    lr_min: float = 1e-4
    lr_max: float = 1e-3
    #: epochs per full cycle of the triangular cyclic learning rate
    cycle_epochs: float = 8.0
    weight_decay: float = 0.0
    #: weight of the deep-supervision loss (a linear classifier on each volume's mean
    #: slice feature, used in training only; 0: the method's loss alone)
    aux_weight: float = 1.0
    balance: bool = True
    augment: bool = True
    keep_best: bool = True
    #: network size (``ResNeXtLSTM`` keyword arguments; {} = the bundled layout)
    arch_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    #: processes that generate phantoms (1: in this process)
    workers: int = 1
    #: backbone chunk at validation
    chunk: int = 32
    #: stop before an epoch that would end after this many seconds of training (a lease
    #: on a borrowed GPU); None: run every epoch
    time_budget_s: float | None = None


# --- data -----------------------------------------------------------------------------

def _input_settings(settings: TrainDSettings) -> SliceInputSettings:
    return SliceInputSettings(size=settings.input_size)


def _cache_path(seed, kind: str, settings: TrainDSettings) -> Path:
    parts = {"fmt": _CACHE_FORMAT, "shape": settings.shape, "input": asdict(_input_settings(settings)),
             "rule": asdict(SliceLabelRule()), "source": case_source_version(seed)}
    if site_scan(seed) is not None:
        parts["site"] = site_scan(seed)
    tag = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]
    return Path(settings.cache_dir) / f"d_{case_id(seed)}_{kind}_{tag}.npz"


def _prepare_case(args) -> str:
    seed, kind, shape, input_dict, path = args
    path = Path(path)
    if path.is_file():
        return str(path)
    inp = SliceInputSettings(**input_dict)
    ph = make_case(seed, shape, kind)
    vol = prepare_volume(ph.hu, ph.lung_labels, ph.spacing, inp)
    lung = ph.lung_labels > 0
    y, w = slice_labels(ph.lesion_mask, lung, ph.kind, ph.spacing, SliceLabelRule())
    les = ph.lesion_mask[vol.zs][:, vol.box.y0 : vol.box.y1, vol.box.x0 : vol.box.x1].astype(np.float32)
    les = resize_slices(torch.from_numpy(les)[:, None], (inp.size, inp.size))[:, 0].numpy() >= 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez_compressed(tmp, image=vol.image, mask=vol.mask, zs=vol.zs, slice_y=y[vol.zs], slice_w=w[vol.zs],
                        lesion=les, label=np.int64(ph.kind == "covid"), kind=ph.kind, seed=np.int64(case_id(seed)))
    os.replace(tmp, path)
    return str(path)


def build_cache(seeds: Sequence[int], settings: TrainDSettings,
                progress: Callable[[], None] | None = None) -> list[Path]:
    """Generate and prepare the phantoms of ``seeds`` (kind from the seed, as in
    :mod:`ct_ai_node.training.data`) unless already cached; returns the cache files."""
    jobs = []
    for s in seeds:
        kind = case_kind(s)
        jobs.append((s, kind, settings.shape, asdict(_input_settings(settings)), str(_cache_path(s, kind, settings))))
    return [Path(p) for p in map_cases(_prepare_case, jobs, settings.workers, progress)]


def load_case(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def stratified_slices(n: int, at_most: int, rng: np.random.Generator) -> np.ndarray:
    """One random index from each of ``at_most`` equal bins of range(n), in order
    (all of range(n) when n <= at_most)."""
    if n <= at_most:
        return np.arange(n)
    edges = np.linspace(0, n, at_most + 1)
    lo = np.floor(edges[:-1]).astype(int)
    hi = np.maximum(np.floor(edges[1:]).astype(int), lo + 1)
    return np.minimum(lo + (rng.random(at_most) * (hi - lo)).astype(int), n - 1)


def epoch_order(labels: np.ndarray, balance: bool, rng: np.random.Generator) -> np.ndarray:
    """Volume indices for one epoch; with ``balance`` the minority class is resampled
    (with replacement) up to the majority's count."""
    idx = np.arange(labels.size)
    if balance:
        pos, neg = idx[labels == 1], idx[labels == 0]
        if pos.size and neg.size and pos.size != neg.size:
            small, big = (pos, neg) if pos.size < neg.size else (neg, pos)
            extra = rng.choice(small, size=big.size - small.size, replace=True)
            idx = np.concatenate([idx, extra])
    return rng.permutation(idx)


def augment_volume(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2, s, s) one volume's slices -> the same random geometry for every slice
    (image bilinear, mask nearest) and one scanner variation inside the mask."""
    g = generator
    img = x[:, :1].transpose(0, 1)  # (1, n, s, s): one sample, the slices as channels
    msk = x[:, 1:2].transpose(0, 1)
    img, msk = random_affine(img, msk, generator=g)
    img, msk = img.transpose(0, 1), msk.transpose(0, 1)

    def u(a: float, b: float) -> float:
        return float(a + (b - a) * torch.rand(1, generator=g).item())

    y = img * u(0.92, 1.08) + u(-0.06, 0.06)
    y = blur(y, u(0.0, 1.2))
    y = y + torch.randn(y.shape, generator=g) * u(0.0, 0.04)
    y = torch.where(msk > 0, y, img).clamp(0.0, 1.0)
    return torch.cat([y, msk], dim=1)


# --- evaluation -----------------------------------------------------------------------

def evaluate(model: ResNeXtLSTM, cases: list[dict], device: torch.device, chunk: int = 32,
             with_heat: bool = False) -> dict:
    """Volume probabilities and slice scores of every case (all lung slices), with the
    volume and slice metrics; ``with_heat`` adds the infection-threshold calibration."""
    ms = MethodDSettings(chunk=chunk)
    # the CAM's hooks sit on its own wrapper, not on the model's layers
    cam = make_gradcam(model) if with_heat else None
    probs, labels, losses = [], [], []
    slice_y, slice_pred, slice_score, slice_pos_case = [], [], [], []
    thresholds = (0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
    inter = {t: 0 for t in thresholds}
    pred_sum = {t: 0 for t in thresholds}
    truth_sum = 0
    model.eval()
    for c in cases:
        if with_heat and int(c["label"]) == 1:
            pred = predict_volume(model, c["image"], c["mask"], device, ms, cam=cam)
        else:
            pred = predict_volume(model, c["image"], c["mask"], device, ms)
        p = min(max(pred.probability, 1e-7), 1 - 1e-7)
        y = int(c["label"])
        probs.append(pred.probability)
        labels.append(y)
        losses.append(-np.log(p if y else 1 - p))
        keep = c["slice_w"] > 0
        slice_y.append(c["slice_y"][keep])
        slice_pred.append(pred.scores[keep] >= ms.slice_threshold)
        slice_score.append(pred.scores[keep])
        slice_pos_case.append(np.full(int(keep.sum()), y))
        if with_heat and y == 1:
            pos = (c["slice_y"] > 0.5) & keep
            truth = c["lesion"][pos].astype(bool)
            hu_ok = c["image"][pos] >= int(0.25 * 255)  # >= -750 HU, as the pipeline's infection mask
            truth_sum += int(truth.sum())
            for t in thresholds:
                m = (pred.heat[pos] >= t) & hu_ok
                inter[t] += int((m & truth).sum())
                pred_sum[t] += int(m.sum())
    probs_a, labels_a = np.array(probs), np.array(labels)
    sy, sp, ss = np.concatenate(slice_y), np.concatenate(slice_pred), np.concatenate(slice_score)
    covid = np.concatenate(slice_pos_case) == 1
    out = {
        "volumes": len(cases),
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "auc": roc_auc(labels_a, probs_a),
        **{f"volume_{k}": v for k, v in confusion(labels_a, probs_a >= 0.5).items()},
        "slice_auc_in_covid_volumes": roc_auc(sy[covid], ss[covid]),
        **{f"slice_{k}": v for k, v in confusion(sy, sp).items() if k in ("precision", "sensitivity", "f1")},
        "probabilities": [round(float(p), 4) for p in probs],
        "labels": labels,
    }
    if with_heat and truth_sum:
        dice = {t: 2 * inter[t] / max(pred_sum[t] + truth_sum, 1) for t in thresholds}
        best = max(dice, key=dice.get)
        out["lesion_dice_by_threshold"] = {str(t): round(d, 4) for t, d in dice.items()}
        if dice[best] > 0:  # no overlap at any level: nothing to calibrate
            out["infection_threshold"] = float(best)
    return out


# --- training -------------------------------------------------------------------------

def volume_batch(cases: list[dict], indices, max_slices: int, rng: np.random.Generator,
                 augment: torch.Generator | None = None) -> list[torch.Tensor]:
    """The network inputs ((n_i, 2, s, s) each) of ``cases[indices]``: at most
    ``max_slices`` stratified slices per volume, augmented when ``augment`` is given."""
    xs = []
    for i in indices:
        c = cases[i]
        pick = stratified_slices(c["image"].shape[0], max_slices, rng)
        x = to_tensor(c["image"][pick], c["mask"][pick])
        xs.append(augment_volume(x, augment) if augment is not None else x)
    return xs


@torch.no_grad()
def recalibrate_batch_norm(model: ResNeXtLSTM, cases: list[dict], settings: TrainDSettings, device: torch.device,
                           seed: int = 0) -> int:
    """Recompute every batch norm's running statistics as the plain average of the batch
    statistics over ``settings.recalibrate_steps`` training batches (volumes grouped as in
    training, no augmentation). The moving averages of training trail a network whose
    weights are still moving, and method D's sequence head reacts to the difference (seen:
    every volume given the same probability in eval mode while training batches were
    fitted). Returns the number of batches used (0: nothing to do)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or not cases or settings.recalibrate_steps <= 0:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    rng = np.random.default_rng(seed)
    vps = max(1, int(settings.volumes_per_step))
    order = rng.permutation(len(cases))
    n = 0
    for start in range(0, min(len(order), settings.recalibrate_steps * vps), vps):
        model.backbone(torch.cat(volume_batch(cases, order[start : start + vps], settings.max_slices, rng)).to(device))
        n += 1
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.train(was_training)
    return n


def volume_batch_outputs(model: ResNeXtLSTM, volumes: list[torch.Tensor], device: torch.device,
                         aux: torch.nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (len(volumes), 2): the slices of all ``volumes`` ((n_i, 2, s, s) each) go
    through the backbone as one batch, so batch norm's statistics span several volumes;
    each volume's slices then form their own sequence through the head. With ``aux``
    (training only), also its logits on each volume's mean slice feature."""
    maps = model.backbone(torch.cat(volumes).to(device))
    logits, aux_logits = [], []
    for m in maps.split([v.shape[0] for v in volumes]):
        feats = model.head.slice_features(m)
        logits.append(model.head.sequence(feats)[0])
        if aux is not None:
            aux_logits.append(aux(feats.mean(dim=0, keepdim=True)))
    return torch.cat(logits), (torch.cat(aux_logits) if aux is not None else None)


def train_method_d(seeds_train: Sequence[int], seeds_val: Sequence[int], settings: TrainDSettings | None = None,
                   device: torch.device | str = "cpu", progress: bool = True,
                   log: Callable[[str], None] | None = None) -> tuple[ResNeXtLSTM, dict]:
    """Train method D on phantoms of ``seeds_train`` (volume labels only), select and
    calibrate on ``seeds_val``; returns the model (eval mode, on ``device``) and a
    metrics dict (per-epoch losses, validation volume/slice metrics, calibration)."""
    s = settings or TrainDSettings()
    device = torch.device(device)
    seeds_train, seeds_val = list(seeds_train), list(seeds_val)  # phantom seeds or site cases
    check_fit_cases(seeds_train, seeds_val)
    log = log or ((lambda msg: print(msg, flush=True)) if progress else logger.info)
    t0 = time.time()
    train_cases = [load_case(p) for p in build_cache(seeds_train, s)]
    val_cases = [load_case(p) for p in build_cache(seeds_val, s)] if len(seeds_val) else []
    train_cases = [c for c in train_cases if c["image"].shape[0] > 0]
    t_data = time.time() - t0
    labels = np.array([int(c["label"]) for c in train_cases])
    log(f"method D: {len(train_cases)} train volumes ({int(labels.sum())} COVID-like), {len(val_cases)} val volumes; "
        f"data {t_data:.0f} s")

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    model: ResNeXtLSTM = build(ARCHITECTURE, **s.arch_kwargs).to(device)
    # deep supervision (training only, not saved): a linear classifier on the mean slice
    # feature gives the backbone and CBAM a short gradient path while the sequence head
    # is still learning to use them
    aux = torch.nn.Linear(model.out_channels, 2).to(device) if s.aux_weight > 0 else None
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    opt = torch.optim.Adam(params, lr=s.lr_max, weight_decay=s.weight_decay)
    vps = max(1, int(s.volumes_per_step))
    steps_per_epoch = -(-len(epoch_order(labels, s.balance, np.random.default_rng(0))) // vps)
    half_cycle = max(1, int(round(s.cycle_epochs * steps_per_epoch / 2)))
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=s.lr_min, max_lr=s.lr_max, step_size_up=half_cycle,
                                              mode="triangular", cycle_momentum=False)
    history: list[dict] = []
    best_state, best_loss, best_epoch = None, float("inf"), -1
    t_train = time.time()
    for epoch in range(s.epochs):
        te = time.time()
        model.train()
        losses, correct, seen = [], 0, 0
        order = epoch_order(labels, s.balance, rng)
        for start in range(0, order.size, vps):
            batch = order[start : start + vps]
            xs = volume_batch(train_cases, batch, s.max_slices, rng, gen if s.augment else None)
            y = torch.tensor([int(train_cases[i]["label"]) for i in batch], device=device)
            logits, aux_logits = volume_batch_outputs(model, xs, device, aux)
            loss = F.cross_entropy(logits.float(), y)
            if aux_logits is not None:
                loss = loss + s.aux_weight * F.cross_entropy(aux_logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
            correct += int((logits.argmax(1) == y).sum().item())
            seen += len(batch)
        rec = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
               "train_accuracy": correct / max(seen, 1), "lr": float(sched.get_last_lr()[0]),
               "seconds": round(time.time() - te, 1)}
        recalibrate_batch_norm(model, train_cases, s, device, seed=s.seed + epoch)
        if val_cases:
            v = evaluate(model, val_cases, device, s.chunk)
            rec.update(val_loss=v["loss"], val_auc=v["auc"], val_accuracy=v["volume_accuracy"])
            if s.keep_best and v["loss"] < best_loss:
                best_loss, best_epoch = v["loss"], epoch + 1
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        history.append(rec)
        log("  epoch {epoch}/{n}: loss {train_loss:.4f} acc {train_accuracy:.2f}".format(n=s.epochs, **rec)
            + (f" | val loss {rec['val_loss']:.4f} AUC {rec['val_auc']:.3f}" if "val_loss" in rec else "")
            + f" ({rec['seconds']} s)")
        if out_of_time(s.time_budget_s, t_train, epoch + 1) and epoch + 1 < s.epochs:
            log(f"  time budget of {s.time_budget_s:.0f} s reached after epoch {epoch + 1}")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    metrics: dict = {
        "train_volumes": len(train_cases),
        "train_positive": int(labels.sum()),
        "val_volumes": len(val_cases),
        "history": history,
        "epochs_run": len(history),
        "best_epoch": best_epoch if best_state is not None else len(history),
        "data_seconds": round(t_data, 1),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
        "input": asdict(_input_settings(s)),
        "device": str(device),
    }
    if val_cases:
        metrics["val"] = evaluate(model, val_cases, device, s.chunk, with_heat=True)
    metrics["seconds"] = round(time.time() - t0, 1)
    return model, metrics


def save_method_d(model: ResNeXtLSTM, metrics: dict, out_dir: Path, version: str = MODEL_VERSION,
                  seeds: str = "") -> str:
    """Write ``out_dir/method_d_resnext_lstm.safetensors`` (fp16) with the calibration
    the method reads (``input``, ``infection_threshold``) and update the manifest."""
    settings = metrics.get("settings", {})
    extra = {
        "trained_on": "synthetic chest-CT phantoms (ct_ai_node.synthetic)",
        "input": json.dumps(metrics.get("input", asdict(SliceInputSettings(size=INPUT_SIZE)))),
        "training": json.dumps({k: v for k, v in settings.items() if k not in ("cache_dir", "workers")}),
    }
    val = metrics.get("val", {})
    if "infection_threshold" in val:
        extra["infection_threshold"] = str(val["infection_threshold"])
    if "auc" in val:
        extra["val_auc"] = f"{val['auc']:.4f}"
    if seeds:
        extra["seeds"] = seeds
    return save_model(model.cpu(), Path(out_dir) / f"{WEIGHTS_NAME}.safetensors", architecture=ARCHITECTURE,
                      arch_kwargs=settings.get("arch_kwargs", {}), version=version, extra=extra)
