"""Training of method C (Ouyang et al., IEEE TMI 2020) on synthetic phantoms: the
3D ResNet34-layout classifier with online attention, once with uniform sampling (US)
and once with size-balanced sampling (SS).

Labels: 1 for COVID-19-like phantoms, 0 for "other" (CAP-like *and* normal phantoms;
the paper's task is COVID-19 vs CAP, the node's is COVID-19-like vs anything else).
Kinds follow the seed (``data.kind_for_index``), or a site's labels (``--data``); seeds
>= ``TEST_SEED0`` are refused.

Loss: ``L = BCE + 0.5 L_ex``, with the attention loss
``L_ex = sum (T(A) - M)^2 / (sum T(A) + sum M)`` on COVID-19-like cases whose infection
mask M (the phantom lesion mask resampled to the input grid, voxels at least half
lesion) is not empty.

Size-balanced sampling: each case falls in a group by its infection/lung volume ratio
(computed from the phantom's masks at full resolution): COVID small (< 0.030), COVID
large, other small (<= 0.001: normal phantoms and CAP with hardly any lesion), other
large (CAP, > 0.001). Group weights [N_large_covid / N_small_covid, 1, 1,
N_small_other / N_large_other] (a weight whose ratio has an empty group is 1); an epoch
draws as many cases as there are, with replacement, proportionally to the weights.
Normal phantoms count as "small other" so the groups are defined by the ratio alone.

Recipe (paper): Adam, lr 2e-4, x0.1 every 5 epochs, weight decay 1e-4, 20 epochs.
Augmentation (ours, light): left-right flip, HU offset and gain and noise inside the lungs.

Preprocessed phantoms are cached as ``.npz`` in ``settings.cache_dir`` (key: seed, kind,
phantom shape, input settings), so the second model and re-training skip generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ct_ai_node.models.net_c import ARCHITECTURE, attention_loss
from ct_ai_node.models.networks import build
from ct_ai_node.models.weights import save_model
from ct_ai_node.pipeline.method_c import (
    INPUT_SETTINGS_KEY,
    WEIGHTS_NAME_SS,
    WEIGHTS_NAME_US,
    CInputSettings,
    MethodCSettings,
    combine,
    crop_to_grid,
    prepare_input,
)
from ct_ai_node.training.budget import out_of_time
from ct_ai_node.training.data import (
    case_source_version,
    case_id,
    case_kind,
    check_fit_cases,
    describe_cases,
    make_case,
    map_cases,
    site_scan,
)
from ct_ai_node.training.metrics import confusion, dice, roc_auc

logger = logging.getLogger(__name__)

MODEL_VERSION = "0.1.0"
#: bump when the cached arrays change meaning
CACHE_VERSION = 1
SAMPLINGS = ("uniform", "size_balanced")
GROUPS = ("covid_small", "covid_large", "other_small", "other_large")


@dataclass
class TrainCSettings:
    #: folder for the preprocessed-phantom cache (.npz); None keeps everything in memory only
    cache_dir: Path | None = None
    #: phantom shape (z, y, x); None draws realistic geometries (512x512, 0.5-5 mm slices),
    #: which the input resampling brings to the grid like any scan
    shape: tuple[int, int, int] | None = None
    #: the paper: Adam 2e-4, x0.1 every 5 epochs, on about 2,000 scans. On about 60
    #: phantoms an epoch is a handful of steps and that schedule stops learning after
    #: some 40 steps (short trials here stayed at chance), so the learning rate is 5x and
    #: decays by 0.3 every 6 epochs
    epochs: int = 14
    batch_size: int = 4
    lr: float = 1e-3
    lr_step_epochs: int = 6
    lr_gamma: float = 0.3
    weight_decay: float = 1e-4
    attention_weight: float = 0.5
    #: planes 8-16-32-64 (1.0 M parameters): half the team's first choice, a quarter of the
    #: CPU time per step, so that both models train on this 2-core CPU in minutes
    width: int = 8
    seed: int = 0
    #: processes generating phantoms (None: all cores)
    workers: int | None = None
    augment: bool = True
    covid_small_ratio: float = 0.030
    other_large_ratio: float = 0.001
    #: keep the epoch with the lowest validation loss (when there are validation cases)
    keep_best: bool = True
    #: stop before an epoch that would end after this many seconds of training (a lease
    #: on a borrowed GPU); None: run every epoch
    time_budget_s: float | None = None
    input: CInputSettings = field(default_factory=CInputSettings)

    def to_json(self) -> str:
        d = asdict(self)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        d.pop("workers")
        return json.dumps(d)


# ---------------------------------------------------------------- data

def _cache_key(seed, kind: str, shape, inp: CInputSettings) -> str:
    parts = [CACHE_VERSION, list(shape) if shape else None, inp.to_json(), case_source_version(seed)]
    if site_scan(seed) is not None:
        parts.append(site_scan(seed))
    tag = json.dumps(parts)
    return f"c_{case_id(seed)}_{kind}_{hashlib.sha1(tag.encode()).hexdigest()[:10]}.npz"


def phantom_case(seed, kind: str, shape, inp: CInputSettings) -> dict:
    """One phantom (or site case) -> grid input (uint8), lung and infection masks on the
    grid, label, ratio."""
    ph = make_case(seed, shape, kind)
    lung = ph.lung_labels > 0
    prep = prepare_input(ph.hu, ph.spacing, lung, inp)
    lesion_g = crop_to_grid(ph.lesion_mask[prep.placement.slices], prep.placement, inp.grid) >= 0.5
    n_lung = int(np.count_nonzero(lung))
    ratio = float(np.count_nonzero(ph.lesion_mask & lung) / n_lung) if n_lung else 0.0
    return {
        "x": np.round(prep.x * 255).astype(np.uint8),
        "lung": prep.lung,
        "lesion": lesion_g,
        "label": np.int64(ph.kind == "covid"),
        "ratio": np.float64(ratio),
        "seed": np.int64(case_id(seed)),
        "kind": np.array(ph.kind),
    }


def _load_or_make(args) -> dict:
    seed, kind, shape, inp, cache_dir = args
    path = Path(cache_dir) / _cache_key(seed, kind, shape, inp) if cache_dir else None
    if path is not None and path.is_file():
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError):
            logger.warning("cache file %s unreadable; regenerating", path)
    case = phantom_case(seed, kind, shape, inp)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **case)
        os.replace(tmp, path)
    return case


def load_cases(seeds: Iterable[int], settings: TrainCSettings, progress=None) -> dict[str, np.ndarray]:
    """Cached or freshly generated cases for ``seeds`` (kind from the seed), stacked."""
    seeds = list(seeds)
    check_fit_cases(seeds, [])
    jobs = [(s, case_kind(s), settings.shape, settings.input, settings.cache_dir) for s in seeds]
    parts = list(map_cases(_load_or_make, jobs, settings.workers, progress))
    if not parts:
        raise ValueError("no cases")
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def size_groups(labels: np.ndarray, ratios: np.ndarray, covid_small: float = 0.030,
                other_large: float = 0.001) -> np.ndarray:
    """Group index per case: 0 COVID small, 1 COVID large, 2 other small, 3 other large."""
    labels = np.asarray(labels).astype(bool)
    ratios = np.asarray(ratios, dtype=np.float64)
    return np.where(labels, np.where(ratios < covid_small, 0, 1), np.where(ratios > other_large, 3, 2)).astype(int)


def group_weights(groups: np.ndarray) -> np.ndarray:
    """[N_large_covid / N_small_covid, 1, 1, N_small_other / N_large_other] (1 where a count is 0)."""
    n = np.bincount(np.asarray(groups, dtype=int), minlength=4).astype(np.float64)
    w = np.ones(4)
    if n[0] > 0 and n[1] > 0:
        w[0] = n[1] / n[0]
    if n[3] > 0 and n[2] > 0:
        w[3] = n[2] / n[3]
    return w


# ---------------------------------------------------------------- training

def _augment(x: torch.Tensor, m: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, 1, Z, Y, X) in [0, 1] with 0 outside the lungs; m the infection masks."""
    b = x.shape[0]
    dev = x.device
    flip = (torch.rand(b, generator=g) < 0.5).to(dev)
    if bool(flip.any()):
        x = x.clone()
        m = m.clone()
        x[flip] = x[flip].flip(-1)
        m[flip] = m[flip].flip(-1)
    inside = x > 0
    width = 1500.0
    off = ((torch.rand(b, generator=g) * 2 - 1) * 40.0 / width).to(dev).view(b, 1, 1, 1, 1)
    gain = (1 + (torch.rand(b, generator=g) * 2 - 1) * 0.06).to(dev).view(b, 1, 1, 1, 1)
    sd = (torch.rand(b, generator=g) * 15.0 / width).to(dev).view(b, 1, 1, 1, 1)
    noise = torch.randn(x.shape, generator=g).to(dev) * sd
    y = ((x * gain + off + noise).clamp(0, 1)) * inside
    return y, m


