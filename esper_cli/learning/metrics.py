"""How well predicted actions match the labels: accuracy, balanced accuracy, per-class P/R/F1, the
confusion matrix, and which classes had no support (a score that leaves them out says so)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from ..contracts import ACTION_NAMES, FEATURE_NAMES, N_ACTIONS, SeedStage
from ..data.decisions import DataError

LABELS = list(range(N_ACTIONS))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present in y_true), per-class
    precision/recall/F1/support and the confusion matrix (rows actual, columns predicted).

    `classes_without_support` names the classes absent from y_true: the balanced accuracy is
    then over `balanced_accuracy_classes` only and says nothing about the others (a 1.0 over
    three classes is not a perfect score over four); `balanced_accuracy_label` words it so.
    """
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0:
        raise DataError("no decisions to score")
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected, not news
        warnings.simplefilter("ignore")
        bal = float(balanced_accuracy_score(y_true, y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=LABELS, zero_division=0)
    scored = [name for i, name in enumerate(ACTION_NAMES) if s[i] > 0]
    return {
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": bal,
        "balanced_accuracy_classes": scored,
        "classes_without_support": [name for i, name in enumerate(ACTION_NAMES) if s[i] == 0],
        "per_class": {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                             "support": int(s[i])} for i, name in enumerate(ACTION_NAMES)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=LABELS).tolist(),
        "labels": list(ACTION_NAMES),
        "n_decisions": int(len(y_true)),
    }


def balanced_accuracy_label(metrics: dict[str, Any], where: str) -> str:
    """How to name `metrics`' balanced accuracy: plainly when every class had support, else e.g.
    "balanced accuracy (3 of 4 classes; no CULL in validation)" (`where` names the decisions)."""
    missing = metrics.get("classes_without_support") or []
    if not missing:
        return "balanced accuracy"
    n_scored = len(metrics.get("labels", ACTION_NAMES)) - len(missing)
    return f"balanced accuracy ({n_scored} of {n_scored + len(missing)} classes; no {'/'.join(missing)} in {where})"


def seed_stages(observations: np.ndarray) -> np.ndarray:
    """The managed seed's stage at each decision (DORMANT where no seed is active), from raw observations."""
    has = observations[:, FEATURE_NAMES.index("has_active_seed")] > 0.5
    stage = observations[:, FEATURE_NAMES.index("seed_stage")].astype(np.int64)
    return np.where(has, stage, int(SeedStage.DORMANT))


def agreement_by_stage(agree: np.ndarray, stages: np.ndarray) -> dict[str, dict[str, int]]:
    """Decisions and disagreements per seed stage (where do two policies part ways?)."""
    out = {}
    for s in np.unique(stages):
        m = stages == s
        name = SeedStage(int(s)).name if int(s) in SeedStage._value2member_map_ else f"stage {int(s)}"
        out[name] = {"decisions": int(m.sum()), "disagreements": int((~agree[m]).sum())}
    return out
