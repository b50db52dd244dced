"""Evaluation metrics, pure numpy: ROC AUC, sensitivity/specificity/F1, Dice,
pointing game. Hand-checkable; tested with cases of known answer."""

from __future__ import annotations

import numpy as np


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie correction); NaN if one class is absent."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(labels, predicted) -> dict[str, float]:
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predicted).astype(bool)
    tp, tn = int((y & p).sum()), int((~y & ~p).sum())
    fp, fn = int((~y & p).sum()), int((y & ~p).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    acc = (tp + tn) / max(len(y), 1)
    return {"tp": tp, "tn": tn, "fp": fp, "fn": fn, "sensitivity": sens, "specificity": spec,
            "precision": prec, "f1": f1, "accuracy": acc}


def dice(a, b) -> float:
    a = np.asarray(a).astype(bool)
    b = np.asarray(b).astype(bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * (a & b).sum() / denom)


def pointing_game_hit(heatmap: np.ndarray, lesion: np.ndarray, tolerance_px: int = 0) -> bool:
    """True when the heat map's maximum lies on (or within ``tolerance_px`` of) the lesion."""
    if not lesion.any():
        return False
    idx = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if tolerance_px <= 0:
        return bool(lesion[idx])
    sl = tuple(slice(max(i - tolerance_px, 0), i + tolerance_px + 1) for i in idx)
    return bool(lesion[sl].any())


def heat_in_lesion_fraction(heatmap: np.ndarray, lesion: np.ndarray) -> float:
    """Share of the total heat that falls on the lesion (energy-based localisation)."""
    total = float(heatmap.sum())
    return 0.0 if total <= 0 else float(heatmap[lesion.astype(bool)].sum() / total)
