"""Stage 2: pooled activations -> each neuron's toxicity expertise (AUROC) and its significance
-> runs/<run>/expertise.npz, expertise.png

    python 02_score.py --run demo                           # what `make score` runs (--null auto)
    python 02_score.py --run demo --null permutation --permutations 200 --seed 1
    python 02_score.py --run demo-writer --score writer --check-ablation 32   # after 01_collect.py --writer

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

Writers. When 01_collect.py ran with --writer, activations.npz also holds `writes`: per row and neuron, the
first-order estimate of how much the writer objective (e.g. the log-odds of a flagged word) falls when the neuron
is silenced on that row. The writer score of a neuron is
    d = mean write over toxic rows - mean write over clean rows        (nats of the objective)
with Welch's t behind its p-value: closed form (Welch's t-test, one-sided) for independent rows, the
within-prompt shuffles' t pooled over neurons when rows repeat a prompt (t has no scale, so pooling it over
neurons is as fair as pooling AUROCs; d is not). Stored beside the activation AUROC as `writer`, `writer_t`,
`writer_p_value`, `writer_q_value`; --score writer makes it the expertise 03 damps by. A magnitude, not a rank
statistic, on purpose: a writer's attribution is large where it fires and ~0 elsewhere, so a rank statistic
(AUROC of the writes) mostly repeats the activation AUROC, while d weighs each neuron by how much it moves the
output. readers-writers.png plots the two scores against each other (a planted expert circled).
--check-ablation N silences the N strongest writers one at a time on --check-rows calibration rows (the tokens
01 wrote, teacher-forced) and prints the correlation of the estimate with the measured change; the numbers go to
the meta (`ablation_check`). Strongest by the score 03 will damp: Welch t with --score writer-t, else d. It
loads the model (--device, --dtype).

Memory does not grow with items x neurons: the activations are read from activations.npz one column chunk at a
time (artifacts.StoredMatrix), never loaded whole (19 GB at 1,000 items of Qwen3-VL-30B-A3B's 4.7M neurons in float32),
and each chunk becomes float32 on its own. Float16 activations (01_collect.py --store-dtype float16) are scored
as stored. What stays in memory is per neuron: AUROC, p, q and the null table's few shuffles (8 bytes each). The
permutation null is never held as P x neurons values: its AUROCs are counted on U's grid as they are made
(2 n_toxic n_clean + 1 integers), and the writers' t, which has no grid, are streamed past the sorted real ones
(at_least_counts); both give exactly the p of pooling and sorting every null value.
"""
import hashlib
import json
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import false_discovery_control, norm, pearsonr, rankdata  # noqa: E402
from scipy.stats import t as student_t  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import check_range, fail, parse_overrides, peak_rss_mb, run_name  # noqa: E402
from sgm.artifacts import carried_over, load_npz, lock_folder, save_figure, save_npz  # noqa: E402
from sgm.neurons import EXPERTISE_SCORES, neurons_per_layer  # noqa: E402

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    run="demo",           # reads runs/<run>/activations.npz, writes runs/<run>/expertise.npz
    chunk_neurons=4096,   # neurons sorted at once (memory ~ items x chunk x 8 bytes, twice)
    null="auto",          # auto | closed | permutation: the chance distribution behind p (see above)
    permutations=100,     # permutation null: within-prompt label shuffles (pooled as counts, never P x neurons)
    null_draws=5,         # label shuffles for the chance column of the null table and the plot
    seed=0,               # of every label shuffle
    fdr=0.05,             # q level of the significance counts printed and stored (03 has its own --fdr)
    score="activation",   # activation | writer | writer-t: the expertise 03_suppress.py damps by (writer needs
                          # 01_collect.py --writer; both are stored when the writes are there)
    check_ablation=0,     # writer: silence the top N writers (by t with --score writer-t, else d) one at a time
                          # and measure the objective (0 = off)
    check_rows=32,        # ... on a seeded sample of this many calibration rows (half toxic where possible)
    device="cpu",         # --check-ablation: where the model runs (cpu | cuda | auto)
    dtype="float32",      # --check-ablation: the model's dtype (as 01_collect.py's)
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


def shuffled_labels(labels, groups, draws, rng):
    """draws x rows of 0/1: the labels shuffled among the rows of each group (groups: int per row; all zeros =
    a plain shuffle). Class sizes, and every group's count of toxic rows, stay as they are."""
    labels = np.asarray(labels).astype(bool)
    by_group = np.argsort(groups, kind="stable")
    permuted = np.zeros((draws, labels.size))
    for draw in range(draws):
        shuffled = np.lexsort((rng.random(groups.size), groups))  # rows by group, in random order within it
        permuted[draw, by_group] = labels[shuffled]
    return permuted


