"""Damping factors (stage 3)."""
import numpy as np
import pytest
from conftest import load_stage
from test_pipeline import run_stage

from common import UserError
from sgm.artifacts import load_pt, save_npz

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


# ---- --select significant (as a command, on a hand-made expertise.npz) -----------------------------------

SIZES = [400, 300, 300]


def write_expertise(run_dir, with_q=True):
    """AUROC as above; q_value < 0.05 for a known set of neurons spread over the layers (most of them expert)."""
    q = np.ones(AUROC.size)
    q[::7] = 0.01                      # "significant"
    q[::21] = 0.2                      # significant only at a looser --fdr
    arrays = dict(auroc=AUROC, p_value=q / 10, q_value=q) if with_q else dict(auroc=AUROC)
    meta = dict(model="synthetic", sites=[[f"model.layers.{i}.mlp.down_proj", n] for i, n in enumerate(SIZES)],
                dtype="float32", data="synthetic", data_checksum="0" * 64, upstream_settings={}, null="closed")
    save_npz(run_dir / "expertise.npz", arrays, meta)
    return q


def suppress_alpha(tmp_path, *flags):
    run_stage("03_suppress.py", "--run", "s", *flags, cwd=tmp_path)
    tensors, meta = load_pt(tmp_path / "runs/s/suppression.pt", "")
    return tensors["alpha"].numpy().astype(np.float64), meta


def test_select_significant_changes_only_significant_neurons(tmp_path, capsys):
    q = write_expertise(tmp_path / "runs/s")
    everything, _ = suppress_alpha(tmp_path)
    alpha, meta = suppress_alpha(tmp_path, "--select", "significant")
    significant = q < 0.05
    assert "neurons eligible" in capsys.readouterr().out
    # The significant neurons keep their aura alpha; every other neuron stays at 1.
    np.testing.assert_allclose(alpha, np.where(significant, everything, 1.0), rtol=1e-6)
    assert np.array_equal(alpha != 1, significant & (AUROC > 0.5))
    assert meta["settings"]["select"] == "significant" and meta["settings"]["fdr"] == 0.05
    assert meta["n_eligible"] == significant.sum()
    looser, _ = suppress_alpha(tmp_path, "--select", "significant", "--fdr", 0.5)
    assert np.array_equal(looser != 1, (q < 0.5) & (AUROC > 0.5))


def test_select_significant_composes_with_top_k_layers_and_det0(tmp_path):
    q = write_expertise(tmp_path / "runs/s")
    significant = q < 0.05
    in_layer_1 = np.zeros(AUROC.size, dtype=bool)
    in_layer_1[400:700] = True
    alpha, _ = suppress_alpha(tmp_path, "--select", "significant", "--layers", "1:2")
    assert np.array_equal(alpha != 1, significant & in_layer_1 & (AUROC > 0.5))
    alpha, _ = suppress_alpha(tmp_path, "--select", "significant", "--top-k", 5)
    top5 = np.argsort(np.where(significant, -AUROC, np.inf), kind="stable")[:5]
    assert set(np.flatnonzero(alpha != 1)) == set(top5)
    alpha, _ = suppress_alpha(tmp_path, "--select", "significant", "--method", "det0", "--top-k", 10)
    assert set(np.flatnonzero(alpha == 0)) == set(np.argsort(np.where(significant, -AUROC, np.inf))[:10])
    assert np.all(alpha[alpha != 0] == 1)
    # More neurons asked for than are significant: only the significant ones change, never the others.
    alpha, _ = suppress_alpha(tmp_path, "--select", "significant", "--method", "det0", "--top-k", 900)
    assert np.array_equal(alpha == 0, significant)


@pytest.mark.parametrize("flags,message", [
    (["--select", "significant", "--fdr", "0"], "--fdr must be between 0 and 1"),
    (["--select", "significant", "--fdr", "1.5"], "--fdr must be between 0 and 1"),
    (["--select", "best"], "unknown --select 'best'"),
    (["--method", "zero"], "unknown --method 'zero'"),
    (["--method", "act", "--top-k", "-1"], "--top-k"),  # transport (tests/test_act.py)
    (["--method", "act", "--strength", "-0.5"], "--strength"),
    (["--method", "transport"], "unknown --method 'transport'"),
    (["--method", "det0", "--top-k", "5", "--stack", "det0.pt"], "--stack stacks a transport map on a damping"),
])
def test_bad_select_options_fail_before_anything_is_loaded(tmp_path, flags, message):
    # No expertise.npz exists: the option error must come first (a missing file would say "not found").
    with pytest.raises(UserError, match=message) as error:
        run_stage("03_suppress.py", "--run", "missing", *flags, cwd=tmp_path)
    assert "\n" not in error.value.message


def test_select_significant_needs_q_values(tmp_path):
    write_expertise(tmp_path / "runs/s", with_q=False)
    with pytest.raises(UserError, match="no q_value .* rerun 02_score.py") as error:
        run_stage("03_suppress.py", "--run", "s", "--select", "significant", cwd=tmp_path)
    assert "\n" not in error.value.message
    suppress_alpha(tmp_path)  # --select all still works on an old expertise.npz
