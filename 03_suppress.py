"""Stage 3: expertise (AUROC) -> one damping factor alpha per neuron -> runs/<run>/suppression.pt

    python 03_suppress.py --run demo                          # SGM/AurA soft damping (what `make suppress` runs)
    python 03_suppress.py --run demo --method det0 --top-k 500

Methods (alpha multiplies the neuron's input to down_proj; 1 = untouched, 0 = silenced):
  aura       SGM's default (AurA):  alpha = 1 - 2 (AUROC - 0.5) = 2 (1 - AUROC) if AUROC > 0.5, else 1.
             So 0 <= alpha <= 1: a neuron is damped in proportion to its expertise and never amplified.
  det0       zero the top-k neurons by AUROC (alpha = 0), others 1.
  damp       multiply the top-k neurons by --damp-factor, others 1.
  published  COMPATIBILITY ONLY: the published multimodal code's threshold 0.3 with the same formula, which
             AMPLIFIES neurons with AUROC in (0.3, 0.5) (alpha up to 1.4). Kept to reproduce their numbers.
Knobs: --strength s scales the damping, alpha_s = clip(1 - s (1 - alpha), 0, 1) (s = 1 is the method itself,
s = 0 is the unmodified model); --top-k k keeps only the k most expert neurons (0 = all, aura/published);
--layers a:b restricts to decoder layers a..b-1.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import fail, load_npz, parse_overrides, save_pt  # noqa: E402

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    run="demo",          # reads runs/<run>/expertise.npz, writes runs/<run>/suppression.pt
    method="aura",       # aura | det0 | damp | published
    strength=1.0,        # 1 = the method as published; 0 = no change; >1 damps harder (clipped at alpha 0)
    top_k=0,             # aura/published: only the k highest-AUROC neurons (0 = all); det0/damp: required
    damp_factor=0.5,     # damp: alpha of the top-k neurons
    layers="",           # "a:b" = decoder layers a..b-1 only (empty = all)
    out="suppression.pt",
)
METHODS = ("aura", "det0", "damp", "published")


def top_k_mask(auroc, k):
    """Boolean mask of exactly k neurons with the highest AUROC (ties broken by index, stable)."""
    if not 0 < k <= auroc.size:
        fail(f"--top-k must be between 1 and {auroc.size}, got {k}")
    mask = np.zeros(auroc.size, dtype=bool)
    mask[np.argsort(-auroc, kind="stable")[:k]] = True
    return mask


def alpha_from_auroc(auroc, method="aura", strength=1.0, top_k=0, damp_factor=0.5, eligible=None):
    """alpha per neuron (float64). `eligible` (bool mask) limits which neurons may be changed."""
    if method not in METHODS:
        fail(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    eligible = np.ones(auroc.size, dtype=bool) if eligible is None else eligible
    scores = np.where(eligible, auroc, -np.inf)  # ineligible neurons can never be in a top-k
    if method in ("det0", "damp"):
        if top_k <= 0:
            fail(f"--method {method} needs --top-k > 0 (how many neurons to change)")
        chosen = top_k_mask(scores, top_k)
        alpha = np.where(chosen, 0.0 if method == "det0" else damp_factor, 1.0)
    else:
        threshold = 0.5 if method == "aura" else 0.3
        alpha = np.where(auroc > threshold, 1.0 - 2.0 * (auroc - 0.5), 1.0)
        chosen = eligible & (top_k_mask(scores, top_k) if top_k > 0 else True)
        alpha = np.where(chosen, alpha, 1.0)
    alpha = 1.0 - strength * (1.0 - alpha)
    # Clip to [0, 1] — except the published variant, whose point is that it can amplify.
    return np.clip(alpha, 0.0, None if method == "published" else 1.0)


def layer_mask(layers, sizes):
    """Eligible-neuron mask for "a:b" (decoder layers a..b-1); empty = every layer."""
    if not layers:
        return np.ones(sum(sizes), dtype=bool)
    try:
        first, last = (int(x) if x else None for x in layers.split(":"))
    except ValueError:
        fail(f"--layers must look like 4:12 (layers 4..11), got {layers!r}")
    keep = np.zeros(len(sizes), dtype=bool)
    keep[slice(first, last)] = True
    if not keep.any():
        fail(f"--layers {layers} selects none of the {len(sizes)} decoder layers")
    return np.repeat(keep, sizes)


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    run_dir = f"runs/{cfg['run']}"
    arrays, upstream = load_npz(f"{run_dir}/expertise.npz", rerun_hint="02_score.py")
    auroc = arrays["auroc"]
    sizes = [size for _, size in upstream["sites"]]
    if cfg["method"] == "published":
        print("WARNING: --method published AMPLIFIES neurons with AUROC in (0.3, 0.5); compatibility only")
    alpha = alpha_from_auroc(auroc, cfg["method"], cfg["strength"], cfg["top_k"], cfg["damp_factor"],
                             layer_mask(cfg["layers"], sizes))

    changed = alpha != 1
    print(f"method {cfg['method']} strength {cfg['strength']}: {int(changed.sum())} of {alpha.size} neurons "
          f"changed, {int((alpha < 0.5).sum())} with alpha < 0.5, min alpha {alpha.min():.3f}, "
          f"total damping sum(1 - alpha) = {(1 - alpha).sum():.1f}")
    meta = dict({k: upstream[k] for k in ("model", "sites", "dtype", "data", "data_checksum")},
                stage="03_suppress", upstream={"expertise.npz": upstream["fingerprint"]},
                calibration=upstream["upstream_settings"],
                settings={k: cfg[k] for k in ("method", "strength", "top_k", "damp_factor", "layers")},
                n_changed=int(changed.sum()), n_alpha_below_half=int((alpha < 0.5).sum()))
    saved = save_pt(f"{run_dir}/{cfg['out']}", {"alpha": torch.tensor(alpha, dtype=torch.float32)}, meta)

    fig, (ax_hist, ax_layer) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax_hist.hist(alpha[changed], bins=50, color="C3")
    ax_hist.set(xlabel="alpha (changed neurons only)", ylabel="neurons",
                title=f"{cfg['method']} x{cfg['strength']}: {int(changed.sum())} neurons changed")
    per_layer = [(1 - a).sum() for a in np.split(alpha, np.cumsum(sizes)[:-1])]
    ax_layer.bar(range(len(sizes)), per_layer, color="C3")
    ax_layer.set(xlabel="decoder layer", ylabel="sum of (1 - alpha)", title="damping per layer")
    fig.tight_layout()
    fig.savefig(f"{run_dir}/{cfg['out'].rsplit('.', 1)[0]}.png", dpi=110)
    print(f"wrote {run_dir}/{cfg['out']} (fingerprint {saved['fingerprint'][:12]})")
