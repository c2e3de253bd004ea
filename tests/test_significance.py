"""Significance of neuron expertise (stage 2): p-values and q-values, closed form and within-prompt permutation
null, on synthetic activation matrices with known answers; then 02_score.py and 03_suppress.py --select
significant as commands on such a matrix."""
import numpy as np
import pytest
from conftest import load_stage
from scipy.stats import false_discovery_control, kstest
from test_pipeline import run_stage

from common import UserError
from sgm.artifacts import load_npz, load_pt, save_npz

score = load_stage("02_score.py")


def closed_p(x, labels):
    auroc, tie_terms = score.auroc_columns(x, labels, with_ties=True)
    return score.mann_whitney_p(auroc, tie_terms, int(labels.sum()), int((1 - labels).sum()))


def shuffled(x, labels, groups, draws, rng, chunk_neurons=4096):
    """Every shuffle's AUROCs (draws x neurons), as 02 computes them a chunk at a time."""
    permuted = score.shuffled_labels(labels, groups, draws, rng)
    return score.shuffled_aurocs(x, labels, permuted, chunk_neurons)[0]


def pooled_p(auroc, x, labels, groups, draws, rng):
    """02's permutation p from the pooled null, kept as counts on U's grid."""
    permuted = score.shuffled_labels(labels, groups, draws, rng)
    _, counts = score.shuffled_aurocs(x, labels, permuted, pool=draws)
    return score.permutation_p(auroc, counts, int(labels.sum()), int((1 - labels).sum()))


def sorted_pool_p(values, null):
    """The permutation p as 02 computed it until 2026-12-02: every null value pooled and sorted (null.size floats
    in memory). The reference the streamed p must equal."""
    pooled = np.sort(null, axis=None)
    return (1 + pooled.size - np.searchsorted(pooled, values, side="left")) / (1 + pooled.size)


def planted(n_items=300, n_neurons=2000, n_experts=20, shift=0.9, seed=0):
    """Noise with the first n_experts columns shifted up for the toxic items (a quarter of them)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n_items) % 4 == 0).astype(np.int64)
    x = rng.normal(size=(n_items, n_neurons)).astype(np.float32)
    x[:, :n_experts] += shift * labels[:, None]
    return x, labels


def test_shuffled_aurocs_are_auroc_columns_bit_for_bit():
    """One row per group: every shuffle is the identity, so the rank-product path must reproduce auroc_columns
    exactly (permutation p compares them with >=), ties, -0.0 and constant columns included."""
    rng = np.random.default_rng(4)
    labels = (rng.random(90) < 0.3).astype(np.int64)
    x = rng.normal(size=(90, 50)).astype(np.float32)
    x[:, :10] = np.maximum(x[:, :10], 0)                       # ReLU-like: many zeros
    x[:, 10:15] = rng.integers(-2, 2, size=(90, 5))            # few values
    x[:, 15] = 2.0                                             # constant
    x[:, 16] = np.where(rng.random(90) < 0.5, -0.0, 0.0)       # -0.0 == +0.0
    null = shuffled(x, labels, np.arange(90), 3, rng, chunk_neurons=7)
    for row in null:
        np.testing.assert_array_equal(row, score.auroc_columns(x, labels))


def test_closed_form_agrees_with_an_empirical_permutation_null():
    """Per-column exact permutation p (4000 plain shuffles) and the pooled permutation p vs the closed form."""
    rng = np.random.default_rng(3)
    labels = (np.arange(60) % 3 == 0).astype(np.int64)
    x = rng.normal(size=(60, 200)).astype(np.float32)
    x[:, :8] += labels[:, None] * np.linspace(0, 1.0, 8)  # p from ~0.5 down to ~0.001
    x[:, 8] = rng.integers(0, 3, size=60)                 # ties
    want = closed_p(x, labels)
    auroc = score.auroc_columns(x, labels)
    null = shuffled(x[:, :9], labels, np.zeros(60, dtype=np.int64), 4000, np.random.default_rng(0))
    per_column = (1 + (null >= auroc[:9]).sum(0)) / (1 + len(null))
    np.testing.assert_allclose(per_column, want[:9], atol=0.02, rtol=0.15)
    # Continuous noise columns are exchangeable, so their null pooled over columns is the same null.
    pooled = pooled_p(auroc[:8], x[:, 10:], labels, np.zeros(60, dtype=np.int64), 50, np.random.default_rng(1))
    np.testing.assert_allclose(pooled, want[:8], atol=0.02, rtol=0.15)


def test_planted_experts_are_found_with_few_false_discoveries():
    x, labels = planted()
    q = false_discovery_control(closed_p(x, labels), method="bh")
    found = np.flatnonzero(q < 0.05)
    true = np.isin(found, np.arange(20))
    assert true.sum() == 20                       # every planted expert
    assert (~true).sum() / len(found) <= 0.1      # false discovery share near the nominal 5% (here: one seed)


def test_pure_noise_has_uniform_p_and_no_significant_neurons():
    x, labels = planted(n_experts=0, seed=1)
    p = closed_p(x, labels)
    assert kstest(p, "uniform").pvalue > 0.01 and abs(p.mean() - 0.5) < 0.02
    deciles = np.histogram(p, bins=10, range=(0, 1))[0]
    assert deciles.min() > 150 and deciles.max() < 250  # 200 expected in each
    assert (false_discovery_control(p, method="bh") < 0.05).sum() <= 1


def confounded(n_prompts=40, per_prompt=10, seed=0):
    """Each prompt shifts every neuron (a prompt effect) and sets how likely its continuations are toxic (9 of 10
    for half the prompts, 1 of 10 for the others): labels go with prompts, not with anything within a prompt.
    Column 0 is a real within-prompt expert; column 1 is the prompt's index (constant within a prompt)."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_prompts), per_prompt)
    labels = (np.arange(groups.size) % per_prompt < np.where(groups % 2 == 0, 9, 1)).astype(np.int64)
    x = (rng.normal(size=(n_prompts, 300))[groups] + 0.3 * rng.normal(size=(groups.size, 300))).astype(np.float32)
    x[:, 0] = labels * 3.0 + rng.normal(size=groups.size)
    x[:, 1] = groups
    return x, labels, groups


