"""Stage 2: pooled activations -> each neuron's toxicity expertise (AUROC) and its significance
-> runs/<run>/expertise.npz, expertise.png

    python 02_score.py --run demo                           # what `make score` runs (--null auto)
    python 02_score.py --run demo --null permutation --permutations 200 --seed 1

Expertise of neuron m = AUROC of its pooled activation at separating toxic (positive) from non-toxic items:
the probability that a random toxic item activates m more than a random non-toxic one, ties counting one
half. A constant neuron scores exactly 0.5. Computed for all neurons at once from ranks (Mann-Whitney U):
    AUROC = (sum of the toxic items' ranks - n_toxic (n_toxic + 1) / 2) / (n_toxic n_clean)
with average ranks for ties, computed in column chunks so memory stays bounded (see auroc_columns).

Significance. At a few hundred calibration items most neurons with AUROC > 0.5 are chance, so each neuron also
gets a one-sided p-value (H1: toxic expert, AUROC > 0.5) and a Benjamini-Hochberg q-value over all neurons
(`p_value`, `q_value`; 03_suppress.py --select significant damps only q < --fdr). --null auto (default) picks:
  closed       if every row has its own item id (independent rows): Mann-Whitney U's normal approximation with
               tie and continuity corrections, = scipy.stats.mannwhitneyu(toxic, clean, alternative="greater",
               method="asymptotic") for all neurons at once; a constant neuron gets p = 1, as in scipy.
  permutation  if rows repeat an item id (a prompt's greedy + sampled continuations, not independent: the closed
               form would count K continuations as K items): labels shuffled WITHIN each prompt, --permutations
               P times (seeded), null AUROCs pooled over neurons, p_m = (1 + #{null >= AUROC_m}) / (1 + P n_neurons).
               It asks if a neuron tells a prompt's toxic continuations from its clean ones (mixed prompts only).
--null closed with repeated ids is refused. The null table (printed, and in the meta) sets the real labels
against --null-draws shuffles of the same kind: AUROC counts, the published rule's total damping
sum(1 - alpha) and the number of significant neurons, real vs chance.

Memory does not grow with items x neurons: the activations are read from activations.npz one column chunk at a
time (artifacts.StoredMatrix), never loaded whole (19 GB at 1,000 items of Qwen3-VL-30B-A3B's 4.7M neurons in float32),
and each chunk becomes float32 on its own. Float16 activations (01_collect.py --store-dtype float16) are scored
as stored. What stays in memory is per neuron: AUROC, p, q and the null's shuffled AUROCs (8 bytes each).
"""
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import false_discovery_control, norm, rankdata  # noqa: E402

from common import check_range, fail, parse_overrides, peak_rss_mb, run_name  # noqa: E402
from sgm.artifacts import load_npz, save_npz  # noqa: E402
from sgm.neurons import neurons_per_layer  # noqa: E402

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    run="demo",           # reads runs/<run>/activations.npz, writes runs/<run>/expertise.npz
    chunk_neurons=4096,   # neurons sorted at once (memory ~ items x chunk x 8 bytes, twice)
    null="auto",          # auto | closed | permutation: the chance distribution behind p (see above)
    permutations=100,     # permutation null: within-prompt label shuffles (null = P x neurons AUROCs)
    null_draws=5,         # label shuffles for the chance column of the null table and the plot
    seed=0,               # of every label shuffle
    fdr=0.05,             # q level of the significance counts printed and stored (03 has its own --fdr)
)