def _batches(order: np.ndarray, batch: int):
    for i in range(0, len(order), batch):
        yield order[i : i + batch]


@torch.no_grad()
def predict_cases(model: torch.nn.Module, data: dict, device: torch.device, batch: int = 4,
                  maps: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (n,) and, with ``maps``, T(A) as float16 (n, Z, Y, X)."""
    model.eval()
    probs, ts = [], []
    for i in range(0, len(data["x"]), batch):
        xb = torch.from_numpy(data["x"][i : i + batch]).to(device).float()[:, None] / 255.0
        logits, _, t = model.attention(xb)
        probs.append(torch.sigmoid(logits[:, 0].float()).cpu().numpy())
        if maps:
            ts.append(t[:, 0].to(torch.float16).cpu().numpy())
    return np.concatenate(probs), (np.concatenate(ts) if maps else None)


def evaluate_cases(model, data: dict, device: torch.device, settings: TrainCSettings) -> dict:
    probs, t = predict_cases(model, data, device, maps=True)
    y = data["label"].astype(int)
    eps = 1e-6
    bce = float(-np.mean(y * np.log(np.clip(probs, eps, 1)) + (1 - y) * np.log(np.clip(1 - probs, eps, 1))))
    out = {"auc": roc_auc(y, probs), "bce": bce, **confusion(y, probs >= 0.5)}
    groups = size_groups(y, data["ratio"], settings.covid_small_ratio, settings.other_large_ratio)
    for gi, name in enumerate(GROUPS):
        sel = groups == gi
        if sel.any():
            correct = (probs[sel] >= 0.5) == (y[sel] == 1)
            out[f"accuracy_{name}"] = float(correct.mean())
    dices = [dice(t[i] >= 0.5, data["lesion"][i]) for i in range(len(y)) if y[i] == 1 and data["lesion"][i].any()]
    out["attention_dice_covid"] = float(np.mean(dices)) if dices else float("nan")
    return out


def train_method_c(seeds_train: Sequence[int], seeds_val: Sequence[int], settings: TrainCSettings | None = None,
                   device: torch.device | str = "cpu", sampling: str = "uniform", progress: bool = True,
                   log=None, data: tuple[dict, dict | None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train one method C model (``sampling`` "uniform" or "size_balanced").

    Returns the model (eval mode, on ``device``) and a metrics dict: settings, group counts
    and weights, per-epoch training losses and validation figures, final validation figures.
    ``data`` may pass already loaded (train, val) cases (see :func:`load_cases`).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    s = settings or TrainCSettings()
    device = torch.device(device)
    log = log or (print if progress else logger.info)
    t0 = time.time()
    if data is None:
        n_all = len(seeds_train) + len(seeds_val)
        bar, adv = _progress(n_all, "method C: phantoms") if progress else (None, None)
        with bar or _Null():
            train = load_cases(seeds_train, s, adv)
            val = load_cases(seeds_val, s, adv) if len(seeds_val) else None
    else:
        train, val = data
    t_data = time.time() - t0

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    gen = torch.Generator().manual_seed(s.seed)
    model = build(ARCHITECTURE, width=s.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_step_epochs, gamma=s.lr_gamma)
    amp = device.type == "cuda"

    n = len(train["label"])
    y_all = train["label"].astype(np.float32)
    groups = size_groups(train["label"], train["ratio"], s.covid_small_ratio, s.other_large_ratio)
    gw = group_weights(groups)
    p_case = gw[groups] / gw[groups].sum()
    counts = {name: int((groups == i).sum()) for i, name in enumerate(GROUPS)}
    log(f"method C ({sampling}): {n} train cases {counts}, group weights {np.round(gw, 3).tolist()}, "
        f"{s.epochs} epochs on {device}")

    history = []
    best_state, best_loss, best_epoch = None, float("inf"), 0
    t_train = time.time()
    steps_per_epoch = -(-n // s.batch_size)
    bar, adv = _progress(s.epochs * steps_per_epoch, f"method C: train {sampling}") if progress else (None, None)
    with bar or _Null():
        for epoch in range(s.epochs):
            model.train()
            order = rng.permutation(n) if sampling == "uniform" else rng.choice(n, size=n, replace=True, p=p_case)
            sums = {"loss": 0.0, "bce": 0.0, "l_ex": 0.0}
            nb = n_ex = 0
            for idx in _batches(order, s.batch_size):
                xb = torch.from_numpy(train["x"][idx]).to(device).float()[:, None] / 255.0
                mb = torch.from_numpy(train["lesion"][idx]).to(device).float()[:, None]
                yb = torch.from_numpy(y_all[idx]).to(device)
                if s.augment:
                    xb, mb = _augment(xb, mb, gen)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits, _, t = model.attention(xb)
                bce = F.binary_cross_entropy_with_logits(logits[:, 0].float(), yb)
                with_mask = (yb > 0.5) & (mb.flatten(1).sum(1) > 0)
                if with_mask.any():
                    l_ex = attention_loss(t[with_mask].float(), mb[with_mask]).mean()
                else:
                    l_ex = torch.zeros((), device=device)
                loss = bce + s.attention_weight * l_ex
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["loss"] += loss.item()
                sums["bce"] += bce.item()
                if with_mask.any():
                    sums["l_ex"] += l_ex.item()
                    n_ex += 1
                nb += 1
                if adv:
                    adv()
            sched.step()
            row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "loss": sums["loss"] / max(nb, 1),
                   "bce": sums["bce"] / max(nb, 1),
                   # mean over the batches that had COVID-19-like cases with a mask
                   "l_ex": sums["l_ex"] / n_ex if n_ex else float("nan")}
            if val is not None:
                ev = evaluate_cases(model, val, device, s)
                row.update({f"val_{k}": ev[k] for k in ("auc", "bce", "accuracy", "attention_dice_covid")})
                if s.keep_best and ev["bce"] < best_loss:
                    best_loss, best_epoch = ev["bce"], epoch + 1
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            history.append(row)
            log("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if out_of_time(s.time_budget_s, t_train, epoch + 1) and epoch + 1 < s.epochs:
                log(f"  time budget of {s.time_budget_s:.0f} s reached after epoch {epoch + 1}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    metrics = {
        "sampling": sampling,
        "n_train": n,
        "n_val": 0 if val is None else int(len(val["label"])),
        "train_seeds": describe_cases(seeds_train),
        "val_seeds": describe_cases(seeds_val),
        "group_counts": counts,
        "group_weights": gw.tolist(),
        "history": history,
        "epochs_run": len(history),
        "best_epoch": best_epoch if best_state is not None else len(history),
        "settings": json.loads(s.to_json()),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "data_seconds": round(t_data, 1),
        "seconds": round(time.time() - t0, 1),
        "device": str(device),
    }
    if val is not None:
        metrics["val"] = evaluate_cases(model, val, device, s)
    return model, metrics


# ---------------------------------------------------------------- both models, saving

def save_method_c(model: torch.nn.Module, weights_dir: Path, sampling: str, metrics: dict,
                  settings: TrainCSettings) -> str:
    """Write the model as ``method_c_uniform`` / ``method_c_size_balanced`` (fp16) with its
    input settings in the metadata; returns the SHA-256 recorded in the manifest."""
    name = WEIGHTS_NAME_US if sampling == "uniform" else WEIGHTS_NAME_SS
    val = metrics.get("val", {})
    extra = {
        INPUT_SETTINGS_KEY: settings.input.to_json(),
        "sampling": sampling,
        "labels": "1 = COVID-19-like, 0 = other (CAP-like or normal)",
        "trained_on": "synthetic chest-CT phantoms (ct_ai_node.synthetic)",
        "train_seeds": str(metrics.get("train_seeds", "")),
        "val_seeds": str(metrics.get("val_seeds", "")),
        "settings": settings.to_json(),
    }
    if "auc" in val:
        extra["val_auc"] = f"{val['auc']:.4f}"
    return save_model(model.cpu(), Path(weights_dir) / f"{name}.safetensors", architecture=ARCHITECTURE,
                      arch_kwargs={"width": settings.width}, version=MODEL_VERSION, extra=extra)


def evaluate_ensemble(us: torch.nn.Module, ss: torch.nn.Module, data: dict, device: torch.device,
                      method: MethodCSettings = MethodCSettings()) -> dict:
    """The dual-sampling ensemble on preprocessed cases (the grid, as the method sees it)."""
    p_us, t_us = predict_cases(us, data, device, maps=True)
    p_ss, t_ss = predict_cases(ss, data, device, maps=True)
    probs, ratios, ws = [], [], []
    for i in range(len(p_us)):
        p, _, r, w = combine(float(p_us[i]), float(p_ss[i]), t_us[i].astype(np.float32),
                             t_ss[i].astype(np.float32), data["lung"][i], method)
        probs.append(p)
        ratios.append(r)
        ws.append(w)
    y = data["label"].astype(int)
    probs = np.array(probs)
    return {"auc": roc_auc(y, probs), "auc_uniform": roc_auc(y, p_us), "auc_size_balanced": roc_auc(y, p_ss),
            **confusion(y, probs >= method.threshold), "mean_w_uniform": float(np.mean(ws)),
            "attention_ratio_vs_truth_corr": _corr(np.array(ratios), data["ratio"])}


def train_method_c_models(out_dir: Path, seeds_train: Sequence[int], seeds_val: Sequence[int],
                          settings: TrainCSettings | None = None, device: torch.device | str = "cpu",
                          progress: bool = True, log=None) -> dict:
    """Train the uniform and the size-balanced model on the same cases, save both into
    ``out_dir`` and write ``method_c_training_report.json``; returns the report."""
    s = settings or TrainCSettings()
    device = torch.device(device)
    log = log or (print if progress else logger.info)
    t0 = time.time()
    bar, adv = _progress(len(seeds_train) + len(seeds_val), "method C: phantoms") if progress else (None, None)
    with bar or _Null():
        train = load_cases(seeds_train, s, adv)
        val = load_cases(seeds_val, s, adv) if len(seeds_val) else None
    report: dict = {"data_seconds": round(time.time() - t0, 1)}
    models = {}
    for sampling in SAMPLINGS:
        model, metrics = train_method_c(seeds_train, seeds_val, s, device, sampling, progress, log, data=(train, val))
        models[sampling] = model
        report[sampling] = metrics
    if val is not None:
        report["ensemble_val"] = evaluate_ensemble(models["uniform"], models["size_balanced"], val, device)
        log(f"method C ensemble on validation: {report['ensemble_val']}")
    report["sha256"] = {}
    for sampling, model in models.items():
        name = WEIGHTS_NAME_US if sampling == "uniform" else WEIGHTS_NAME_SS
        report["sha256"][name] = save_method_c(model, Path(out_dir), sampling, report[sampling], s)
    report["seconds"] = round(time.time() - t0, 1)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "method_c_training_report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return report


# ---------------------------------------------------------------- helpers

def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, desc: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = Progress(TextColumn(desc), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                 TimeRemainingColumn(), transient=False)
    task = p.add_task(desc, total=total)
    return p, (lambda k=1: p.advance(task, k))
