"""AUROC (stage 2) against an independent brute-force pairwise count."""
import numpy as np
import pytest
from conftest import load_stage

score = load_stage("02_score.py")


def brute_force_auroc(column, labels):
    """P(toxic > clean) + 1/2 P(tie), counted over every (toxic, clean) pair."""
    pos, neg = column[labels == 1], column[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_vectorised_auroc_equals_pairwise_count_with_ties_and_constants():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=41)
    x = rng.integers(0, 5, size=(41, 30)).astype(np.float32)  # few values -> many ties
    x[:, 3] = 7.0                                             # a constant neuron
    x[:, 4] = labels * 2.0                                    # a perfect expert
    x[:, 5] = -labels                                         # a perfect anti-expert
    x[:, 6] = np.where(labels == 1, -0.0, 0.0)                 # -0.0 equals +0.0: a constant neuron
    x[:, 7] = rng.integers(-3, 3, size=41) * 1e-30            # tiny and negative values, ties
    x[:, 8:] = rng.normal(size=(41, 22))
    got = score.auroc_columns(x, labels, chunk_neurons=7)     # chunks that do not divide the width
    want = np.array([brute_force_auroc(x[:, j], labels) for j in range(x.shape[1])])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[3] == 0.5 and got[4] == 1.0 and got[5] == 0.0 and got[6] == 0.5


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=200)
    x = (rng.normal(size=(200, 50)) + labels[:, None] * rng.normal(size=50)).astype(np.float32)
    got = score.auroc_columns(x, labels)
    want = [roc_auc_score(labels, x[:, j]) for j in range(50)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_single_class_is_refused():
    from common import UserError
    with pytest.raises(UserError, match="both classes"):
        score.auroc_columns(np.zeros((5, 3)), np.ones(5))
