"""Do text and image share experts? Two calibrations of one model, compared neuron by neuron
-> runs/<image>/modalities-<text>.json, modalities-<text>.png

    python -m tools.modalities --text demo-typed --image demo-seen     # what `make modalities` runs, after:
    python 01_collect.py --model demo --run demo-typed --mode prompts --conditions standard
    python 01_collect.py --model demo --run demo-seen --mode prompts --conditions typographic --positions image
    python 02_score.py --run demo-typed && python 02_score.py --run demo-seen

SGM's claim is that neurons found on toxic input damp toxicity however it arrives; the paper calibrates on
typographic images (the harmful phrase rendered as text) and evaluates on both. Whether one calibration's experts
are the other's is a question about two artifacts of the same model: `--text` (e.g. MM-TOXIC-QA's `standard`
items, the phrase typed) and `--image` (its `typographic` items, the same phrases rendered; `--positions image`
pools the image's placeholders, where the phrase is). Any two runs of one model compare the same way (standard
vs jailbreak, prompts vs responses mode). Nothing here loads the model. What is measured, each beside its chance:
  agreement  Spearman's rho of the two runs' per-neuron AUROC over all neurons (and of the writer score d when
             both ran 01 --writer). Chance: rho with the image run's labels shuffled --draws times (within each
             prompt when its rows repeat one, as 02 shuffles), each shuffle's AUROC computed by
             scipy.stats.mannwhitneyu: what rho is when the image rows carry no toxicity at all.
  overlap    how many of the top-k experts of one run are among the other's (k in --top), and of the significant
             ones (02's q < --fdr); chance: k^2 / N expected, p from the hypergeometric tail (scipy.stats.hypergeom).
  carry      the text run's top-k experts' mean AUROC on the image rows, against the same neurons' mean under the
             image run's shuffled labels (not random neurons: experts co-fire, so their mean varies more than a random
             set's): do the neurons SGM would damp tell toxic from clean when the text is in the image?
  pairs      rows of the two runs made from the same source text (MM-TOXIC-QA ids: the id less its last `-` part,
             `rtp-insult-0042-standard` ~ `rtp-insult-0042-typographic`; the greedy row when a run sampled): per
             neuron, Pearson's r over the pairs between its pooled activation typed and rendered. For the text run's
             top-k experts and for all neurons, against the same with the pairs shuffled (--draws times) among
             pairs of the same label and task (`continue` / `answer`, read from the items 01 used, checksum
             checked; a typographic item's instruction, "Answer the question shown in the image.", goes with its
             task): what is shared by label or by task is in the chance too, so r above it is the phrase itself.
A model that cannot see scores chance on all four (docs/RESULTS.md, "Do text and image share experts?": the blind
demo, whose image positions differ between images by float rounding alone; it also shows why 01's batches matter
when a pathway carries nothing: rounding noise that follows the batches, which follow the ids, can rank neurons).
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import hypergeom, mannwhitneyu, spearmanr  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import check_range, fail, load_items, parse_overrides, run_name, source_id  # noqa: E402
from sgm.artifacts import load_npz, save_figure, write_text  # noqa: E402

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    text="demo-typed",    # runs/<text>/: the calibration whose experts SGM would damp (the phrase typed)
    image="demo-seen",    # runs/<image>/: the same model calibrated on the other modality (the phrase rendered)
    top="100,1000",       # k: the top-k experts of each run compared (by AUROC; by d for the writer score)
    fdr=0.05,             # q level of the significant experts (02's q-values)
    draws=100,            # label shuffles of the image run (chance of rho and carry), pair shuffles (of pairs);
                          # p >= 1 / (1 + draws)
    seed=0,               # of every shuffle
    chunk_neurons=8192,   # columns of activations.npz read at once (memory: rows x chunk x 8 bytes; the shuffles'
                          # AUROCs, draws x neurons x 4 bytes, are held whole: rho ranks them)
)
cfg = parse_overrides(defaults)
check_range(cfg, "draws", low=1)
check_range(cfg, "chunk_neurons", low=1)
check_range(cfg, "fdr", above=0, below=1)
try:
    tops = sorted({int(k) for k in cfg["top"].split(",")})
except ValueError:
    fail(f"--top {cfg['top']!r} is not a list of whole numbers; use e.g. --top 100,1000")
names = {role: run_name(cfg[role], option=f"--{role}") for role in ("text", "image")}
if names["text"] == names["image"]:
    fail(f"--text and --image are both runs/{names['text']}: compare two calibrations of one model")

# ---- the two runs: 02's scores and 01's activations, each checked against the other ------------------------
runs = {}
for role, name in names.items():
    folder = Path("runs") / name
    scores, meta = load_npz(folder / "expertise.npz", f"02_score.py --run {name}", required=("auroc", "q_value"))
    arrays, upstream = load_npz(folder / "activations.npz", f"01_collect.py --run {name}",
                                required=("activations", "labels", "item_ids"), in_file=("activations", "writes"))
    if meta["upstream"]["activations.npz"] != upstream["fingerprint"]:
        fail(f"runs/{name}/expertise.npz was scored from other activations: rerun 02_score.py --run {name}")
    runs[role] = dict(name=name, scores=scores, meta=meta, arrays=arrays, settings=upstream["settings"])
text, image = runs["text"], runs["image"]
for key in ("model", "sites"):
    if text["meta"][key] != image["meta"][key]:
        fail(f"runs/{text['name']} and runs/{image['name']} are calibrations of different models ({key} differs): "
             "compare two runs of one model")
n_neurons = text["scores"]["auroc"].size
if max(tops) > n_neurons:
    fail(f"--top {max(tops)} is more than the model's {n_neurons} neurons; use smaller k")
rng = np.random.default_rng(cfg["seed"])
auroc_text, auroc_image = text["scores"]["auroc"], image["scores"]["auroc"]
writers = "writer" in text["scores"] and "writer" in image["scores"]
print(f"text runs/{text['name']} ({text['arrays']['labels'].size} rows) vs image runs/{image['name']} "
      f"({image['arrays']['labels'].size} rows): {text['meta']['model']}, {n_neurons:,} neurons"
      + ("" if writers else "; writer scores: not in both runs (01_collect.py --writer), skipped"))


def top(score, k):
    return np.argsort(-score, kind="stable")[:k]


# ---- the chance of agreement and carry: the image run's labels shuffled --------------------------------------
labels = image["arrays"]["labels"].astype(bool)
n_pos, n_neg = int(labels.sum()), int((~labels).sum())
_, groups = np.unique(image["arrays"]["item_ids"], return_inverse=True)
# Rows of one prompt (01 --samples) are shuffled among themselves, as 02 does; one row a prompt: among all rows.
within = groups if groups.max() + 1 < groups.size else np.zeros_like(groups)
shuffles = []
for draw in range(cfg["draws"]):
    shuffled = np.empty_like(labels)  # the rows by group, given the labels of the same group's rows in random order
    shuffled[np.argsort(within, kind="stable")] = labels[np.lexsort((rng.random(within.size), within))]
    shuffles.append(shuffled)
# ---- pairs: the same source text typed and rendered (set up here: the chunk loop below reads each run once) ----


def greedy_rows(arrays):
    """stem -> row of the greedy (or only) row of each item; stems with several such rows are ambiguous."""
    ids = arrays["item_ids"].astype(str)
    greedy = arrays["sample_index"] == 0 if "sample_index" in arrays else np.ones(ids.size, dtype=bool)
    stems = np.array([source_id(i) for i in ids])
    kept, count = {}, {}
    for row in np.flatnonzero(greedy):
        count[stems[row]] = count.get(stems[row], 0) + 1
        kept[stems[row]] = row
    return {stem: row for stem, row in kept.items() if count[stem] == 1}, sum(c > 1 for c in count.values())


rows_text, ambiguous_text = greedy_rows(text["arrays"])
rows_image, ambiguous_image = greedy_rows(image["arrays"])
stems = sorted(set(rows_text) & set(rows_image))
pairs = dict(n_pairs=len(stems), ambiguous_stems=dict(text=ambiguous_text, image=ambiguous_image))
paired = len(stems) >= 3
if not paired:
    print(f"WARNING: {len(stems)} source texts are in both runs (by id less its last '-' part): the pairs "
          "section needs at least 3 and is left out")
else:
    pair_text = np.array([rows_text[s] for s in stems])
    pair_image = np.array([rows_image[s] for s in stems])
    items, checksum = load_items(image["meta"]["data"])
    if checksum != image["meta"]["data_checksum"]:
        fail(f"{image['meta']['data']} changed since runs/{image['name']} was collected: rerun 01_collect.py and "
             f"02_score.py --run {image['name']}")
    task = {item["id"]: item["task"] for item in items}
    image_ids = image["arrays"]["item_ids"].astype(str)
    strata = [f"{int(image['arrays']['labels'][row])}|{task[image_ids[row]]}" for row in pair_image]
    _, stratum = np.unique(strata, return_inverse=True)
    pairs["strata"] = int(stratum.max() + 1)
    orders = [np.arange(len(stems))]
    for draw in range(cfg["draws"]):  # each pair's rendered row swapped for another of its stratum's
        order = np.empty(len(stems), dtype=int)
        order[np.argsort(stratum, kind="stable")] = np.lexsort((rng.random(len(stems)), stratum))
        orders.append(order)
    r = np.empty((len(orders), n_neurons), dtype=np.float32)  # (1 + draws) x neurons, as the shuffles' AUROCs


def standardised(block):
    """Columns centred and scaled to unit length, so that a column product is Pearson's r."""
    block = block - block.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return block / np.sqrt((block ** 2).sum(0))  # a neuron constant over the pairs: NaN, left out below


