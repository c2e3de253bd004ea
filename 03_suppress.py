"""Stage 3: expertise (AUROC, or the writer score) -> a damping factor alpha (or a transport map) per neuron
-> runs/<run>/suppression.pt

    python 03_suppress.py --run demo                          # SGM/AurA soft damping (what `make suppress` runs)
    python 03_suppress.py --run demo --method det0 --top-k 500
    python 03_suppress.py --run demo --method act --out suppression-act.pt           # transport (Linear-AcT)
    python 03_suppress.py --run demo --method act-mean --strength 0.25 --stack suppression.pt --out sgm-act.pt

Methods (alpha multiplies the neuron's input to down_proj; 1 = untouched, 0 = silenced):
  aura       SGM's default (AurA):  alpha = 1 - 2 (AUROC - 0.5) = 2 (1 - AUROC) if AUROC > 0.5, else 1.
             So 0 <= alpha <= 1: a neuron is damped in proportion to its expertise and never amplified.
  det0       zero the top-k neurons by AUROC (alpha = 0), others 1.
  damp       multiply the top-k neurons by --damp-factor, others 1.
  published  COMPATIBILITY ONLY: the published multimodal code's threshold 0.3 with the same formula, which
             AMPLIFIES neurons with AUROC in (0.3, 0.5) (alpha up to 1.4). Kept to reproduce their numbers.
Transport at the same neurons (a peer of damping, not SGM; the same hook site, artifact and random control):
  act        Linear-AcT (Rodriguez et al. ICLR 2025, apple/ml-act): per neuron the affine map omega x + beta that
             carries its toxic calibration rows' distribution onto its clean rows' (1-D optimal transport from
             sorted samples: both sorted, coupled quantile by quantile, least squares over the pairs; see
             transport_maps), applied at every position as x + lambda (omega x + beta - x), lambda = --strength.
  act-mean   its mean-only form, omega = 1, beta = mean(clean) - mean(toxic): a per-neuron shift (the neuron-level
             face of mean-difference steering: CAA, ActAdd, ITI).
  Every neuron by default; --top-k k maps only the k most expert by --score (--layers, --select, --normalise
  narrow the set as for damping); the others keep omega = 1, beta = 0. suppression.pt then holds omega and
  beta beside alpha (all 1); damping methods write alpha alone, byte for byte as before transport existed.
  Stacked (sgm+act): --stack FILE takes alpha from a damping artifact (a file of this run's folder, or a path:
  the published SGM's suppression.pt, the writers' det0 file of another calibration run of the same model and
  data) and keeps it beside the map: each neuron is transported, then damped, alpha (x + lambda (omega x +
  beta - x)), so a silenced neuron stays silent and its shift goes with it.
  The rows are 01's, one per calibration item (or continuation), each neuron POOLED over the item's positions
  (mean by default): the same rows 02 scores, read from activations.npz (the one expertise.npz was scored from,
  checked). apple/ml-act also estimates from activations pooled per sentence (mean pooling in its toxicity
  setup), then applies the map to every token; a mean over T positions is narrower than the per-token values it
  averages, so omega is fitted on a narrower range than the map meets in generation, and beta on the pooled
  means, which per-token means equal only when every row has as many positions. Measured on the demo's
  default calibration (responses): every row pools exactly 32 continuation tokens (n_positions min = max = 32
  in activations.npz), so act-mean's beta IS the per-token estimate; act's omega is not (docs/RESULTS.md).
Knobs: --strength s scales the damping, alpha_s = clip(1 - s (1 - alpha), 0, 1) (s = 1 is the method itself,
s = 0 is the unmodified model); --top-k k keeps only the k most expert neurons (0 = all, aura/published);
--layers a:b restricts to decoder layers a..b-1; --normalise layer rescales expertise within each layer so that
the layer's most expert neuron counts as a perfect expert, AUROC' = 0.5 + 0.5 (AUROC - 0.5) / (max - 0.5) for
AUROC > 0.5 (aura then silences the top neuron of every layer and damps the rest in proportion; AUROC <= 0.5
is left as it is). It asks whether the weak experts of a small model are ranked right but scaled too timidly.
--select significant --fdr Q (ours, beyond the paper) lets only neurons whose expertise is significant, q_value < Q
(Benjamini-Hochberg over all neurons, from 02_score.py), be changed; every other neuron keeps alpha = 1. It
narrows the eligible neurons, so it composes with every method and knob above; --select all (the default) is
the published rule. Which one is better is decided on `dev`, never on `test`:

    python 03_suppress.py --run demo --select significant --fdr 0.05

Writers (--score writer, or 02_score.py --score writer for the default): the expertise is what a neuron writes,
d = its mean attribution to the writer objective on toxic minus clean calibration rows (nats), put on SGM's
[0, 1] scale relative to the strongest writer, e = d / max(d) (e <= 0: never damped), and used as AUROC
would be, AUROC-equivalent = 0.5 + e / 2. So aura's alpha = 1 - e: the strongest writer is silenced and each
other one damped in proportion to its share of that write; det0/damp take the top-k by d; --select
significant uses the writer's q-values; --normalise layer makes each layer's strongest writer the reference.
--method published (which amplifies) is refused for writers: it only reproduces the published AUROC code.
--score writer-t does the same with Welch's t of the writes instead of d (e = t / max t): t divides d by its
noise, so a neuron whose attribution is large on every row (one the model leans on everywhere, whose removal
costs fluency) ranks lower than one that writes consistently more on toxic rows only.

    python 03_suppress.py --run demo-writer --score writer --method det0 --top-k 32   # after 01 --writer

Baked checkpoint: --export DIR also loads the model (the one stages 1-2 ran on, or --model), folds alpha into
each language-model down_proj weight (column m times alpha_m, the same logits as the hooks) and saves it as
a normal transformers checkpoint plus SGM_EXPORT.md, the record of what was changed. Any server that loads
the original loads it with AutoModelForImageTextToText.from_pretrained, no hooks and no code from here:

    python 03_suppress.py --run demo --export exports/demo-sgm
    python 03_suppress.py --run demo --export exports/demo-random --random-control true   # the matched control

--random-control true bakes, instead of SGM's alpha, 04_evaluate.py's `random` control (the same alpha values
shuffled within each layer with --seed, which must equal 04's --seed, 0 by default), so that base, sgm and
random can all be served (04_evaluate.py --endpoint; docs/MODELS.md, "Past one GPU"). suppression.pt is SGM's alpha
either way.
A transport map bakes too: its scale 1 + lambda (omega - 1) folds into the columns as alpha does, and its shift
lambda beta needs a bias on down_proj (b = W @ shift: what the shifted neurons write). Families whose text config
has `mlp_bias` take it (Llama-based: LLaVA-1.5, LLaVA-NeXT on Vicuna/Llama, `tiny`); the others (Gemma 3, so
the demo; Qwen2/2.5/3-VL, Idefics3/SmolVLM, PaliGemma, InternVL3, mixture-of-experts) build down_proj without
a bias and their loader would drop one, so they are refused in one line: evaluate them in process (04).

    python 03_suppress.py --run llava15 --method act --export exports/llava15-act

A checkpoint without a chat template also gets sgm_chat_template.jinja, a template that renders a chat request
exactly as the in-process fallback prompt (image placeholder, then the text): serve it with
`vllm serve DIR --chat-template DIR/sgm_chat_template.jinja`; in-process loading ignores the file.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import check_range, fail, parse_overrides, run_name  # noqa: E402
from sgm.artifacts import (carried_over, check_writable, disk_fault, load_npz, load_pt, lock_folder,  # noqa: E402
                           save_figure, save_pt, write_text)
from sgm.endpoint import TEMPLATE_FILE, fallback_chat_template  # noqa: E402
from sgm.models import load_model, resolve_model_path  # noqa: E402
from sgm.neurons import (EXPERTISE_SCORES, FusedExperts, fold_alpha, matched_random_control,  # noqa: E402
                         neurons_per_layer, transport_scale_shift)

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    run="demo",          # reads runs/<run>/expertise.npz, writes runs/<run>/suppression.pt
    method="aura",       # aura | det0 | damp | published (damping, alpha) | act | act-mean (transport, see above)
    strength=1.0,        # 1 = the method as published; 0 = no change; >1 damps harder (clipped at alpha 0);
                         # act/act-mean: lambda of x + lambda (omega x + beta - x)
    top_k=0,             # aura/published/act: only the k most expert neurons (0 = all); det0/damp: required
    damp_factor=0.5,     # damp: alpha of the top-k neurons
    layers="",           # "a:b" = decoder layers a..b-1 only (empty = all)
    normalise="",        # "layer" = rescale AUROC within each layer (see above); empty = as measured
    select="all",        # all | significant: only neurons with q_value < fdr may change (see above)
    fdr=0.05,            # --select significant: the false discovery rate Q
    out="suppression.pt",
    export="",           # a folder: also save the model with alpha folded into its weights (see above)
    model="",            # --export: the model to bake (empty = the model recorded in expertise.npz)
    dtype="auto",        # --export: float32 | bfloat16 | float16 | auto (= as the checkpoint is saved)
    device="cpu",        # --export: cpu | cuda | auto; every weight must fit in memory (no disk offload)
    trust_remote_code=False,  # --export: run Python shipped with the checkpoint (only if you trust it)
    random_control=False,  # --export: bake 04_evaluate.py's matched random control instead of SGM's alpha
    seed=0,              # --random-control: the shuffle's seed (04_evaluate.py --seed, 0 by default)
    score="auto",        # auto (= 02_score.py --score, recorded in expertise.npz) | activation | writer | writer-t
    stack="",            # act/act-mean: a damping artifact whose alpha the map is stacked with (see above)
)
DAMPING = ("aura", "det0", "damp", "published")  # alpha only: suppression.pt holds alpha, as it always did
TRANSPORT = ("act", "act-mean")                   # a map per neuron: suppression.pt also holds omega and beta
METHODS = DAMPING + TRANSPORT
SELECTIONS = ("all", "significant")


def top_k_mask(auroc, k):
    """Boolean mask of exactly k neurons with the highest AUROC (ties broken by index, stable)."""
    if not 0 < k <= auroc.size:
        fail(f"--top-k must be between 1 and {auroc.size}, got {k}")
    mask = np.zeros(auroc.size, dtype=bool)
    mask[np.argsort(-auroc, kind="stable")[:k]] = True
    return mask


def alpha_from_auroc(auroc, method="aura", strength=1.0, top_k=0, damp_factor=0.5, eligible=None):
    """alpha per neuron (float64). `eligible` (bool mask) limits which neurons may be changed."""
    if method not in DAMPING:
        fail(f"unknown --method {method!r}; use one of {', '.join(DAMPING)}")
    eligible = np.ones(auroc.size, dtype=bool) if eligible is None else eligible
    scores = np.where(eligible, auroc, -np.inf)  # ineligible neurons can never be in a top-k
    if method in ("det0", "damp"):
        if top_k <= 0:
            fail(f"--method {method} needs --top-k > 0 (how many neurons to change)")
        chosen = top_k_mask(scores, top_k) & eligible  # fewer than k eligible: only those
        alpha = np.where(chosen, 0.0 if method == "det0" else damp_factor, 1.0)
    else:
        threshold = 0.5 if method == "aura" else 0.3
        alpha = np.where(auroc > threshold, 1.0 - 2.0 * (auroc - 0.5), 1.0)
        chosen = eligible & (top_k_mask(scores, top_k) if top_k > 0 else True)
        alpha = np.where(chosen, alpha, 1.0)
    alpha = 1.0 - strength * (1.0 - alpha)
    # Clip to [0, 1] — except the published variant, whose point is that it can amplify.
    return np.clip(alpha, 0.0, None if method == "published" else 1.0)


def quantile_coupling(n_toxic, n_clean):
    """The 1-D optimal transport plan between two empirical distributions of n_toxic and n_clean points, for
    sorted samples: (toxic rank, clean rank, weight) per cell. Toxic point i holds the quantile levels
    [i/n_toxic, (i+1)/n_toxic), clean point j [j/n_clean, (j+1)/n_clean); each cell is one interval between
    consecutive breakpoints of both grids, weighted by its width (the weights sum to 1). With equal counts it is
    the i-th smallest toxic value matched to the i-th smallest clean one, weight 1/n each."""
    # In units of 1 / (n_toxic n_clean), so every breakpoint is an integer.
    cuts = np.union1d(np.arange(n_toxic + 1) * n_clean, np.arange(n_clean + 1) * n_toxic)
    low, high = cuts[:-1], cuts[1:]
    return low // n_clean, low // n_toxic, (high - low) / (n_toxic * n_clean)


def transport_maps(activations, labels, mean_only=False, chunk_neurons=4096):
    """Per neuron, the affine map omega x + beta carrying its toxic rows' values onto its clean rows' (float64).
    Linear-AcT (Rodriguez et al. ICLR 2025): sort both samples, couple them quantile by quantile
    (quantile_coupling: the 1-D optimal transport plan), and fit clean ~ omega toxic + beta by least squares over
    the coupled pairs, weighted by the plan. So beta = mean(clean) - omega mean(toxic) and
    omega = cov_plan(toxic, clean) / var(toxic) >= 0 (a monotone coupling never anti-correlates). A neuron constant
    on the toxic rows has no slope to fit: omega = 1 there (the shift of the means). mean_only: omega = 1, beta =
    mean(clean) - mean(toxic) (mean-difference steering at each neuron). `activations` (rows x neurons, an array
    or artifacts.StoredMatrix) is read a column chunk at a time."""
    toxic = np.asarray(labels).astype(bool)
    if toxic.all() or not toxic.any():
        fail("transport needs both toxic and clean calibration rows; activations.npz has only one kind")
    n_neurons = activations.shape[1]
    rank_toxic, rank_clean, weight = quantile_coupling(int(toxic.sum()), int((~toxic).sum()))
    omega, beta = np.ones(n_neurons), np.zeros(n_neurons)
    for start in range(0, n_neurons, chunk_neurons):
        block = np.asarray(activations[:, start:start + chunk_neurons], dtype=np.float64)
        a, b = np.sort(block[toxic], axis=0)[rank_toxic], np.sort(block[~toxic], axis=0)[rank_clean]
        mean_a, mean_b = weight @ a, weight @ b
        if not mean_only:
            varies = a[-1] > a[0]  # sorted: constant exactly when the ends agree (a sum of equal values can round)
            variance = np.where(varies, weight @ (a - mean_a) ** 2, 1.0)
            omega[start:start + block.shape[1]] = np.where(varies, weight @ ((a - mean_a) * (b - mean_b)) / variance,
                                                           1.0)
        beta[start:start + block.shape[1]] = mean_b - omega[start:start + block.shape[1]] * mean_a
    return omega, beta


def normalise_per_layer(auroc, sizes):
    """AUROC' = 0.5 + 0.5 (AUROC - 0.5) / (layer max - 0.5) where AUROC > 0.5, per layer; else unchanged."""
    out = np.array(auroc, dtype=np.float64)
    for layer in np.split(out, np.cumsum(sizes)[:-1]):  # views into out
        top = layer.max()
        if top > 0.5:
            above = layer > 0.5
            layer[above] = 0.5 + 0.5 * (layer[above] - 0.5) / (top - 0.5)
    return out


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


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


