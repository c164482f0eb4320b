"""evaluate's metrics: equal to scikit-learn's on a fixed list, and the seed's table reproduced."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)

from worker.lifecycle.evaluation import compute_metrics, format_table, predict

RNG = np.random.default_rng(7)
LABELS = np.array(["real"] * 40 + ["ai"] * 35)
# High means real: real images score higher on average, with overlap.
SCORES = np.concatenate([RNG.normal(0.3, 0.35, 40), RNG.normal(-0.25, 0.35, 35)]).clip(-1, 1)


def seed_like_scores() -> tuple[np.ndarray, np.ndarray]:
    """98 real (94 above 0, 4 just below), 99 AI (all well below 0): the seed's validation table."""
    real = np.concatenate([np.linspace(0.2, 0.95, 94), np.full(4, -0.05)])
    ai = np.linspace(-0.9, -0.3, 99)
    return np.concatenate([real, ai]), np.array(["real"] * 98 + ["ai"] * 99)


def test_metrics_equal_scikit_learn() -> None:
    metrics = compute_metrics(SCORES, LABELS, threshold=0.1, high_score_means="real")
    predicted = np.where(SCORES > 0.1, "real", "ai")
    ai = LABELS == "ai"
    assert metrics.positive == "ai" and metrics.negative == "real"
    assert metrics.auc_roc == pytest.approx(roc_auc_score(ai, -SCORES))
    assert metrics.average_precision == pytest.approx(average_precision_score(ai, -SCORES))
    assert metrics.balanced_accuracy == pytest.approx(balanced_accuracy_score(LABELS, predicted))
    assert metrics.f1["ai"] == pytest.approx(f1_score(LABELS, predicted, pos_label="ai"))
    assert metrics.f1["real"] == pytest.approx(f1_score(LABELS, predicted, pos_label="real"))
    assert metrics.positives.correct == int(((predicted == "ai") & ai).sum())
    assert metrics.positives.total == 35
    assert metrics.negatives.correct == int(((predicted == "real") & ~ai).sum())
    assert metrics.negatives.total == 40


def test_tpr_at_fpr_by_brute_force() -> None:
    metrics = compute_metrics(SCORES, LABELS, high_score_means="real")
    ai_score, ai = -SCORES, LABELS == "ai"
    for target in (0.01, 0.05):
        best = 0.0
        for cut in np.append(np.unique(ai_score), np.inf):
            flagged = ai_score >= cut
            fpr = (flagged & ~ai).sum() / (~ai).sum()
            if fpr <= target:
                best = max(best, (flagged & ai).sum() / ai.sum())
        assert metrics.tpr_at_fpr[target] == pytest.approx(best)


def test_best_threshold_maximises_balanced_accuracy() -> None:
    metrics = compute_metrics(SCORES, LABELS, high_score_means="real")
    best = metrics.best_threshold
    assert metrics.best_balanced_accuracy == pytest.approx(
        balanced_accuracy_score(LABELS, predict(SCORES, best, "real"))
    )
    values = np.unique(SCORES)
    candidates = np.concatenate([[-1.0], (values[1:] + values[:-1]) / 2, [1.0]])
    brute = max(balanced_accuracy_score(LABELS, predict(SCORES, t, "real")) for t in candidates)
    assert metrics.best_balanced_accuracy == pytest.approx(brute)


def test_polarity_does_not_change_the_metrics() -> None:
    """HIGH_SCORE_MEANS=ai with negated scores describes the same classifier."""
    real_high = compute_metrics(SCORES, LABELS, threshold=0.1, high_score_means="real")
    ai_high = compute_metrics(-SCORES, LABELS, threshold=-0.1 - 1e-9, high_score_means="ai")
    assert ai_high.auc_roc == pytest.approx(real_high.auc_roc)
    assert ai_high.average_precision == pytest.approx(real_high.average_precision)
    assert ai_high.positives == real_high.positives and ai_high.negatives == real_high.negatives
    assert ai_high.tpr_at_fpr == pytest.approx(real_high.tpr_at_fpr)
    assert -ai_high.best_threshold == pytest.approx(real_high.best_threshold)


def test_seed_table_reproduced() -> None:
    scores, labels = seed_like_scores()
    metrics = compute_metrics(scores, labels, high_score_means="real", positive="ai")
    assert (metrics.negatives.correct, metrics.negatives.total) == (94, 98)
    assert (metrics.positives.correct, metrics.positives.total) == (99, 99)
    assert round(metrics.f1["real"], 4) == 0.9792  # the seed's F1: its 94/98 class as positive
    assert round(metrics.f1["ai"], 4) == 0.9802  # the usual convention, 99/99 as positive
    assert metrics.auc_roc == 1.0
    table = format_table(metrics)
    assert "positive class: ai" in table
    assert "true negative rate (real)" in table and "94/98 (95.92 %)" in table
    assert "true positive rate (ai)" in table and "99/99 (100.00 %)" in table
    assert "0.9792" in table and "0.9802" in table and "AUC-ROC" in table
    assert "WARNING" not in table


def test_inverted_polarity_warns() -> None:
    scores, labels = seed_like_scores()
    metrics = compute_metrics(scores, labels, high_score_means="ai")
    assert metrics.auc_roc == 0.0 and metrics.polarity_inverted
    assert "REALSCORE_HIGH_SCORE_MEANS=real" in format_table(metrics)


def test_one_class_only_has_no_ranking_metrics() -> None:
    metrics = compute_metrics([0.5, -0.2, 0.3], ["real"] * 3)
    assert metrics.auc_roc is None and metrics.best_threshold is None
    assert metrics.negatives.text() == "2/3 (66.67 %)"
    assert metrics.positives.text() == "0/0"
    assert "n/a" in format_table(metrics)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError):
        compute_metrics([0.1], ["fake"])
    with pytest.raises(ValueError):
        compute_metrics([], [])
