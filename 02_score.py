"""Stage 2: pooled activations -> each neuron's toxicity expertise (AUROC) -> runs/<run>/expertise.npz

    python 02_score.py --run demo        # what `make score` runs

Expertise of neuron m = AUROC of its pooled activation at separating toxic (positive) from non-toxic items:
the probability that a random toxic item activates m more than a random non-toxic one, ties counting one
half. A constant neuron scores exactly 0.5. Computed for all neurons at once from ranks (Mann-Whitney U):
    AUROC = (sum of the toxic items' ranks - n_toxic (n_toxic + 1) / 2) / (n_toxic n_clean)
with average ranks for ties, computed in column chunks so memory stays bounded (see auroc_columns).
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import fail, load_npz, parse_overrides, save_npz  # noqa: E402

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    run="demo",           # reads runs/<run>/activations.npz, writes runs/<run>/expertise.npz
    chunk_neurons=4096,   # neurons sorted at once (memory ~ items x chunk x 8 bytes, twice)
)


def auroc_columns(activations, labels, chunk_neurons=4096):
    """AUROC of every column of `activations` (items x neurons, float32) for binary `labels` (1 = toxic).

    Same number as the rank formula in the module docstring, computed from one integer sort per neuron (the
    floor of any rank method; `make bench` compares it with a plain np.sort and with sklearn):
    - each activation becomes an int64 key = (an integer with the same order as the float32) * 2 + label bit,
      and the keys of each neuron are sorted: equal activations then put the non-toxic items first;
    - in sorted order, the positions of the toxic items summed, minus n_toxic (n_toxic - 1) / 2, count the
      (toxic, non-toxic) pairs where the non-toxic activation is <= the toxic one: ties counted fully;
    - neurons with a tie are sorted once more with the label bit flipped (ties then count zero), and the two
      counts averaged: ties count one half, exactly the Mann-Whitney U of average ranks."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        fail(f"AUROC needs both classes, got {n_pos} toxic and {n_neg} non-toxic items: rerun 01_collect.py "
             "with more or other calibration items")
    position = np.arange(labels.size, dtype=np.float64)
    offset = n_pos * (n_pos - 1) / 2
    out = np.empty(activations.shape[1], dtype=np.float64)

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
        tied = (values[:, 1:] == values[:, :-1]).any(1)
        if tied.any():
            keys = sorted_keys(order_key[:, tied], ~labels)
            pairs[tied] = (pairs[tied] + (1 - (keys & 1)).astype(np.float64) @ position - offset) / 2
        out[start:start + chunk_neurons] = pairs / (n_pos * n_neg)
    return out


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    run_dir = f"runs/{cfg['run']}"
    arrays, upstream = load_npz(f"{run_dir}/activations.npz", rerun_hint="01_collect.py")
    activations, labels = arrays["activations"], arrays["labels"]
    auroc = auroc_columns(activations, labels, cfg["chunk_neurons"])

    # Per-layer summary: how strong and how many the candidate toxic experts are.
    print(f"{len(labels)} items ({int(labels.sum())} toxic); AUROC over {auroc.size} neurons")
    print(f"{'layer':>5} {'neurons':>8} {'max':>6} {'>0.6':>6} {'>0.7':>6} {'>0.8':>6}")
    sizes = [size for _, size in upstream["sites"]]
    per_layer = np.split(auroc, np.cumsum(sizes)[:-1])
    for layer, scores in enumerate(per_layer):
        print(f"{layer:>5} {scores.size:>8} {scores.max():>6.3f} {(scores > 0.6).sum():>6} "
              f"{(scores > 0.7).sum():>6} {(scores > 0.8).sum():>6}")

    meta = dict({k: upstream[k] for k in ("model", "sites", "dtype", "data", "data_checksum")},
                stage="02_score", upstream={"activations.npz": upstream["fingerprint"]},
                upstream_settings=upstream["settings"], n_toxic=int(labels.sum()), n_items=int(len(labels)))
    saved = save_npz(f"{run_dir}/expertise.npz", dict(auroc=auroc), meta)

    # Plot: AUROC distribution per layer (a box per layer) and the pooled histogram.
    fig, (ax_layers, ax_hist) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax_layers.boxplot(per_layer, positions=range(len(per_layer)), whis=(0.5, 99.5), showfliers=False)
    ax_layers.plot(range(len(per_layer)), [s.max() for s in per_layer], "r.", label="max")
    ax_layers.axhline(0.5, color="gray", lw=0.8)
    ax_layers.set(xlabel="decoder layer (as in 03_suppress.py --layers)", ylabel="AUROC (toxic vs non-toxic)",
                  title=f"{upstream['model']}: neuron expertise per layer (box 0.5-99.5%)")
    ax_layers.legend()
    ax_hist.hist(auroc, bins=100, color="C0")
    ax_hist.axvline(0.5, color="gray", lw=0.8)
    ax_hist.set(xlabel="AUROC", ylabel="neurons", yscale="log", title="all neurons")
    fig.tight_layout()
    fig.savefig(f"{run_dir}/expertise.png", dpi=110)
    plt.close(fig)
    print(f"wrote {run_dir}/expertise.npz and expertise.png (fingerprint {saved['fingerprint'][:12]})")