def auroc_columns(activations, labels, chunk_neurons=4096, with_ties=False):
    """AUROC of every column of `activations` (items x neurons: an array or an artifacts.StoredMatrix, float32 or
    float16, turned into float32 a chunk at a time) for binary `labels` (1 = toxic).

    Same number as the rank formula in the module docstring, computed from one integer sort per neuron (the
    floor of any rank method; `make bench` compares it with a plain np.sort and with sklearn):
    - each activation becomes an int64 key = (an integer with the same order as the float32) * 2 + label bit,
      and the keys of each neuron are sorted: equal activations then put the non-toxic items first;
    - in sorted order, the positions of the toxic items summed, minus n_toxic (n_toxic - 1) / 2, count the
      (toxic, non-toxic) pairs where the non-toxic activation is <= the toxic one: ties counted fully;
    - neurons with a tie are sorted once more with the label bit flipped (ties then count zero), and the two
      counts averaged: ties count one half, exactly the Mann-Whitney U of average ranks.
    with_ties=True also returns each neuron's tie term sum(t^3 - t) over its groups of t equal activations
    (the variance correction of mann_whitney_p), read off the same sorted keys."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        fail(f"AUROC needs both classes, got {n_pos} toxic and {n_neg} non-toxic items: rerun 01_collect.py "
             "with more or other calibration items")
    position = np.arange(labels.size, dtype=np.float64)
    offset = n_pos * (n_pos - 1) / 2
    out = np.empty(activations.shape[1], dtype=np.float64)
    tie_terms = np.zeros(activations.shape[1], dtype=np.float64)

    def sorted_keys(order_key, label_bit):  # items x neurons int32 -> neurons x items int64, sorted per neuron
        keys = order_key.T.astype(np.int64, order="C")
        keys <<= 1
        keys |= label_bit
        keys.sort(axis=1)
        return keys

    for start in range(0, activations.shape[1], chunk_neurons):
        bits = np.ascontiguousarray(activations[:, start:start + chunk_neurons], dtype=np.float32).view(np.int32)
        # float32 bits as an int32 with the same order: magnitude bits, negated for negative numbers
        # (-0.0 and +0.0 both become 0, as they compare equal).
        order_key = bits & 0x7FFFFFFF
        np.negative(order_key, out=order_key, where=bits < 0)
        keys = sorted_keys(order_key, labels)
        pairs = (keys & 1).astype(np.float64) @ position - offset
        values = keys >> 1
        same_as_previous = values[:, 1:] == values[:, :-1]
        tied = same_as_previous.any(1)
        if tied.any():
            if with_ties:
                tie_terms[start + np.flatnonzero(tied)] = tie_sums(same_as_previous[tied])
            keys = sorted_keys(order_key[:, tied], ~labels)
            pairs[tied] = (pairs[tied] + (1 - (keys & 1)).astype(np.float64) @ position - offset) / 2
        out[start:start + chunk_neurons] = pairs / (n_pos * n_neg)
    return (out, tie_terms) if with_ties else out


def tie_sums(same_as_previous):
    """Per row of sorted values (given as value[i] == value[i - 1], rows x items - 1): sum over runs of t
    equal values of t^3 - t. Runs are cut at each row's start, so one flat pass finds every run's length."""
    rows, n_items = same_as_previous.shape[0], same_as_previous.shape[1] + 1
    run_start = np.ones((rows, n_items), dtype=bool)
    run_start[:, 1:] = ~same_as_previous
    starts = np.flatnonzero(run_start)
    lengths = np.diff(starts, append=run_start.size).astype(np.float64)
    return np.bincount(starts // n_items, weights=lengths ** 3 - lengths, minlength=rows)


def mann_whitney_p(auroc, tie_terms, n_pos, n_neg):
    """One-sided p per neuron (H1: AUROC > 0.5): scipy.stats.mannwhitneyu(toxic, clean, alternative="greater",
    method="asymptotic") vectorised, U = AUROC n_pos n_neg. norm.sf, not 1 - cdf: BH over ~10^5 neurons needs p
    accurate to ~1e-7. A constant neuron has zero variance and gets p = 1, as in scipy."""
    n = n_pos + n_neg
    sd = np.sqrt(np.maximum(n_pos * n_neg / 12 * ((n + 1) - tie_terms / (n * (n - 1))), 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (auroc * n_pos * n_neg - n_pos * n_neg / 2 - 0.5) / sd
    return np.clip(norm.sf(z), 0, 1)


def shuffled_aurocs(activations, labels, groups, draws, rng, chunk_neurons=4096):
    """AUROCs (draws x neurons) with the labels shuffled among the rows of each group (groups: int per row;
    all zeros = a plain shuffle). Class sizes, and every group's count of toxic rows, stay as they are.
    A shuffle moves labels, not activations: each neuron's average ranks are computed once, and U of every
    shuffle is one matrix product, bit for bit what auroc_columns gives on the shuffled labels."""
    labels = np.asarray(labels).astype(bool)
    by_group = np.argsort(groups, kind="stable")
    permuted = np.zeros((draws, labels.size))
    for draw in range(draws):
        shuffled = np.lexsort((rng.random(groups.size), groups))  # rows by group, in random order within it
        permuted[draw, by_group] = labels[shuffled]
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    out = np.empty((draws, activations.shape[1]))
    for start in range(0, activations.shape[1], chunk_neurons):
        ranks = rankdata(activations[:, start:start + chunk_neurons], axis=0)  # sums of 0.5s: exact in float64
        out[:, start:start + chunk_neurons] = (permuted @ ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def permutation_p(auroc, null):
    """p_m = (1 + #{null >= AUROC_m}) / (1 + null.size), the null AUROCs pooled over neurons and shuffles."""
    pooled = np.sort(null, axis=None)
    return (1 + pooled.size - np.searchsorted(pooled, auroc, side="left")) / (1 + pooled.size)


def null_table(aurocs, p_values, fdr):
    """The null table's rows [name, value under the real labels, mean under the shuffles] from aurocs and
    p_values (rows x neurons: the real labels first, then one row per label shuffle)."""
    q_values = false_discovery_control(p_values, method="bh", axis=1)
    rows = {"neurons with AUROC > 0.65": (aurocs > 0.65).sum(1), "neurons with AUROC > 0.7": (aurocs > 0.7).sum(1),
            "neurons with AUROC < 0.3": (aurocs < 0.3).sum(1), "largest AUROC": aurocs.max(1),
            "SD of AUROC": aurocs.std(1),
            # the published rule, alpha = 2 (1 - AUROC) above 0.5, damps by 1 - alpha = 2 AUROC - 1 there
            "published-rule damping sum(1 - alpha)": np.maximum(2 * aurocs - 1, 0).sum(1),
            f"significant at q < {fdr:g}": (q_values < fdr).sum(1)}
    return [[name, float(values[0]), float(values[1:].mean())] for name, values in rows.items()]


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    if cfg["null"] not in ("auto", "closed", "permutation"):
        fail(f"unknown --null {cfg['null']!r}; use auto, closed or permutation")
    check_range(cfg, "chunk_neurons", low=1, fix="neurons sorted at once, e.g. 4096 (lower it if memory runs out)")
    check_range(cfg, "permutations", low=1, fix="within-prompt label shuffles for the permutation null, e.g. 100")
    check_range(cfg, "null_draws", low=1, fix="label shuffles for the null table, e.g. 5")
    check_range(cfg, "seed", low=0, fix="any seed >= 0")
    check_range(cfg, "fdr", above=0, below=1, fix="a false discovery rate such as 0.05")
    run_dir = f"runs/{run_name(cfg['run'])}"
    # The activations stay in the file (artifacts.StoredMatrix), read a column chunk at a time.
    arrays, upstream = load_npz(f"{run_dir}/activations.npz", rerun_hint="01_collect.py", required=["labels"],
                                in_file=["activations"])
    activations, labels = arrays["activations"], arrays["labels"]
    auroc, tie_terms = auroc_columns(activations, labels, cfg["chunk_neurons"], with_ties=True)
    n_toxic, n_items = int(labels.sum()), len(labels)

    # Which rows are one prompt's continuations (same item id): those are not independent of each other.
    item_ids = arrays.get("item_ids", np.arange(n_items))  # an artifact without ids has one row per item
    prompts, groups = np.unique(item_ids, return_inverse=True)
    repeated = prompts.size < n_items
    null = ("permutation" if repeated else "closed") if cfg["null"] == "auto" else cfg["null"]
    if null == "closed" and repeated:
        fail(f"--null closed assumes independent rows, but {n_items} rows share {prompts.size} item ids (several "
             "continuations per prompt): use --null permutation (or auto)")
    shuffle_groups = groups if repeated else np.zeros(n_items, dtype=np.int64)
    if repeated:  # only prompts with both toxic and clean rows change under a within-prompt shuffle
        toxic_share = np.bincount(groups, weights=labels) / np.bincount(groups)
        print(f"{n_items} rows from {prompts.size} prompts, {((toxic_share > 0) & (toxic_share < 1)).sum()} of "
              "them with both toxic and clean rows")

    started = time.perf_counter()
    n_shuffles = cfg["null_draws"] if null == "closed" else max(cfg["permutations"], cfg["null_draws"])
    shuffled = shuffled_aurocs(activations, labels, shuffle_groups, n_shuffles, np.random.default_rng(cfg["seed"]),
                               cfg["chunk_neurons"])
    draws = shuffled[:cfg["null_draws"]]  # the chance column of the null table (for permutation: the null's own)
    real_and_draws = np.vstack([auroc, draws])
    if null == "closed":  # tie terms depend on the activations only, so the shuffles share them
        p_real_and_draws = mann_whitney_p(real_and_draws, tie_terms, n_toxic, n_items - n_toxic)
    else:
        p_real_and_draws = permutation_p(real_and_draws, shuffled[:cfg["permutations"]])
    p_value, q_value = p_real_and_draws[0], false_discovery_control(p_real_and_draws[0], method="bh")
    null_seconds = time.perf_counter() - started
    significant = q_value < cfg["fdr"]
    kind = "within-prompt" if repeated else "plain"
    how = "Mann-Whitney U, independent rows" if null == "closed" else f"{cfg['permutations']} {kind} shuffles"
    print(f"null: {null} ({how}); chance column: {cfg['null_draws']} {kind} shuffles; {null_seconds:.1f} s")

    # Per-layer summary: how strong and how many the candidate toxic experts are, and how many are significant.
    print(f"{n_items} items ({n_toxic} toxic); AUROC over {auroc.size} neurons")
    print(f"{'layer':>5} {'neurons':>8} {'max':>6} {'>0.6':>6} {'>0.7':>6} {'>0.8':>6} "
          f"{'q<' + format(cfg['fdr'], 'g'):>7}")
    sizes = neurons_per_layer(upstream["sites"])  # a mixture-of-experts layer: its routed and shared experts
    cuts = np.cumsum(sizes)[:-1]
    per_layer = np.split(auroc, cuts)
    for layer, (scores, chosen) in enumerate(zip(per_layer, np.split(significant, cuts))):
        print(f"{layer:>5} {scores.size:>8} {scores.max():>6.3f} {(scores > 0.6).sum():>6} "
              f"{(scores > 0.7).sum():>6} {(scores > 0.8).sum():>6} {chosen.sum():>7}")

    # Null table: the real labels next to label shuffles of the same kind as the null (mean over the draws).
    table = null_table(real_and_draws, p_real_and_draws, cfg["fdr"])
    print(f"| | real labels | permuted labels ({cfg['null_draws']} draws) |\n|---|---:|---:|")
    for name, *values in table:
        print(f"| {name} | " + " | ".join(f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}" for v in values) + " |")

    meta = dict({k: upstream[k] for k in ("model", "sites", "dtype", "data", "data_checksum")},
                stage="02_score", upstream={"activations.npz": upstream["fingerprint"]},
                upstream_settings=upstream["settings"], activations_dtype=str(activations.dtype), n_toxic=n_toxic,
                n_items=n_items, n_prompts=int(prompts.size),
                null=null, permutations=cfg["permutations"] if null == "permutation" else 0,
                null_draws=cfg["null_draws"], seed=cfg["seed"], fdr=cfg["fdr"], n_significant=int(significant.sum()),
                null_seconds=round(null_seconds, 2), null_table=table,
                published_damping=dict(zip(("real", "chance"), table[5][1:])),
                n_auroc_above_065=dict(zip(("real", "chance"), table[0][1:])),
                peak_rss_mb=peak_rss_mb())  # this process's peak memory: the scoring is behind us here
    saved = save_npz(f"{run_dir}/expertise.npz", dict(auroc=auroc, p_value=p_value, q_value=q_value), meta)

    # Plot: per layer, the real AUROCs (box) against the shuffled labels' (band and max); pooled histograms.
    fig, (ax_layers, ax_hist) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    layer_x = np.arange(len(per_layer))
    null_layers = np.split(draws, cuts, axis=1)  # layers x (draws x neurons)
    low, high = ([np.percentile(d, q, axis=1).mean() for d in null_layers] for q in (0.5, 99.5))
    ax_layers.fill_between(layer_x, low, high, color="0.85", label="permuted labels, 0.5-99.5%")
    ax_layers.plot(layer_x, [d.max(1).mean() for d in null_layers], "kx", label="permuted labels, max")
    ax_layers.boxplot(per_layer, positions=layer_x, whis=(0.5, 99.5), showfliers=False)
    ax_layers.plot(layer_x, [s.max() for s in per_layer], "r.", label="real labels, max")
    ax_layers.axhline(0.5, color="gray", lw=0.8)
    ax_layers.set(xlabel="decoder layer (as in 03_suppress.py --layers)", ylabel="AUROC (toxic vs non-toxic)",
                  title=f"{upstream['model']}: expertise per layer, real (box 0.5-99.5%) vs permuted labels")
    ax_layers.legend(fontsize=8)
    bins = np.linspace(min(auroc.min(), draws.min()), max(auroc.max(), draws.max()), 101)
    ax_hist.hist(auroc, bins=bins, histtype="step", color="C0", label="real labels")
    ax_hist.hist(draws.ravel(), bins=bins, weights=np.full(draws.size, 1 / len(draws)), histtype="step",
                 color="k", ls="--", label=f"permuted labels (mean of {len(draws)})")
    if significant.any():
        ax_hist.axvline(auroc[significant].min(), color="C3", lw=0.8,
                        label=f"{int(significant.sum())} significant (q < {cfg['fdr']:g})")
    ax_hist.axvline(0.5, color="gray", lw=0.8)
    ax_hist.set(xlabel="AUROC", ylabel="neurons", yscale="log", title=f"all neurons; null: {null}")
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{run_dir}/expertise.png", dpi=110)
    plt.close(fig)
    print(f"{int(significant.sum())} of {auroc.size} neurons significant at q < {cfg['fdr']:g} ({null} null); "
          f"wrote {run_dir}/expertise.npz and expertise.png (fingerprint {saved['fingerprint'][:12]})")
    print(f"peak memory (RSS): {meta['peak_rss_mb']:,.0f} MB")