def test_within_prompt_null_is_not_fooled_by_prompt_effects():
    x, labels, groups = confounded()
    auroc = score.auroc_columns(x, labels)
    naive = false_discovery_control(closed_p(x, labels), method="bh") < 0.05
    null = shuffled(x, labels, groups, 100, np.random.default_rng(0))
    within = false_discovery_control(pooled_p(auroc, x, labels, groups, 100, np.random.default_rng(0)),
                                     method="bh") < 0.05
    assert naive[2:].sum() > 30          # rows counted as independent items: many prompt effects look expert
    assert within[2:].sum() <= 2         # shuffled within prompt: the prompt effects are the null's too
    assert within[0] and naive[0]        # the real within-prompt expert is found by both
    # Within-prompt shuffles keep every prompt's labels: a prompt-constant column never changes its AUROC,
    # while a plain shuffle moves it.
    assert np.all(null[:, 1] == auroc[1])
    plain = shuffled(x[:, :2], labels, np.zeros_like(groups), 5, np.random.default_rng(0))
    assert np.ptp(plain[:, 1]) > 0
    # Seeded: the same seed gives the same null.
    np.testing.assert_array_equal(shuffled(x, labels, groups, 100, np.random.default_rng(0)), null)


@pytest.mark.parametrize("fixture", ["ties", "planted", "confounded"])
def test_streamed_permutation_p_equals_pooling_and_sorting_every_null_value(fixture):
    """02 never holds the permutation null (P x neurons): AUROCs are counted on U's grid, the writers' t streamed
    past the sorted real values. Both must give exactly the p of the old code, which pooled and sorted them all:
    ties, a constant column and values equal to null values included (the >= in p), any chunking."""
    rng = np.random.default_rng(7)
    if fixture == "ties":
        groups = np.repeat(np.arange(30), 4)
        labels = (rng.random(120) < 0.4).astype(np.int64)
        x = rng.integers(0, 4, size=(120, 60)).astype(np.float32)  # few values: ties everywhere
        x[:, 0] = 1.0
    elif fixture == "planted":
        x, labels = planted(n_items=200, n_neurons=500, n_experts=10, seed=3)
        groups = np.repeat(np.arange(100), 2)
    else:
        x, labels, groups = confounded()
    permuted = score.shuffled_labels(labels, groups, 40, np.random.default_rng(0))
    auroc = score.auroc_columns(x, labels)
    everything, _ = score.shuffled_aurocs(x, labels, permuted)  # 40 x neurons: the old code's null
    for chunk in (7, 4096):
        draws, counts = score.shuffled_aurocs(x, labels, permuted, chunk, keep=5, pool=30)
        np.testing.assert_array_equal(draws, everything[:5])
        assert counts.sum() == 30 * x.shape[1]
        queries = np.vstack([auroc, draws])
        np.testing.assert_array_equal(score.permutation_p(queries, counts, int(labels.sum()), int((1 - labels).sum())),
                                      sorted_pool_p(queries, everything[:30]))
    # Welch's t of the writer score: no grid, a second streamed pass. Values equal to null values must count.
    writes = np.round(x.astype(np.float64) + 0.1 * rng.normal(size=x.shape), 1)
    _, queries, _ = score.write_contrast(writes, labels, permuted, chunk_neurons=13, keep=5)  # real + 5 draws
    _, (_, *t_all), _ = score.write_contrast(writes, labels, permuted, chunk_neurons=13)
    t_all = np.array(t_all)
    np.testing.assert_array_equal(queries[1:], t_all[:5])
    reached, size = score.at_least_counts(queries, (
        chunk_t[1:31] for _, _, chunk_t, _ in score.welch_chunks(writes, labels, permuted, chunk_neurons=13)))
    assert size == 30 * x.shape[1]
    np.testing.assert_array_equal((1 + reached) / (1 + size), sorted_pool_p(queries, t_all[:30]))
    assert np.isin(queries, t_all[:30]).any() or fixture != "ties"  # the tie case really has equal values


