"""Damping factors (stage 3)."""
import numpy as np
import pytest
from conftest import load_stage

from common import UserError

suppress = load_stage("03_suppress.py")
AUROC = np.random.default_rng(0).uniform(0, 1, size=1000)


def test_aura_alpha_formula_and_range():
    alpha = suppress.alpha_from_auroc(AUROC, "aura")
    assert alpha.min() >= 0 and alpha.max() <= 1
    above = AUROC > 0.5
    np.testing.assert_allclose(alpha[above], 2 * (1 - AUROC[above]))
    assert np.all(alpha[~above] == 1)


def test_aura_edges():
    alpha = suppress.alpha_from_auroc(np.array([0.0, 0.3, 0.5, 0.75, 1.0]), "aura")
    np.testing.assert_allclose(alpha, [1, 1, 1, 0.5, 0])


@pytest.mark.parametrize("method,value", [("det0", 0.0), ("damp", 0.5)])
def test_top_k_methods_pick_exactly_k_highest(method, value):
    alpha = suppress.alpha_from_auroc(AUROC, method, top_k=37)
    changed = np.flatnonzero(alpha != 1)
    assert len(changed) == 37 and np.all(alpha[changed] == value)
    assert set(changed) == set(np.argsort(AUROC)[-37:])


def test_top_k_needed_for_det0():
    with pytest.raises(UserError, match="top-k"):
        suppress.alpha_from_auroc(AUROC, "det0")


def test_strength_interpolates_and_clips():
    alpha = suppress.alpha_from_auroc(AUROC, "aura")
    assert np.all(suppress.alpha_from_auroc(AUROC, "aura", strength=0) == 1)
    np.testing.assert_allclose(suppress.alpha_from_auroc(AUROC, "aura", strength=0.5), 1 - 0.5 * (1 - alpha))
    strong = suppress.alpha_from_auroc(AUROC, "aura", strength=3)
    assert strong.min() == 0 and strong.max() <= 1


def test_aura_top_k_and_layers():
    alpha = suppress.alpha_from_auroc(AUROC, "aura", top_k=10)
    assert (alpha != 1).sum() == 10
    eligible = suppress.layer_mask("1:2", [400, 300, 300])
    assert eligible.sum() == 300 and eligible[400:700].all()
    alpha = suppress.alpha_from_auroc(AUROC, "aura", eligible=eligible)
    assert np.all(alpha[:400] == 1) and np.all(alpha[700:] == 1) and (alpha[400:700] < 1).any()


def test_published_variant_amplifies_and_only_it():
    alpha = suppress.alpha_from_auroc(AUROC, "published")
    band = (AUROC > 0.3) & (AUROC < 0.5)
    assert np.all(alpha[band] > 1) and alpha.max() <= 1.4 + 1e-12


def test_normalise_per_layer_by_brute_force():
    sizes = [400, 300, 300]
    normalised = suppress.normalise_per_layer(AUROC, sizes)
    start = 0
    for size in sizes:
        layer, out = AUROC[start:start + size], normalised[start:start + size]
        top = layer.max()
        for a, b in zip(layer, out):  # element by element, from the formula in the docstring
            assert b == (0.5 + 0.5 * (a - 0.5) / (top - 0.5) if a > 0.5 else a)
        assert out.max() == 1.0 and np.array_equal(np.argsort(layer, kind="stable"), np.argsort(out, kind="stable"))
        start += size
    alpha = suppress.alpha_from_auroc(normalised, "aura")
    assert all(a.min() == 0 for a in np.split(alpha, np.cumsum(sizes)[:-1]))  # each layer's top expert silenced
    assert np.array_equal(alpha == 1, AUROC <= 0.5)  # the same neurons are damped, only harder


def test_normalise_leaves_a_layer_without_experts_alone():
    auroc = np.array([0.2, 0.5, 0.4, 0.6, 0.7])
    np.testing.assert_allclose(suppress.normalise_per_layer(auroc, [3, 2]), [0.2, 0.5, 0.4, 0.75, 1.0])