# draws x neurons in float32 (1.9 GB at 100 draws of Qwen3-VL-30B-A3B's 4.7M neurons): rho needs whole vectors.
# An AUROC is a multiple of 1 / (n_pos n_neg); float32 keeps equal ones equal and distinct ones apart.
null_auroc = np.empty((cfg["draws"], n_neurons), dtype=np.float32)
null_writer = np.empty((cfg["draws"], n_neurons), dtype=np.float32) if writers else None
for start in tqdm(range(0, n_neurons, cfg["chunk_neurons"]), desc="shuffled labels and pairs"):
    # float32 as 02 reads it, then float64: scipy's U keeps its input's precision, and the order is the same
    block = np.asarray(image["arrays"]["activations"][:, start:start + cfg["chunk_neurons"]], dtype=np.float32)
    block = block.astype(np.float64)
    writes = (np.asarray(image["arrays"]["writes"][:, start:start + cfg["chunk_neurons"]], dtype=np.float64)
              if writers else None)
    # The real labels through the same path first: it must give 02's AUROC (an independent implementation).
    u = mannwhitneyu(block[labels], block[~labels], axis=0, method="asymptotic").statistic
    if np.abs(u / (n_pos * n_neg) - auroc_image[start:start + block.shape[1]]).max() > 1e-9:
        fail(f"runs/{image['name']}/expertise.npz's AUROC is not its activations' (scipy's Mann-Whitney U): rerun "
             f"02_score.py --run {image['name']}")
    for draw, shuffled in enumerate(shuffles):
        u = mannwhitneyu(block[shuffled], block[~shuffled], axis=0, method="asymptotic").statistic
        null_auroc[draw, start:start + block.shape[1]] = u / (n_pos * n_neg)
        if writers:  # d = mean write on toxic rows - on clean rows, as 02 scores it
            null_writer[draw, start:start + block.shape[1]] = writes[shuffled].mean(0) - writes[~shuffled].mean(0)
    if paired:  # per neuron r over the pairs, typed vs rendered, then with the pairs shuffled
        typed = standardised(np.asarray(text["arrays"]["activations"][:, start:start + cfg["chunk_neurons"]],
                                        dtype=np.float64)[pair_text])
        rendered = standardised(block[pair_image])
        for draw, order in enumerate(orders):
            r[draw, start:start + typed.shape[1]] = (typed * rendered[order]).sum(0)