# ---- as commands ------------------------------------------------------------------------------------------

SITES = [[f"model.layers.{i}.mlp.down_proj", 500] for i in range(4)]


def write_activations(run_dir, x, labels, item_ids):
    meta = dict(model="synthetic", sites=SITES, dtype="float32", data="synthetic", data_checksum="0" * 64,
                settings={"mode": "synthetic"})
    save_npz(run_dir / "activations.npz", dict(activations=x, labels=labels, item_ids=item_ids), meta)


def test_score_command_writes_p_q_and_the_null_table(tmp_path, capsys):
    x, labels = planted()
    x[:, 1000] = 7.0  # a constant neuron
    write_activations(tmp_path / "runs/s", x, labels, np.array([f"item-{i}" for i in range(len(labels))]))
    run_stage("02_score.py", "--run", "s", cwd=tmp_path)
    out = capsys.readouterr().out
    arrays, meta = load_npz(tmp_path / "runs/s/expertise.npz", "")
    assert arrays["p_value"].dtype == arrays["q_value"].dtype == np.float64
    np.testing.assert_array_equal(arrays["p_value"], closed_p(x, labels))
    np.testing.assert_array_equal(arrays["q_value"], false_discovery_control(arrays["p_value"], method="bh"))
    assert arrays["p_value"][1000] == 1.0
    assert meta["null"] == "closed" and meta["permutations"] == 0 and "null: closed" in out
    assert meta["n_significant"] == (arrays["q_value"] < 0.05).sum() >= 20
    table = {name: (real, chance) for name, real, chance in meta["null_table"]}
    assert table["significant at q < 0.05"][0] == meta["n_significant"] and table["significant at q < 0.05"][1] < 1
    assert (meta["n_auroc_above_065"]["real"], meta["n_auroc_above_065"]["chance"]) == \
        table["neurons with AUROC > 0.65"]
    real_damping = np.maximum(2 * arrays["auroc"] - 1, 0).sum()
    assert table["published-rule damping sum(1 - alpha)"][0] == pytest.approx(real_damping)
    assert meta["published_damping"]["real"] == pytest.approx(real_damping)
    assert "| published-rule damping sum(1 - alpha) |" in out and "q<0.05" in out

    # The same rows as 3 continuations of 100 prompts: the permutation null, seeded.
    write_activations(tmp_path / "runs/k", x, labels, np.repeat([f"item-{i}" for i in range(100)], 3))
    p_values = []
    for _ in range(2):
        run_stage("02_score.py", "--run", "k", "--permutations", 20, cwd=tmp_path)
        arrays_k, meta_k = load_npz(tmp_path / "runs/k/expertise.npz", "")
        p_values.append(arrays_k["p_value"])
    assert meta_k["null"] == "permutation" and meta_k["permutations"] == 20 and meta_k["n_prompts"] == 100
    np.testing.assert_array_equal(*p_values)
    assert arrays_k["p_value"].min() == 1 / (1 + 20 * 2000)
    with pytest.raises(UserError, match="independent rows"):
        run_stage("02_score.py", "--run", "k", "--null", "closed", cwd=tmp_path)


@pytest.mark.parametrize("flags,message", [(["--null", "exact"], "unknown --null"),
                                           (["--fdr", "0"], "--fdr"), (["--permutations", "0"], "--permutations")])
def test_score_refuses_bad_options_before_reading_anything(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        run_stage("02_score.py", "--run", "nothing", *flags, cwd=tmp_path)


def test_suppress_select_significant_on_scored_planted_experts(tmp_path):
    x, labels = planted()
    write_activations(tmp_path / "runs/s", x, labels, np.array([f"item-{i}" for i in range(len(labels))]))
    run_stage("02_score.py", "--run", "s", cwd=tmp_path)
    arrays, _ = load_npz(tmp_path / "runs/s/expertise.npz", "")
    run_stage("03_suppress.py", "--run", "s", "--select", "significant", cwd=tmp_path)
    tensors, meta = load_pt(tmp_path / "runs/s/suppression.pt", "")
    changed = tensors["alpha"].numpy() != 1
    assert np.array_equal(changed, arrays["q_value"] < 0.05) and changed[:20].all()
    assert meta["settings"]["select"] == "significant" and meta["settings"]["fdr"] == 0.05
    assert meta["n_eligible"] == changed.sum()
