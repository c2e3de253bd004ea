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


def scipy_p_values(x, labels):
    """One scipy call per column, on float64 (scipy computes in the input's dtype)."""
    from scipy.stats import mannwhitneyu
    x = np.asarray(x, dtype=np.float64)
    return np.array([mannwhitneyu(x[labels == 1, j], x[labels == 0, j], alternative="greater",
                                  method="asymptotic").pvalue for j in range(x.shape[1])])


def test_p_values_equal_scipy_mannwhitneyu_with_ties_constants_and_deep_tails():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=120)
    x = rng.normal(size=(120, 40)).astype(np.float32)
    x[:, 0] = 3.0                                                  # constant: zero variance, p = 1 as in scipy
    x[:, 1] = labels * 2.0                                         # perfect expert, two huge ties: p ~ 1e-27
    x[:, 2] = -labels                                              # perfect anti-expert: p ~ 1
    x[:, 3:10] = rng.integers(0, 3, size=(120, 7))                 # few values: heavy ties
    x[:, 10] = np.where(rng.random(120) < 0.9, 0.0, 1.0)           # mostly zeros (a rarely firing neuron)
    x[:, 11:20] += labels[:, None] * np.linspace(0.3, 2.5, 9)      # experts of growing strength, p down to ~1e-20
    auroc, tie_terms = score.auroc_columns(x, labels, chunk_neurons=7, with_ties=True)
    np.testing.assert_array_equal(auroc, score.auroc_columns(x, labels, chunk_neurons=7))  # same AUROC path
    got = score.mann_whitney_p(auroc, tie_terms, int(labels.sum()), int((1 - labels).sum()))
    want = scipy_p_values(x, labels)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    assert got[0] == 1.0 and want[0] == 1.0 and got[1] < 1e-20 and got[2] > 0.999 and got[11:20].min() < 1e-10


def test_tie_terms_count_every_group_of_equal_values():
    x = np.array([[1, 5], [1, 5], [1, 5], [2, 5], [3, 6], [3, 7]], dtype=np.float32)  # ties 3+2 | 4
    _, tie_terms = score.auroc_columns(x, np.array([1, 0, 1, 0, 1, 0]), with_ties=True)
    np.testing.assert_array_equal(tie_terms, [(27 - 3) + (8 - 2), 64 - 4])