def make_room_for_bias(model, sites, shift):
    """Before a transport map with a shift is baked: each down_proj Linear needs a bias (fold_alpha gives it
    W @ shift), and the saved checkpoint must load it back. That holds where the text config has `mlp_bias`
    (Llama-family text models: LLaVA-1.5, LLaVA-NeXT on Vicuna/Llama, `tiny`): it is set, and every MLP Linear the
    loader will then expect a bias on gets a zero one. Other families (Gemma 3 and so the demo, Qwen2/2.5/3-VL,
    Idefics3/SmolVLM, PaliGemma, InternVL3, mixture-of-experts) build their MLPs without a bias, so their loader
    would drop it silently: refused, in one line."""
    shifted = [name for (name, site), part in zip(sites, torch.split(shift, [s.in_features for _, s in sites]))
               if part.any()]
    if any(isinstance(site, FusedExperts) for name, site in sites if name in shifted):
        fail("cannot export a transport map with a shift into fused mixture-of-experts layers (no expert bias): "
             "evaluate it in process with 04_evaluate.py, or export --method act with a zero shift")
    text_config = model.config.get_text_config()
    if not hasattr(text_config, "mlp_bias"):
        fail(f"cannot export a transport map into {model.config.model_type}: its shift needs a bias on each "
             "down_proj, which this family's MLPs lack and its loader would drop (no mlp_bias in its text config; "
             "Llama-based families take it): evaluate it in process with 04_evaluate.py instead")
    text_config.mlp_bias = True
    with torch.device("meta"):
        expected = set(type(model)(model.config).state_dict())
    have = set(model.state_dict())
    for key in sorted(expected - have):
        module = model.get_submodule(key.removesuffix(".bias"))
        if not key.endswith(".bias") or not isinstance(module, torch.nn.Linear):
            fail(f"cannot export a transport map into {model.config.model_type}: with mlp_bias its checkpoint "
                 f"would also need {key}, which is not an MLP bias")
        module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                     device=module.weight.device), requires_grad=False)
    unheld = [name for name in shifted if f"{name}.bias" not in expected]
    if unheld:
        fail(f"cannot export a transport map into {model.config.model_type}: its loader builds {unheld[0]} "
             "without a bias even with mlp_bias: evaluate it in process with 04_evaluate.py instead")