def against(real, null):
    """A value beside its draws under the null: their mean, middle 95% and p = (1 + #{draw >= real}) / (1 + draws).
    Draws that are undefined (NaN: a score constant over all neurons) are left out and counted."""
    null = np.asarray(null, dtype=np.float64)
    defined = null[~np.isnan(null)]
    if np.isnan(real) or defined.size == 0:
        return dict(real=None if np.isnan(real) else float(real), chance_mean=None, chance_low=None,
                    chance_high=None, p=None, undefined_draws=int(null.size - defined.size))
    return dict(real=float(real), chance_mean=float(defined.mean()), chance_low=float(np.percentile(defined, 2.5)),
                chance_high=float(np.percentile(defined, 97.5)),
                p=float((1 + (defined >= real).sum()) / (1 + defined.size)),
                undefined_draws=int(null.size - defined.size))


def rho(a, b):
    """Spearman's rho; NaN (no warning) when either side is constant, as a shuffle of a blind run can make it."""
    return spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan


def agreement(a, b, null):
    return against(rho(a, b), [rho(a, row) for row in null])


result = dict(text=text["name"], image=image["name"], model=text["meta"]["model"], n_neurons=n_neurons,
              rows=dict(text=int(text["arrays"]["labels"].size), image=int(labels.size)),
              upstream={role: run["meta"]["fingerprint"] for role, run in runs.items()},
              settings={role: run["settings"] for role, run in runs.items()}, config=cfg)
