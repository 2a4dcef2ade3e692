"""Multi-label evaluation metrics shared by pre-training and probing."""

from __future__ import annotations

import logging

import numpy as np
from sklearn import metrics

_logger = logging.getLogger(__name__)


def macro_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Macro ROC-AUC and macro average precision (PR-AUC) over the classes that can be scored.

    A class with no positive (or no negative) example has no ROC-AUC; it is left out of both
    averages and counted in ``n_classes_scored`` rather than crashing a validation epoch.
    """
    y_true = np.asarray(y_true) > 0.5
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.shape != y_score.shape or y_true.ndim != 2:
        raise ValueError(f"macro_metrics: y_true {y_true.shape} and y_score {y_score.shape} must both be (n, n_classes)")
    positives = y_true.sum(0)
    scored = (positives > 0) & (positives < y_true.shape[0])
    if not scored.any():
        _logger.warning("no class has both positive and negative examples: metrics are NaN")
        return {"roc_auc": float("nan"), "pr_auc": float("nan"), "n_classes_scored": 0}
    return {
        "roc_auc": float(metrics.roc_auc_score(y_true[:, scored], y_score[:, scored], average="macro")),
        "pr_auc": float(metrics.average_precision_score(y_true[:, scored], y_score[:, scored], average="macro")),
        "n_classes_scored": int(scored.sum()),
    }