def shuffled_aurocs(activations, labels, permuted, chunk_neurons=4096, keep=None, pool=0):
    """The AUROCs of every label shuffle in `permuted` (draws x rows of 0/1, shuffled_labels), streamed a column
    chunk at a time. Returns (the first `keep` shuffles' AUROCs, keep x neurons, all when None; the pooled null of
    the first `pool` shuffles over all neurons as counts of 2U). U = AUROC n_pos n_neg is a multiple of 1/2 (ties
    count one half), so 2U is an integer in [0, 2 n_pos n_neg]: a histogram on that grid loses nothing, and is all
    permutation_p needs. Memory: one chunk's ranks and U (draws x chunk) plus the grid, never draws x neurons.
    A shuffle moves labels, not activations: each neuron's average ranks are computed once, and U of every
    shuffle is one matrix product, bit for bit what auroc_columns gives on the shuffled labels."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    keep = len(permuted) if keep is None else keep
    kept = np.empty((keep, activations.shape[1]))
    null_counts = np.zeros(2 * n_pos * n_neg + 1, dtype=np.int64)
    for start in range(0, activations.shape[1], chunk_neurons):
        ranks = rankdata(activations[:, start:start + chunk_neurons], axis=0)  # sums of 0.5s: exact in float64
        u = permuted @ ranks - n_pos * (n_pos + 1) / 2
        kept[:, start:start + chunk_neurons] = u[:keep] / (n_pos * n_neg)
        if pool:
            null_counts += np.bincount(np.rint(2 * u[:pool]).astype(np.int64).ravel(), minlength=null_counts.size)
    return kept, null_counts


def permutation_p(auroc, null_counts, n_pos, n_neg):
    """p_m = (1 + #{null >= AUROC_m}) / (1 + null size), the null AUROCs pooled over neurons and shuffles and
    given as counts of 2U (shuffled_aurocs). Exact: AUROC_m is U / (n_pos n_neg) too, so it sits on the grid."""
    at_least = np.cumsum(null_counts[::-1])[::-1]  # at_least[k] = #{null with 2U >= k}
    grid = np.asarray(auroc) * (2 * n_pos * n_neg)
    u2 = np.rint(grid).astype(np.int64)
    assert np.abs(grid - u2).max() < 1e-6, "an AUROC off the grid of U / (n_pos n_neg): not from auroc_columns"
    return (1 + at_least[u2]) / (1 + at_least[0])


def at_least_counts(values, null_chunks):
    """For each entry of `values` (any shape), how many values of a null streamed in pieces (`null_chunks`, an
    iterable of arrays) are >= it; and the null's size. Exact, holding the sorted `values` and one piece: each
    null value v is located among the sorted values once (v reaches the first k of them), and a histogram over
    k counts, per value, the null values that reach it. For a statistic with no grid (Welch's t)."""
    values = np.asarray(values)
    order = np.argsort(values, axis=None, kind="stable")
    ordered = values.ravel()[order]
    reached = np.zeros(ordered.size + 1, dtype=np.int64)  # reached[k]: null values that reach exactly k values
    size = 0
    for piece in null_chunks:
        # sorted first: searchsorted then walks `ordered` forwards (10x faster than random keys, measured), and
        # its answers come sorted, so counting them costs the piece, not the values' length
        k, times = np.unique(np.searchsorted(ordered, np.sort(piece, axis=None), side="right"), return_counts=True)
        reached[k] += times
        size += np.size(piece)
    del ordered
    np.cumsum(reached[::-1], out=reached[::-1])  # now reached[k] = null values that reach at least k values
    counts = np.empty(order.size, dtype=np.int64)
    counts[order] = reached[1:]  # the i-th smallest value (0-based) is reached by those reaching i + 1 values
    return counts.reshape(values.shape), size


def welch_chunks(writes, labels, permuted=None, chunk_neurons=4096):
    """Per column chunk of `writes` (rows x neurons: 01's per-row attributions; an array or a StoredMatrix):
    (start, d, t, df) with d and t for the real labels (row 0) and each shuffle in `permuted` (rows 1...): d = mean
    over toxic rows - mean over clean rows, Welch's t = d / sqrt(var_toxic / n_toxic + var_clean / n_clean), df
    its degrees of freedom (Welch-Satterthwaite, real labels). Sums over a class are one matrix product. A column
    constant within both classes has no variance: t = 0 there (no evidence either way)."""
    labels = np.asarray(labels).astype(np.float64)
    label_rows = labels[None] if permuted is None else np.vstack([labels, permuted])
    n1 = label_rows.sum(1, keepdims=True)
    n0 = labels.size - n1
    for start in range(0, writes.shape[1], chunk_neurons):
        x = np.asarray(writes[:, start:start + chunk_neurons], dtype=np.float64)
        x = x - x.mean(0)  # centred: the one-pass variances below lose nothing to a large common offset
        sum1, sq1 = label_rows @ x, label_rows @ (x * x)
        sum0, sq0 = x.sum(0) - sum1, (x * x).sum(0) - sq1
        mean1, mean0 = sum1 / n1, sum0 / n0
        var1 = np.maximum(sq1 - n1 * mean1 ** 2, 0) / (n1 - 1)
        var0 = np.maximum(sq0 - n0 * mean0 ** 2, 0) / (n0 - 1)
        se2 = var1 / n1 + var0 / n0
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(se2 > 0, (mean1 - mean0) / np.sqrt(se2), 0.0)
            welch = (var1[0] / n1[0]) ** 2 / (n1[0] - 1) + (var0[0] / n0[0]) ** 2 / (n0[0] - 1)
            df = np.where(se2[0] > 0, se2[0] ** 2 / welch, 1)
        yield start, mean1 - mean0, t, df


def write_contrast(writes, labels, permuted=None, chunk_neurons=4096, keep=None):
    """The writer score of every column (welch_chunks): d and t ((1 + keep) x neurons: row 0 the real labels,
    then the first `keep` shuffles in `permuted`, all when None) and the real labels' df (neurons)."""
    keep = (0 if permuted is None else len(permuted)) if keep is None else keep
    d, t = np.empty((1 + keep, writes.shape[1])), np.empty((1 + keep, writes.shape[1]))
    df = np.empty(writes.shape[1])
    for start, d_chunk, t_chunk, df_chunk in welch_chunks(writes, labels, permuted, chunk_neurons):
        columns = slice(start, start + d_chunk.shape[1])
        d[:, columns], t[:, columns], df[columns] = d_chunk[:1 + keep], t_chunk[:1 + keep], df_chunk
    return d, t, df


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


def planted_neuron(model_name):
    """The flat index of a planted toxic expert (tools/plant.py's PLANTED.json beside the checkpoint), or None.
    Read only to mark it in the plot, after scoring: no score depends on it. Builds nothing: a name that is not
    a folder or a model already in the cache has no record."""
    from pathlib import Path

    from common import UserError
    from sgm.models import CACHE_DIR, resolve_model_path
    if not (Path(model_name).is_dir() or (CACHE_DIR / f"{model_name}.current").exists()):
        return None
    try:
        record = Path(resolve_model_path(model_name)) / "PLANTED.json"
    except UserError:
        return None
    return int(json.loads(record.read_text())["flat_index"]) if record.exists() else None


def readers_writers_plot(path, auroc, writer, fdr, upstream):
    """What each neuron reads (activation AUROC) against what it writes (writer score d), one point per neuron;
    significant writers in red; a planted expert (the positive control) circled."""
    significant = writer["q_value"] < fdr
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(auroc[~significant], writer["score"][~significant], s=2, c="0.6", alpha=0.5, lw=0,
               label="all neurons")
    ax.scatter(auroc[significant], writer["score"][significant], s=6, c="C3",
               label=f"{int(significant.sum())} significant writers (q < {fdr:g})")
    planted = planted_neuron(upstream["model"])
    if planted is not None:
        ax.scatter(auroc[planted], writer["score"][planted], s=160, facecolors="none", edgecolors="k", lw=1.5,
                   label="the planted toxic expert")
    ax.axhline(0, color="gray", lw=0.8)
    ax.axvline(0.5, color="gray", lw=0.8)
    ax.set(xlabel="reads: activation AUROC, toxic vs clean rows",
           ylabel=f"writes: d, {upstream['writer']['objective']} (toxic - clean rows)",
           title=f"{upstream['model']}: readers vs writers")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def check_ablation(cfg, upstream, arrays, ranked_by, score, labels):
    """The first-order estimate against real ablation: the --check-ablation neurons with the largest `score`
    (the writer score d, or its Welch t: `ranked_by`) are silenced one at a time (alpha 0,
    neurons.suppress_neurons) on --check-rows calibration rows (a seeded sample, half toxic where there are
    enough), each row's objective measured teacher-forced on the tokens 01 wrote, minus the unsilenced objective.
    The estimate is recomputed in the same forward pass (neurons.WriteRecorder), so estimate and measurement see
    the same batch. Returns Pearson's r of the estimate (-write) and the measured change over the neurons (mean
    over rows) and over all (row, neuron) pairs, and how far the recomputed writes are from 01's stored ones."""
    import torch

    from common import append_tokens, encode, image_token_ids, load_items, prompt_positions
    from sgm.judges import toxic_vocabulary
    from sgm.models import load_model, writer_pass
    from sgm.neurons import record_writes, suppress_neurons, writer_objective
    info, settings = upstream["writer"], upstream["settings"]
    model, processor, sites, model_meta = load_model(upstream["model"], cfg["dtype"], cfg["device"])
    if model_meta["sites"] != upstream["sites"]:
        fail(f"model {upstream['model']!r} no longer has the neuron sites of activations.npz: rerun 01_collect.py")
    toxic_ids = toxic_vocabulary(processor.tokenizer, model.get_output_embeddings().weight.shape[0],
                                 settings["judge_threshold"], exclude=(image_ids := image_token_ids(model, processor)))
    if hashlib.sha256(json.dumps(toxic_ids).encode()).hexdigest() != info["toxic_vocabulary_sha256"]:
        fail("the judge's toxic vocabulary differs from the one 01_collect.py used (another judge or tokenizer "
             "version): rerun 01_collect.py --writer")
    toxic_ids = torch.tensor(toxic_ids, dtype=torch.long)
    items, checksum = load_items(upstream["data"])
    if checksum != upstream["data_checksum"]:
        fail(f"{upstream['data']} changed since 01_collect.py ran: rerun it")
    by_id = {item["id"]: item for item in items}
    rng = np.random.default_rng(cfg["seed"])
    toxic, clean = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_toxic = min(toxic.size, cfg["check_rows"] // 2)
    n_clean = min(clean.size, cfg["check_rows"] - n_toxic)
    rows = np.sort(np.concatenate([rng.choice(toxic, n_toxic, replace=False),
                                   rng.choice(clean, n_clean, replace=False)]))
    top = np.argsort(-score, kind="stable")[:cfg["check_ablation"]]
    estimate, measured, stored_gap = [], [], []
    n_neurons = sum(size for _, size in upstream["sites"])
    for start in range(0, rows.size, settings["batch_size"]):
        batch_rows = rows[start:start + settings["batch_size"]]
        batch = encode(processor, [by_id[str(i)] for i in arrays["item_ids"][batch_rows]], model.device)
        if settings["mode"] == "responses":
            ids = torch.as_tensor(arrays["continuation_ids"][batch_rows]).long()
            width = int((ids >= 0).sum(1).max())
            mask = ids[:, :width] >= 0
            ids = torch.where(mask, ids[:, :width], processor.tokenizer.pad_token_id)
            inputs = append_tokens(processor, batch, ids, mask)
            # as in 01: position j of the last width + 1 predicts continuation token j
            predicts = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
            targets = torch.cat([ids, torch.zeros_like(ids[:, :1])], 1)
        else:  # prompts mode: every pooled position of the prompt (01's --positions)
            inputs, targets = batch, None
            predicts = prompt_positions(batch, settings["positions"], image_ids, model.config.image_token_id)

        def objective():
            logits = model(**inputs, use_cache=False, logits_to_keep=predicts.shape[1]).logits
            return writer_objective(info["objective"], logits, predicts, toxic_ids, targets).numpy()
        with record_writes(model, sites) as writes, torch.enable_grad():
            written = writer_pass(model, inputs, predicts, writes, info["objective"], toxic_ids, targets)[1]
        stored_gap.append(np.abs(written - arrays["writes"].rows(batch_rows)).max())
        with torch.no_grad():
            base, changes = objective(), []  # measured the way the silenced ones are (full logits)
            for neuron in tqdm(top, desc=f"ablation check, rows {start}-{start + batch_rows.size}", file=sys.stdout):
                alpha = torch.ones(n_neurons)
                alpha[neuron] = 0
                with suppress_neurons(sites, alpha):
                    changes.append(objective() - base)
        estimate.append(-written[:, top].T)
        measured.append(np.stack(changes))
    estimate, measured = np.concatenate(estimate, 1), np.concatenate(measured, 1)  # neurons x rows
    r_neurons = float(pearsonr(estimate.mean(1), measured.mean(1))[0]) if top.size > 2 else float("nan")
    r_pairs = float(pearsonr(estimate.ravel(), measured.ravel())[0])
    print(f"ablation check, top {top.size} writers by {'Welch t' if ranked_by == 'writer-t' else 'd'} silenced one "
          f"at a time on {rows.size} rows ({n_toxic} toxic): "
          f"first-order estimate vs measured change of the objective, Pearson r = {r_neurons:+.3f} over neurons "
          f"(mean over rows), {r_pairs:+.3f} over (row, neuron) pairs; estimate {estimate.mean():+.4g} vs measured "
          f"{measured.mean():+.4g} nats on average; recomputed writes within {max(stored_gap):.2g} of 01's")
    return dict(ranked_by=ranked_by, neurons=[int(i) for i in top], rows=[int(i) for i in rows],
                r_neurons=r_neurons, r_pairs=r_pairs, estimate=estimate.mean(1).tolist(),
                measured=measured.mean(1).tolist(), max_difference_from_stored_writes=float(max(stored_gap)))


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    if cfg["null"] not in ("auto", "closed", "permutation"):
        fail(f"unknown --null {cfg['null']!r}; use auto, closed or permutation")
    check_range(cfg, "chunk_neurons", low=1, fix="neurons sorted at once, e.g. 4096 (lower it if memory runs out)")
    check_range(cfg, "permutations", low=1, fix="within-prompt label shuffles for the permutation null, e.g. 100")
    check_range(cfg, "null_draws", low=1, fix="label shuffles for the null table, e.g. 5")
    check_range(cfg, "seed", low=0, fix="any seed >= 0")
    check_range(cfg, "fdr", above=0, below=1, fix="a false discovery rate such as 0.05")
    if cfg["score"] not in EXPERTISE_SCORES:
        fail(f"unknown --score {cfg['score']!r}; use one of {', '.join(EXPERTISE_SCORES)} (activation: AUROC of "
             "what a neuron reads)")
    check_range(cfg, "check_ablation", low=0, fix="how many top writers to silence one at a time (0 = no check)")
    check_range(cfg, "check_rows", low=2, fix="calibration rows for the ablation check, e.g. 32")
    run_dir = f"runs/{run_name(cfg['run'])}"
    lock_folder(run_dir, "02_score.py")  # one writer per run, checked writable before the scoring (sgm/artifacts.py)
    # The activations stay in the file (artifacts.StoredMatrix), read a column chunk at a time.
    arrays, upstream = load_npz(f"{run_dir}/activations.npz", rerun_hint="01_collect.py", required=["labels"],
                                in_file=["activations", "writes"])
    if (cfg["score"] != "activation" or cfg["check_ablation"]) and "writes" not in arrays:
        fail(f"{run_dir}/activations.npz has no writer measurement: rerun 01_collect.py with --writer toxic-odds "
             "(or use --score activation)")
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
    permuted = shuffled_labels(labels, shuffle_groups, n_shuffles, np.random.default_rng(cfg["seed"]))
    pool = cfg["permutations"] if null == "permutation" else 0  # the permutation null: the first P shuffles
    # draws: the chance column of the null table (for permutation: the null's own first shuffles). The pooled
    # null is kept as counts on U's grid, so memory never holds shuffles x neurons.
    draws, null_counts = shuffled_aurocs(activations, labels, permuted, cfg["chunk_neurons"],
                                         keep=cfg["null_draws"], pool=pool)
    real_and_draws = np.vstack([auroc, draws])
    draws = real_and_draws[1:]  # (one copy of the draws in memory, not two)
    if null == "closed":  # tie terms depend on the activations only, so the shuffles share them
        p_real_and_draws = mann_whitney_p(real_and_draws, tie_terms, n_toxic, n_items - n_toxic)
    else:
        p_real_and_draws = permutation_p(real_and_draws, null_counts, n_toxic, n_items - n_toxic)
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

    # The writer score (01_collect.py --writer): what each neuron WRITES, d = its mean attribution on toxic rows
    # minus clean rows (nats of the objective), Welch's t behind p. Same null kind as above: Welch's closed form
    # for independent rows, else the within-prompt shuffles' t pooled over neurons (t, unlike d, has no scale).
    writer = {}
    if "writes" in arrays:
        started = time.perf_counter()
        d_real_and_draws, t_real_and_draws, df = write_contrast(arrays["writes"], labels, permuted,
                                                                cfg["chunk_neurons"], keep=cfg["null_draws"])
        d, t = d_real_and_draws[0], t_real_and_draws[0]
        if null == "closed":
            p_writer = student_t.sf(t_real_and_draws, df)
        else:  # t has no grid: a second pass streams the shuffles' t past the sorted real and drawn ones
            reached, size = at_least_counts(t_real_and_draws, (
                t_chunk[1:1 + pool] for _, _, t_chunk, _ in welch_chunks(arrays["writes"], labels, permuted,
                                                                         cfg["chunk_neurons"])))
            p_writer = (1 + reached) / (1 + size)
        q_writer = false_discovery_control(p_writer, method="bh", axis=1)
        rows = {f"significant writers at q < {cfg['fdr']:g}": (q_writer < cfg["fdr"]).sum(1),
                "largest writer score d": d_real_and_draws.max(1), "largest Welch t": t_real_and_draws.max(1),
                "sum of positive d": np.maximum(d_real_and_draws, 0).sum(1)}
        writer = dict(score=d, t=t, p_value=p_writer[0], q_value=q_writer[0],
                      table=[[name, float(v[0]), float(v[1:].mean())] for name, v in rows.items()],
                      seconds=round(time.perf_counter() - started, 2))
        top = np.argsort(-d, kind="stable")[:5]
        print(f"writer ({upstream['writer']['objective']} objective): d = mean write on toxic rows - on clean rows; "
              f"{int((writer['q_value'] < cfg['fdr']).sum())} significant at q < {cfg['fdr']:g}; top d "
              + ", ".join(f"{d[i]:.3g}" for i in top) + f"; {writer['seconds']:.1f} s")
        print(f"| writer | real labels | permuted labels ({cfg['null_draws']} draws) |\n|---|---:|---:|")
        for name, *values in writer["table"]:
            print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
        print(f"correlation of activation AUROC and writer score over all neurons: r = "
              f"{np.corrcoef(auroc, d)[0, 1]:+.3f}")

    meta = dict(carried_over(upstream),
                stage="02_score", upstream={"activations.npz": upstream["fingerprint"]},
                upstream_settings=upstream["settings"], activations_dtype=str(activations.dtype), n_toxic=n_toxic,
                n_items=n_items, n_prompts=int(prompts.size),
                null=null, permutations=cfg["permutations"] if null == "permutation" else 0,
                null_draws=cfg["null_draws"], seed=cfg["seed"], fdr=cfg["fdr"], n_significant=int(significant.sum()),
                null_seconds=round(null_seconds, 2), null_table=table,
                published_damping=dict(zip(("real", "chance"), table[5][1:])),
                n_auroc_above_065=dict(zip(("real", "chance"), table[0][1:])),
                score=cfg["score"], writer=upstream.get("writer"),
                writer_null_table=writer.get("table"), writer_seconds=writer.get("seconds"),
                n_significant_writers=int((writer["q_value"] < cfg["fdr"]).sum()) if writer else None,
                peak_rss_mb=peak_rss_mb())  # this process's peak memory: the scoring is behind us here
    scores = dict(auroc=auroc, p_value=p_value, q_value=q_value)
    if writer:
        scores.update(writer=writer["score"], writer_t=writer["t"], writer_p_value=writer["p_value"],
                      writer_q_value=writer["q_value"])
    if writer and cfg["check_ablation"]:
        # the neurons 03 would silence: by the writer score it damps by (d with --score activation)
        ranked_by = "writer" if cfg["score"] == "activation" else cfg["score"]
        meta["ablation_check"] = check_ablation(cfg, upstream, arrays, ranked_by,
                                                scores[EXPERTISE_SCORES[ranked_by]], labels)
    saved = save_npz(f"{run_dir}/expertise.npz", scores, meta)

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
    save_figure(fig, f"{run_dir}/expertise.png", dpi=110)
    plt.close(fig)
    print(f"{int(significant.sum())} of {auroc.size} neurons significant at q < {cfg['fdr']:g} ({null} null); "
          f"wrote {run_dir}/expertise.npz and expertise.png (fingerprint {saved['fingerprint'][:12]})")
    if writer:
        readers_writers_plot(f"{run_dir}/readers-writers.png", auroc, writer, cfg["fdr"], upstream)
        print(f"wrote {run_dir}/readers-writers.png")
    print(f"peak memory (RSS): {meta['peak_rss_mb']:,.0f} MB")