result["agreement"] = dict(auroc=agreement(auroc_text, auroc_image, null_auroc))
if writers:
    result["agreement"]["writer"] = agreement(text["scores"]["writer"], image["scores"]["writer"], null_writer)


# ---- overlap: top-k and significant experts, against the hypergeometric chance -----------------------------
def overlap(a, b):
    """a, b: boolean masks over the neurons. Shared count, k_a k_b / N expected, P(shared >= observed)."""
    shared, k_a, k_b = int((a & b).sum()), int(a.sum()), int(b.sum())
    return dict(size_text=k_a, size_image=k_b, shared=shared, expected=k_a * k_b / n_neurons,
                p=float(hypergeom.sf(shared - 1, n_neurons, k_a, k_b)) if k_a and k_b else 1.0)


def mask(indices):
    out = np.zeros(n_neurons, dtype=bool)
    out[indices] = True
    return out


result["overlap"] = [dict(score="auroc", k=k, **overlap(mask(top(auroc_text, k)), mask(top(auroc_image, k))))
                     for k in tops]
if writers:
    result["overlap"] += [dict(score="writer", k=k, **overlap(mask(top(text["scores"]["writer"], k)),
                                                                 mask(top(image["scores"]["writer"], k))))
                          for k in tops]
result["significant"] = overlap(text["scores"]["q_value"] < cfg["fdr"], image["scores"]["q_value"] < cfg["fdr"])

# ---- carry: the text run's top-k experts on the image rows, the same neurons under shuffled image labels --------
# (not random sets of neurons: experts co-fire, so their mean varies more than a random set's would)
result["carry"] = []
for k in tops:
    chosen = top(auroc_text, k)
    null_means = null_auroc[:, chosen].astype(np.float64).mean(1)
    result["carry"].append(dict(k=k, **against(auroc_image[chosen].mean(), null_means),
                                significant_on_image=int((image["scores"]["q_value"][chosen] < cfg["fdr"]).sum())))

# ---- pairs: per neuron r over the pairs, for the text run's top-k experts and for all neurons --------------
if paired:
    defined = ~np.isnan(r[0])
    pairs["constant_neurons"] = int((~defined).sum())

    def summary(neurons):
        neurons = neurons[defined[neurons]]
        medians = np.array([np.median(row[neurons]) for row in r]) if neurons.size else np.full(len(r), np.nan)
        return dict(n=int(neurons.size), share_positive=float((r[0, neurons] > 0).mean()) if neurons.size else None,
                    **against(medians[0], medians[1:]))

    pairs["all"] = summary(np.arange(n_neurons))
    pairs["top"] = [dict(k=k, **summary(top(auroc_text, k))) for k in tops]
result["pairs"] = pairs

# ---- report: the table, the JSON, the plot ----------------------------------------------------------------