def stacked_alpha(path, run_dir, upstream):
    """03 --stack: the alpha of a damping artifact (a file name in run_dir, or a path) made on the same model sites
    and data as this run's expertise.npz, as float64, and its record for suppression.pt's meta."""
    path = Path(run_dir) / path if Path(path).name == path else Path(path)
    tensors, meta = load_pt(path, rerun_hint="03_suppress.py")
    if "omega" in tensors:
        fail(f"--stack {path} is a transport map: stack on a damping artifact (aura, det0, damp), e.g. suppression.pt")
    if meta["sites"] != upstream["sites"] or meta["data_checksum"] != upstream["data_checksum"]:
        fail(f"--stack {path} was made on another model or data build than {run_dir}/expertise.npz: stack a "
             "damping of the same model and data")
    return tensors["alpha"].double().numpy(), dict(file=str(path), fingerprint=meta["fingerprint"],
                                                     score=meta.get("score"), settings=meta["settings"])


def export_checkpoint(out_dir, alpha, meta, cfg, transport=None):
    """Fold alpha into a fresh copy of the model and save it to out_dir (written beside it, then renamed).
    With cfg["random_control"], alpha is first shuffled into 04_evaluate.py's matched random control.
    transport (omega, beta): the map at the stage's strength, its scale folded as alpha is and its shift as a
    down_proj bias (make_room_for_bias says which families take one)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "SGM_EXPORT.md").exists():
        fail(f"{out_dir} exists and is not an SGM export: choose a new --export folder")
    name = cfg["model"] or meta["model"]
    # Before the model loads: room for a copy of its weights beside the earlier export (kept until the swap).
    source = Path(resolve_model_path(name))
    needed = sum(f.stat().st_size for f in source.iterdir() if f.name.endswith(WEIGHT_FILES)) if source.is_dir() else 0
    check_writable(out_dir.absolute().parent, needed or None, out_dir)
    model, processor, sites, model_meta = load_model(name, cfg["dtype"], cfg["device"], cfg["trust_remote_code"])
    if model_meta["sites"] != meta["sites"]:
        fail(f"model {name!r} has other neuron sites than the one alpha was made for ({meta['model']!r}): "
             "pass the calibrated model with --model, or rerun 01_collect.py for this one")
    if name != meta["model"]:
        print(f"note: alpha was made on {meta['model']!r}; exporting onto {name!r}, which has the same sites")
    if any(p.device.type == "meta" for p in model.parameters()):
        fail("some weights were offloaded to disk (--device auto without enough GPU and CPU memory): "
             "export on a machine that holds the whole model, e.g. --device cpu")
    if cfg["random_control"]:  # the same shuffle as 04_evaluate.py's `random` method with --seed
        shuffled = matched_random_control(alpha if transport is None else torch.stack([alpha, *transport], 1),
                                          [size for _, size in meta["sites"]], cfg["seed"])
        alpha, transport = (shuffled, None) if transport is None else (shuffled[:, 0], shuffled[:, 1:].unbind(1))
    shift = None
    if transport is not None:  # alpha (x + lambda (omega x + beta - x)) = scale x + shift (alpha: 1, or --stack's)
        alpha, shift = transport_scale_shift(*transport, meta["settings"]["strength"], alpha)
        if shift.any():
            make_room_for_bias(model, sites, shift)
    fold_alpha(sites, alpha, shift)

    tmp, old = (out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{part}") for part in ("tmp", "old"))
    try:
        model.save_pretrained(tmp)   # safetensors
        processor.save_pretrained(tmp)
        # Files of the source checkpoint the processor did not write (e.g. a video processor's config, which
        # cannot be built here without torchvision): copied unchanged, weights never.
        source = Path(resolve_model_path(name))
        if source.is_dir():
            for file in sorted(source.iterdir()):
                if file.is_file() and not (tmp / file.name).exists() and not file.name.endswith(WEIGHT_FILES):
                    shutil.copy2(file, tmp / file.name)
        if not getattr(processor, "chat_template", None):  # for a server, which always applies a chat template
            write_text(tmp / TEMPLATE_FILE, fallback_chat_template(processor))
        write_text(tmp / "SGM_EXPORT.md", export_note(name, alpha, meta, str(model.dtype).removeprefix("torch."),
                                                      cfg["seed"] if cfg["random_control"] else None,
                                                      (tmp / TEMPLATE_FILE).exists(), shift))
        if out_dir.exists():  # an earlier export: swap it out, so a reader never sees a half-written folder
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except Exception as e:  # a full disk, a read-only folder: one line (safetensors says only `os error 28`)
        disk_fault(e, tmp, needed or None)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out_dir}: {name} with " + (f"the matched random control (seed {cfg['seed']})"
                                               if cfg["random_control"] else "alpha") +
          f" folded into the down projections of {len(sites)} neuron sites "
          "(loads with AutoModelForImageTextToText.from_pretrained, no hooks)")


def export_note(name, alpha, meta, dtype, random_seed=None, chat_template_file=False, shift=None):
    changed = alpha != 1
    per_layer = torch.split(alpha, neurons_per_layer(meta["sites"]))  # a MoE layer's routed + shared experts
    layers = [i for i, a in enumerate(per_layer) if (a != 1).any()]
    control = [] if random_seed is None else [
        f"**This is the matched RANDOM CONTROL, not SGM** (04_evaluate.py's `random` method, seed {random_seed}): "
        "SGM's alpha values below, shuffled across neurons within each layer with torch.randperm seeded "
        f"{random_seed}, so every layer is damped as much as by SGM but on random neurons. An effect that also "
        "shows here is not due to the neurons SGM chose.", ""]
    template = [] if not chat_template_file else [
        f"The source has no chat template; `{TEMPLATE_FILE}` renders a chat request exactly as the in-process "
        "fallback prompt (image placeholder, then the text, no roles). Serve with "
        f"`vllm serve <this folder> --chat-template <this folder>/{TEMPLATE_FILE}`.", ""]
    return "\n".join([
        f"# SGM export of {name}" + (" (random control)" if control else ""), "", *control,
        "This checkpoint is the model above with SGM's neuron damping folded into its weights: column m of "
        "each language-model MLP `down_proj` weight (the input of neuron m) is multiplied by alpha_m (in a "
        "mixture-of-experts layer, each expert's down projection, per neuron of that expert). It "
        "gives the logits of the original model with the suppression hooks of this repository, and loads "
        "with `AutoModelForImageTextToText.from_pretrained` like the original, with no hooks. Nothing else "
        "(vision tower, attention, embeddings, tokenizer, processor) was changed.", "", *template, *([] if shift is None
        else [f"Transport (`{meta['settings']['method']}`, strength {meta['settings']['strength']}): alpha below is "
              "the map's scale 1 + lambda (omega - 1)"
              + (f", times the alpha of {meta['stacked_on']['file']} (stacked, as is the shift)"
                 if meta.get("stacked_on") else "")
              + ", and its shift lambda beta is baked as a bias on each "
              f"down_proj, W @ shift ({int((shift != 0).sum())} neurons shifted, mlp_bias set in the text config; "
              "biases that are all zero were added where the loader expects one).", ""]),
        f"- source model: `{name}` (alpha computed on `{meta['model']}`)",
        f"- method: `{meta['settings']['method']}`, settings {json.dumps(meta['settings'])}",
        f"- calibration: {json.dumps(meta['calibration'])}",
        f"- neurons changed: {int(changed.sum())} of {alpha.numel()} in {len(layers)} of {len(per_layer)} "
        f"decoder layers; min alpha {float(alpha.min()):.4f}, sum(1 - alpha) = {float((1 - alpha).sum()):.1f}",
        f"- alpha file fingerprint (sha256, `suppression.pt`): `{meta['fingerprint']}`",
        f"- expertise fingerprint: `{meta['upstream']['expertise.npz']}`; data checksum `{meta['data_checksum']}`",
        f"- weights dtype: {dtype}",
        f"- baked: {'the matched random control, seed ' + str(random_seed) if control else 'SGM alpha'}",
        f"- made by: `python {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`", ""])


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    # Options first: a typo should cost nothing (no artifact read, no model loaded).
    if cfg["method"] not in METHODS:
        fail(f"unknown --method {cfg['method']!r}; use one of {', '.join(METHODS)}")
    if cfg["normalise"] not in ("", "layer"):
        fail(f"unknown --normalise {cfg['normalise']!r}; use layer, or leave it empty")
    if cfg["select"] not in SELECTIONS:
        fail(f"unknown --select {cfg['select']!r}; use one of {', '.join(SELECTIONS)}")
    if not 0 < cfg["fdr"] < 1:
        fail(f"--fdr must be between 0 and 1 (e.g. 0.05), got {cfg['fdr']}")
    # A negative strength would turn every damping into amplification, which the clip then erases: no change.
    check_range(cfg, "strength", low=0, fix="0 leaves the model as it is, 1 is the method, 2 damps twice as hard")
    check_range(cfg, "top_k", low=0 if cfg["method"] in ("aura", "published", *TRANSPORT) else 1,
                fix="how many of the most expert neurons to change (aura/published/act: 0 = all; det0/damp: k >= 1)")
    # damp scales neurons down; above 1 it would amplify them
    check_range(cfg, "damp_factor", low=0, high=1, fix="the alpha of the top-k neurons, e.g. 0.5 (0 = det0)")
    check_range(cfg, "seed", low=0, fix="any seed >= 0 (the random control's; 04_evaluate.py --seed)")
    if cfg["score"] != "auto" and cfg["score"] not in EXPERTISE_SCORES:
        fail(f"unknown --score {cfg['score']!r}; use auto (02's choice) or one of {', '.join(EXPERTISE_SCORES)}")
    if cfg["stack"] and cfg["method"] not in TRANSPORT:
        fail(f"--stack stacks a transport map on a damping: use it with --method act or act-mean, not {cfg['method']}")
    if cfg["random_control"] and not cfg["export"]:
        fail("--random-control true bakes the random control into an export: add --export DIR")
    if Path(cfg["out"]).name != cfg["out"] or cfg["out"] in ("", ".", ".."):
        fail(f"--out {cfg['out']!r} must be a file name inside runs/<run>/, e.g. suppression-k500.pt")
    run_dir = f"runs/{run_name(cfg['run'])}"
    lock_folder(run_dir, "03_suppress.py")  # one writer per run, and per export folder (sgm/artifacts.py)
    if cfg["export"]:
        export_dir = Path(cfg["export"])
        lock_folder(export_dir.absolute().parent, "03_suppress.py", export_dir.with_name(f".{export_dir.name}.lock"),
                    f"export {export_dir}", "another --export folder", temps=f"{export_dir.name}.")
    arrays, upstream = load_npz(f"{run_dir}/expertise.npz", rerun_hint="02_score.py")
    auroc, q_value = arrays["auroc"], arrays.get("q_value")
    score = upstream.get("score", "activation") if cfg["score"] == "auto" else cfg["score"]
    if score != "activation" and EXPERTISE_SCORES[score] not in arrays:
        fail(f"{run_dir}/expertise.npz has no writer score: rerun 01_collect.py with --writer toxic-odds, then "
             "02_score.py (or use --score activation)")
    if score != "activation":  # a writer score on SGM's scale (see the docstring): AUROC-equivalent 0.5 + e / 2
        if cfg["method"] == "published":
            fail("--method published reproduces the published AUROC threshold (it amplifies); with the writer "
                 "score use aura, det0 or damp")
        writer, q_value = arrays[EXPERTISE_SCORES[score]], arrays["writer_q_value"]
        if writer.max() <= 0:
            print("WARNING: no neuron writes more on toxic than on clean rows (max d <= 0): alpha = 1 everywhere")
        auroc = 0.5 + 0.5 * np.clip(writer / writer.max(), -1, 1) if writer.max() > 0 else np.full(writer.size, 0.5)
    print(f"expertise: {score} score"
          + (f" ({upstream['writer']['objective']} objective)" if score != "activation" else ""))
    sizes = neurons_per_layer(upstream["sites"])  # per decoder layer: a MoE layer's routed and shared experts together
    if cfg["method"] == "published":
        print("WARNING: --method published AMPLIFIES neurons with AUROC in (0.3, 0.5); compatibility only")
    if cfg["normalise"] == "layer":
        auroc = normalise_per_layer(auroc, sizes)
    eligible = layer_mask(cfg["layers"], sizes)
    if cfg["select"] == "significant":
        if q_value is None:
            fail(f"{run_dir}/expertise.npz has no q_value (made before significance testing): rerun 02_score.py "
                 f"--run {cfg['run']}")
        eligible &= q_value < cfg["fdr"]
    n_eligible = int(eligible.sum())
    print(f"select {cfg['select']}" + (f" (q < {cfg['fdr']:g}, {upstream.get('null')} null)"
                                       if cfg["select"] == "significant" else "") +
          f": {n_eligible} of {eligible.size} neurons eligible")
    if n_eligible == 0:
        print("WARNING: no neuron is eligible, so alpha = 1 everywhere (the unmodified model)")
    elif cfg["method"] in ("det0", "damp") and n_eligible < cfg["top_k"]:
        print(f"note: only {n_eligible} eligible neurons, fewer than --top-k {cfg['top_k']}: all of them change")
    tensors, transport = {}, None
    if cfg["method"] in TRANSPORT:  # a map per neuron from 02's own rows; alpha stays 1 (see the docstring)
        if cfg["top_k"] > auroc.size:
            fail(f"--top-k must be between 0 and {auroc.size}, got {cfg['top_k']}")
        chosen = eligible & (top_k_mask(np.where(eligible, auroc, -np.inf), cfg["top_k"]) if cfg["top_k"] else True)
        rows, rows_meta = load_npz(f"{run_dir}/activations.npz", rerun_hint="01_collect.py", required=["labels"],
                                   in_file=["activations"])
        if rows_meta["fingerprint"] != upstream["upstream"]["activations.npz"]:
            fail(f"{run_dir}/activations.npz is not the one expertise.npz was scored from: rerun 02_score.py")
        omega, beta = transport_maps(rows["activations"], rows["labels"], cfg["method"] == "act-mean")
        omega, beta = np.where(chosen, omega, 1.0), np.where(chosen, beta, 0.0)
        alpha = np.ones(auroc.size)
        if cfg["stack"]:  # sgm+act: the damping's alpha, after the map (transport_scale_shift)
            alpha, stacked_on = stacked_alpha(cfg["stack"], run_dir, upstream)
        tensors = dict(omega=torch.tensor(omega, dtype=torch.float32), beta=torch.tensor(beta, dtype=torch.float32))
        transport = dict(n_toxic=int(rows["labels"].sum()), n_clean=int((rows["labels"] == 0).sum()),
                         rows=f"pooled ({rows_meta['settings'].get('pooling', 'mean')}) calibration rows",
                         n_mapped=int(chosen.sum()))
        changed = (omega != 1) | (beta != 0) | (alpha != 1)
        print(f"method {cfg['method']} strength {cfg['strength']}: {int(changed.sum())} of {alpha.size} neurons "
              + (f"changed ({int((alpha != 1).sum())} damped by {cfg['stack']}), " if cfg["stack"] else "")
              + f"mapped from {transport['n_toxic']} toxic onto {transport['n_clean']} clean rows; omega median "
              f"{np.median(omega[chosen]) if chosen.any() else 1:.3f}, mean |beta| "
              f"{np.abs(beta[chosen]).mean() if chosen.any() else 0:.4g}")
    else:
        alpha = alpha_from_auroc(auroc, cfg["method"], cfg["strength"], cfg["top_k"], cfg["damp_factor"], eligible)
        changed = alpha != 1
        print(f"method {cfg['method']} strength {cfg['strength']}: {int(changed.sum())} of {alpha.size} neurons "
              f"changed, {int((alpha < 0.5).sum())} with alpha < 0.5, min alpha {alpha.min():.3f}, "
              f"total damping sum(1 - alpha) = {(1 - alpha).sum():.1f}")
    meta = dict(carried_over(upstream),
                stage="03_suppress", upstream={"expertise.npz": upstream["fingerprint"]},
                calibration=upstream["upstream_settings"], score=score,
                settings={k: cfg[k] for k in ("method", "strength", "top_k", "damp_factor", "layers", "normalise",
                                              "select", "fdr")},
                n_eligible=n_eligible, n_changed=int(changed.sum()), n_alpha_below_half=int((alpha < 0.5).sum()))
    if transport:  # only then: an alpha-only artifact keeps exactly the meta it always had
        meta["upstream"]["activations.npz"] = upstream["upstream"]["activations.npz"]
        meta["transport"] = transport
        if cfg["stack"]:
            meta["stacked_on"] = stacked_on
    saved = save_pt(f"{run_dir}/{cfg['out']}", {"alpha": torch.tensor(alpha, dtype=torch.float32), **tensors}, meta)

    fig, (ax_hist, ax_layer) = plt.subplots(1, 2, figsize=(11, 3.8))
    shown, what = ((omega, "omega") if cfg["method"] == "act" else (beta, "beta")) if transport else (alpha, "alpha")
    ax_hist.hist(shown[changed], bins=50, color="C3")
    ax_hist.set(xlabel=f"{what} (changed neurons only)", ylabel="neurons",
                title=f"{cfg['method']} x{cfg['strength']}: {int(changed.sum())} neurons changed")
    per_layer = [np.abs(b).sum() if transport else (1 - b).sum()  # the shift lambda beta, or the damping 1 - alpha
                 for b in np.split(cfg["strength"] * beta if transport else alpha, np.cumsum(sizes)[:-1])]
    ax_layer.bar(range(len(sizes)), per_layer, color="C3")
    ax_layer.set(xlabel="decoder layer", ylabel="sum of |lambda beta|" if transport else "sum of (1 - alpha)",
                 title="shift per layer" if transport else "damping per layer")
    fig.tight_layout()
    save_figure(fig, f"{run_dir}/{cfg['out'].rsplit('.', 1)[0]}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {run_dir}/{cfg['out']} (fingerprint {saved['fingerprint'][:12]})")
    if cfg["export"]:
        export_checkpoint(cfg["export"], torch.tensor(alpha, dtype=torch.float32), saved, cfg,
                          (tensors["omega"], tensors["beta"]) if transport else None)