def row(name, value, digits=3, sign="+", note=""):
    """A table row: the real value, then its chance (mean [middle 95%]) and p."""
    if value["real"] is None:
        return f"| {name} | undefined | (a score constant over all neurons) |"
    if value["chance_mean"] is None:
        return f"| {name} | {value['real']:{sign}.{digits}f} | undefined (every draw constant) |"
    return (f"| {name} | {value['real']:{sign}.{digits}f} | {value['chance_mean']:{sign}.{digits}f} "
            f"[{value['chance_low']:{sign}.{digits}f}, {value['chance_high']:{sign}.{digits}f}]{note}, "
            f"p = {value['p']:.2g} |")


shuffles_note = f" ({cfg['draws']} image label shuffles)"
lines = ["| measure | real | chance |", "|---|---:|---:|",
         row("Spearman rho, per-neuron AUROC text vs image", result["agreement"]["auroc"], note=shuffles_note)]
if writers:
    lines.append(row("Spearman rho, writer score d text vs image", result["agreement"]["writer"]))
for o in result["overlap"]:
    lines.append(f"| top {o['k']} by {o['score']}: shared | {o['shared']} | {o['expected']:.1f} expected, "
                 f"p = {o['p']:.2g} (hypergeometric) |")
o = result["significant"]
lines.append(f"| significant (q < {cfg['fdr']:g}): {o['size_text']} text, {o['size_image']} image; shared | "
             f"{o['shared']} | {o['expected']:.1f} expected, p = {o['p']:.2g} (hypergeometric) |")
for c in result["carry"]:
    lines.append(row(f"text top {c['k']}: mean AUROC on image rows ({c['significant_on_image']} of them q < "
                     f"{cfg['fdr']:g} there)", c, digits=4, sign="", note=shuffles_note))
if "all" in pairs:
    for name, summary_row in [("all neurons", pairs["all"])] + [(f"text top {t['k']}", t) for t in pairs["top"]]:
        lines.append(row(f"{name}: median r, typed vs rendered, over {len(stems)} source texts", summary_row,
                         note=f" ({cfg['draws']} pair shuffles within {pairs['strata']} label x task strata)"))
table = "\n".join(lines)
print(table)
result["table"] = table
out = Path("runs") / image["name"] / f"modalities-{text['name']}"
write_text(out.with_suffix(".json"), json.dumps(result, indent=1, sort_keys=True) + "\n")

fig, (ax_scores, ax_pairs) = plt.subplots(1, 2, figsize=(12, 4.8))
ax_scores.hexbin(auroc_text, auroc_image, gridsize=60, bins="log", cmap="Greys", mincnt=1)
chosen = top(auroc_text, tops[0])
ax_scores.plot(auroc_text[chosen], auroc_image[chosen], "r.", ms=3, label=f"text top {tops[0]}")
ax_scores.axhline(0.5, color="gray", lw=0.8)
ax_scores.axvline(0.5, color="gray", lw=0.8)
ax_scores.set(xlabel=f"AUROC, {text['name']} (text)", ylabel=f"AUROC, {image['name']} (image)",
              title="Spearman rho = " + ("undefined" if result["agreement"]["auroc"]["real"] is None
                                         else f"{result['agreement']['auroc']['real']:+.3f}"))
ax_scores.legend(loc="upper left")
if "all" in pairs:
    bins = np.linspace(-1, 1, 41)
    shuffled_r, real_r = r[1:][:, chosen].ravel(), r[0, chosen]
    ax_pairs.hist(shuffled_r[~np.isnan(shuffled_r)], bins=bins, density=True, color="0.8", label="pairs shuffled")
    ax_pairs.hist(real_r[~np.isnan(real_r)], bins=bins, density=True, histtype="step", color="r", lw=1.5,
                  label=f"text top {tops[0]}, same source text")
    ax_pairs.set(xlabel="per-neuron r, typed vs rendered activation", ylabel="density",
                 title=f"{len(stems)} source texts in both runs")
    ax_pairs.legend(loc="upper left")
else:
    ax_pairs.set_axis_off()
    ax_pairs.text(0.5, 0.5, "no source text in both runs", ha="center")
fig.tight_layout()
save_figure(fig, out.with_suffix(".png"), dpi=110)
print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
