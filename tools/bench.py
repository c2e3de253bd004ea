"""Benchmark: how fast the SGM stages' hot paths are, as ratios measured in one run -> runs/bench.json

    python -m tools.bench                                        # what `make bench` runs (demo model, ~3 min, 2 cores)
    python -m tools.bench --model tiny --items 200 --repeats 2   # smoke run, seconds

Six measurements, each a ratio of two timings taken in this process (medians of interleaved repeats, so a
neighbour's CPU load disturbs both sides alike; torch runs on one thread by default, see `threads`).
Absolute seconds go to bench.json too, but the ratios are the result:
  scoring      02_score.auroc_columns on an items x neurons matrix (random, fixed seed, ties as in real
               activations) vs the per-neuron sklearn.metrics.roc_auc_score loop of the original code, timed
               on a column subset and extrapolated per neuron; and vs a plain np.sort of the same matrix.
  suppression  greedy generation with neurons.suppress_neurons hooks vs the same model without hooks, and
               with alpha folded into the weights (neurons.fold_alpha on a second copy) vs without; and with a
               transport map's hooks (03 --method act: every neuron, x * scale + shift in float32) vs without.
  collection   forward of the language-model body (no LM head, as 01_collect.py) with neurons.record_neurons
               hooks vs without; and the full model forward (with the LM head) vs the body.
  writer       one responses-mode calibration step (greedy continuation of `prompts` x `new_tokens`, then the
               recording pass) with 01_collect.py --writer toxic-odds (the recording pass runs the LM head and a
               backward pass for the attributions) vs without: the writer's cost, target <= 3x.
  nll          the teacher-forced NLL pass (04's fluency and selectivity) of models.token_nll, which runs the LM
               head a chunk of positions at a time, vs full logits (the code before it): peak memory above
               the start of the pass (RSS sampled every millisecond by a thread), seconds, max |difference|.
  memory       what each artifact needs for the demo, LLaVA-1.5-7B and a 70B-class model (computed), and the
               teacher-forced logits at batch 64 x 512 positions, full vs chunked.
"""
import copy
import json
import os
import platform
import threading
import time
from datetime import datetime, timezone
from importlib.util import module_from_spec, spec_from_file_location

import numpy as np
import torch
from sklearn.metrics import roc_auc_score  # the reference: the original code's per-neuron loop
from tqdm import tqdm

from common import (DEFAULT_DATA, REPO, append_tokens, check_range, encode, input_device, load_items, parse_overrides,
                    peak_rss_mb, select)
from sgm.artifacts import write_text
from sgm.judges import toxic_vocabulary
from sgm.models import NLL_CHUNK_BYTES, load_model, token_nll, writer_pass
from sgm.neurons import fold_alpha, neuron_sites, record_neurons, record_writes, suppress_neurons

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    model="demo",          # demo | tiny (smoke run) | any checkpoint load_model takes
    items=1000,            # scoring matrix rows (calibration items); also N in the memory table
    neurons=0,             # scoring matrix columns (0 = the model's neuron count: 36,864 on the demo)
    toxic_fraction=0.18,   # share of positive items (the demo's calibration had 62 of 341)
    sklearn_columns=500,   # columns the sklearn reference loop is timed on (then extrapolated per neuron)
    auroc_repeats=3,       # repeats of each scoring timing (median)
    data=str(DEFAULT_DATA),  # prompts for generation/collection (its calibration standard items)
    prompts=4,             # generation: prompts in one batch
    new_tokens=16,         # generation: new tokens per prompt (forced, so every variant does the same work)
    collect_items=8,       # collection: items in one forward batch
    nll_items=16,          # teacher-forced NLL: prompts in one batch ...
    nll_tokens=32,         # ... each followed by this many forced tokens (04's fluency/selectivity pass)
    nll_repeats=2,         # repeats of each NLL variant (median seconds, maximum peak memory)
    repeats=5,             # repeats of each generation / forward timing (median)
    damped_fraction=0.5,   # suppression: share of neurons damped ...
    alpha=0.7,             # ... by this factor (the rest keep alpha 1)
    chunk_neurons=4096,    # 02_score.py's chunk (memory table: its sort keys = items x chunk x 8 bytes)
    threads=1,             # torch threads; 0 = torch's default. 1 because a neighbour's CPU load makes
                           # multi-threaded timings collapse (OpenMP threads wait for each other: 10x here)
    seed=0,
    out="runs/bench.json",  # ignored by git, like every measured output
)
cfg = parse_overrides(defaults)
# Options first: a typo should cost nothing (no model loaded).
check_range(cfg, "items", low=2, fix="scoring rows; at least one toxic and one non-toxic item")
check_range(cfg, "neurons", low=0, fix="scoring columns, or 0 for the model's neuron count")
check_range(cfg, "toxic_fraction", low=0, high=1, fix="the share of toxic items, e.g. 0.18")
for key in ("sklearn_columns", "auroc_repeats", "prompts", "new_tokens", "collect_items", "nll_items", "nll_tokens",
            "nll_repeats", "repeats", "chunk_neurons"):
    check_range(cfg, key, low=1, fix=f"a count, e.g. {defaults[key]}")
check_range(cfg, "damped_fraction", low=0, high=1, fix="the share of neurons damped, e.g. 0.5")
check_range(cfg, "alpha", low=0, high=1, fix="the damping factor of those neurons, e.g. 0.7 (1 = untouched)")
check_range(cfg, "threads", low=0, fix="torch threads, or 0 for torch's default")
check_range(cfg, "seed", low=0, fix="any seed >= 0")
if cfg["threads"]:
    torch.set_num_threads(cfg["threads"])
rng = np.random.default_rng(cfg["seed"])
torch.manual_seed(cfg["seed"])
spec = spec_from_file_location("score", REPO / "02_score.py")  # a numbered script: import it by path
score = module_from_spec(spec)
spec.loader.exec_module(score)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


raw_times = {}  # every repeat's seconds, into bench.json


def interleaved(variants, repeats, desc, warm_up=True):
    """Median seconds of each variant; variants alternate inside every repeat (after one warm-up each)."""
    for fn in variants.values() if warm_up else []:
        fn()
    times = {name: [] for name in variants}
    for _ in tqdm(range(repeats), desc=desc, unit="repeat"):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    raw_times.update({f"{desc}_{name}": t for name, t in times.items()})
    return {name: float(np.median(t)) for name, t in times.items()}


# ---- model and prompts ----------------------------------------------------------------------------------------
model, processor, sites, model_meta = load_model(cfg["model"])
n_neurons = sum(module.in_features for _, module in sites)
n_params = sum(p.numel() for p in model.parameters())  # tied weights count once
items, _ = load_items(cfg["data"])  # realistic prompts: MM-TOXIC-QA's calibration items
items = select(items, split="calibration", condition="standard") or items
n_pick = max(cfg["prompts"], cfg["collect_items"])
pick = rng.choice(len(items), size=n_pick, replace=len(items) < n_pick)
device = input_device(model)
gen_batch = encode(processor, [items[i] for i in pick[:cfg["prompts"]]], device)
collect_batch = encode(processor, [items[i] for i in pick[:cfg["collect_items"]]], device)
print(f"model {cfg['model']}: {len(sites)} layers x {sites[0][1].in_features} neurons = {n_neurons:,}, "
      f"{n_params / 1e6:.0f}M parameters; torch threads {torch.get_num_threads()}")

# ---- scoring: ours vs sklearn per neuron vs a plain sort ----------------------------------------------------
# Realistic ties: pooled float32 activations rarely tie (demo: 0.14% of neurons have any tie), so 1% of the
# columns are rounded to one decimal (many ties) and 0.1% are constant; the rest are continuous.
n_items, n_cols = cfg["items"], cfg["neurons"] or n_neurons
labels = (rng.random(n_items) < cfg["toxic_fraction"]).astype(np.int8)
labels[:2] = [0, 1]  # both classes, also at tiny sizes
matrix = (rng.normal(size=(n_items, n_cols)) * rng.lognormal(size=n_cols) + rng.normal(size=n_cols)
          + 0.3 * labels[:, None] * rng.normal(size=n_cols)).astype(np.float32)
n_rounded, n_constant = max(1, n_cols // 100), max(1, n_cols // 1000)
matrix[:, :n_rounded] = np.round(matrix[:, :n_rounded], 1)
matrix[:, n_rounded:n_rounded + n_constant] = 0.0
print(f"scoring: {n_items:,} items x {n_cols:,} neurons, {int(labels.sum())} positive")

columns = np.linspace(0, n_cols - 1, min(cfg["sklearn_columns"], n_cols)).round().astype(int)
columns[0] = 0  # one rounded (tied) column is always among them
start = time.perf_counter()
reference = np.array([roc_auc_score(labels, matrix[:, j]) for j in tqdm(columns, desc="sklearn reference")])
sklearn_per_neuron = (time.perf_counter() - start) / len(columns)
ours = score.auroc_columns(matrix, labels, cfg["chunk_neurons"])
scoring = interleaved({"ours": lambda: score.auroc_columns(matrix, labels, cfg["chunk_neurons"]),
                       "sort": lambda: np.sort(matrix, axis=0)},
                      cfg["auroc_repeats"], "scoring", warm_up=False)  # warmed up by the two calls above
sklearn_total = sklearn_per_neuron * n_cols

# ---- suppression: generation with hooks, with folded weights, without ---------------------------------------
alpha = torch.ones(n_neurons)
alpha[torch.from_numpy(rng.permutation(n_neurons)[:int(cfg["damped_fraction"] * n_neurons)])] = cfg["alpha"]
baked = copy.deepcopy(model)
fold_alpha(neuron_sites(baked), alpha)
pad_id = processor.tokenizer.pad_token_id


def generate_greedy(m):
    with torch.no_grad():
        return m.generate(**gen_batch, max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
                          do_sample=False, pad_token_id=pad_id, top_p=None, top_k=None, temperature=None)


def generate_hooked():
    with suppress_neurons(sites, alpha):
        return generate_greedy(model)


# A transport map (03_suppress.py --method act) changes every neuron: every site gets the float32 affine hook.
act_scale = 1 + 0.01 * torch.from_numpy(rng.standard_normal(n_neurons)).float()
act_shift = 0.001 * torch.from_numpy(rng.standard_normal(n_neurons)).float()


def generate_transported():
    with suppress_neurons(sites, act_scale, act_shift):
        return generate_greedy(model)


with torch.no_grad():  # sanity: the hooks and the folded weights are the same model
    with suppress_neurons(sites, alpha):
        hooked_logits = model(**gen_batch).logits
    fold_max_abs_diff = float((hooked_logits - baked(**gen_batch).logits).abs().max())
generation = interleaved({"base": lambda: generate_greedy(model), "hooked": generate_hooked,
                          "baked": lambda: generate_greedy(baked), "transport": generate_transported},
                         cfg["repeats"], "generation")
del baked

# ---- collection: body forward with recording hooks, without, and the full model --------------------------------
body = model.base_model
collect_mask = collect_batch["attention_mask"].bool() & (collect_batch["input_ids"] != model.config.image_token_id)


def forward_recorded():
    with torch.no_grad(), record_neurons(sites) as recorder:
        recorder.mask = collect_mask
        body(**collect_batch, use_cache=False)
        return recorder.pop()


with torch.no_grad():
    collection = interleaved({"body": lambda: body(**collect_batch, use_cache=False), "recorded": forward_recorded,
                              "full": lambda: model(**collect_batch, use_cache=False)}, cfg["repeats"], "collection")

# ---- one responses-mode calibration step (01_collect.py): greedy continuation, then the recording pass; with
# --writer the recording pass also runs the LM head and a backward pass for the attributions (toxic-odds) ----------
toxic_ids = torch.tensor(toxic_vocabulary(processor.tokenizer, model.get_output_embeddings().weight.shape[0]) or [0])


def calibration_step(writer):
    sequences = generate_greedy(model)
    new_ids = sequences[:, gen_batch["input_ids"].shape[1]:]
    new_mask = torch.ones_like(new_ids, dtype=torch.bool)
    extended = append_tokens(processor, gen_batch, new_ids, new_mask)
    with record_neurons(sites) as recorder, record_writes(model, sites) as writes:
        recorder.mask = torch.cat([torch.zeros_like(gen_batch["attention_mask"], dtype=torch.bool), new_mask], 1)
        if not writer:
            with torch.no_grad():
                body(**extended, use_cache=False)
            return recorder.pop()
        predicts = torch.cat([new_mask, torch.zeros_like(new_mask[:, :1])], 1)  # as 01_collect.py
        with torch.enable_grad():
            written = writer_pass(model, extended, predicts, writes, "toxic-odds", toxic_ids,
                                   activations=recorder)[1]
        return recorder.pop(), written


calibration = interleaved({"plain": lambda: calibration_step(False), "writer": lambda: calibration_step(True)},
                          cfg["repeats"], "calibration step")

# ---- teacher-forced NLL: models.token_nll (chunked LM head) vs full logits, peak memory and time -----------------
def rss_bytes():
    with open("/proc/self/statm") as f:  # Linux: resident pages are the second field
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at the start of the block, sampled every millisecond by a thread
    (torch kernels release the GIL, so the sampler sees their buffers while they live)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = max(self.peak, rss_bytes()) - self.start


nll_prompts = encode(processor, [items[i] for i in rng.choice(len(items), size=cfg["nll_items"])], device)
vocab = model.config.get_text_config().vocab_size
forced = torch.from_numpy(rng.integers(3, vocab, size=(cfg["nll_items"], cfg["nll_tokens"])))
forced[forced == model.config.image_token_id] = 3  # an image token outside the image would not match its features
lengths = torch.from_numpy(rng.integers(cfg["nll_tokens"] // 2, cfg["nll_tokens"] + 1, size=cfg["nll_items"]))
nll_counted = torch.arange(cfg["nll_tokens"])[None, :] < lengths[:, None]  # right-padded continuations
forced[~nll_counted] = pad_id
nll_inputs = append_tokens(processor, nll_prompts, forced, nll_counted)


def nll_full_logits():
    """What 04 did before models.token_nll: full logits of the forced positions, a float copy, cross-entropy."""
    logits = model(**nll_inputs, logits_to_keep=cfg["nll_tokens"] + 1, use_cache=False).logits[:, :-1].float()
    targets = nll_inputs["input_ids"][:, -cfg["nll_tokens"]:]
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return ((losses.view_as(targets) * nll_counted).sum(1) / nll_counted.sum(1)).numpy()


nll_peak, nll_values = {}, {}


def peak_measured(name, fn):
    def run():
        with torch.no_grad(), PeakRSS() as peak:
            nll_values[name] = fn()
        nll_peak[name] = max(nll_peak.get(name, 0), peak.extra)
    return run


nll_time = interleaved({"full": peak_measured("full", nll_full_logits),
                        "chunked": peak_measured("chunked", lambda: token_nll(model, nll_inputs, nll_counted))},
                       cfg["nll_repeats"], "teacher-forced nll")

# ---- memory and disk per artifact (computed) -------------------------------------------------------------------
# (name, layers, neurons per layer, parameters, vocabulary). Nominal sizes: LLaVA-1.5-7B = Vicuna-7B 6.74B + CLIP
# ViT-L/336 0.30B + projector 0.02B, 32,000 words; 70B-class = Llama-3-70B-like, 70.6B (80 layers x 28,672
# neurons), 128,256 words.
models = [(cfg["model"] + " (loaded)", len(sites), sites[0][1].in_features, n_params, vocab),
          ("llava-1.5-7b", 32, 11008, 7.06e9, 32000), ("70b-class", 80, 28672, 70.6e9, 128256)]
# Teacher-forced logits at batch 64 x 512 forced positions: full logits, their float copy and their log-softmax
# (~3 x 4 bytes each) vs at most NLL_CHUNK_BYTES of them at a time (the chunk, its float copy in bf16, its
# log-softmax: <= 3 chunks), whatever the batch and length.
NLL_BATCH, NLL_POSITIONS = 64, 512
memory = []
for name, layers, width, params, words in models:
    neurons = layers * width
    memory.append(dict(model=name, neurons=neurons, items=n_items,
                       activations_npz_bytes=n_items * neurons * 4,
                       score_keys_bytes=n_items * min(cfg["chunk_neurons"], neurons) * 8,
                       suppression_pt_bytes=neurons * 4, weights_bf16_bytes=int(params * 2), vocabulary=words,
                       nll_full_logits_bytes=3 * 4 * NLL_BATCH * NLL_POSITIONS * words,
                       nll_chunked_logits_bytes=3 * min(NLL_CHUNK_BYTES, 4 * NLL_BATCH * NLL_POSITIONS * words)))

# ---- report ----------------------------------------------------------------------------------------------------
result = dict(
    auroc_speedup=sklearn_total / scoring["ours"],
    auroc_vs_sort=scoring["ours"] / scoring["sort"],
    auroc_max_abs_diff=float(np.abs(ours[columns] - reference).max()),
    suppress_overhead=generation["hooked"] / generation["base"],
    baked_overhead=generation["baked"] / generation["base"],
    transport_overhead=generation["transport"] / generation["base"],
    fold_max_abs_logit_diff=fold_max_abs_diff,
    collect_overhead=collection["recorded"] / collection["body"],
    lm_head_cost=collection["full"] / collection["body"],
    lm_head_saving=1 - collection["body"] / collection["full"],  # share of the full forward 01 does not run
    writer_cost=calibration["writer"] / calibration["plain"],
    # peak memory above the start of the pass (at least 1 MiB: below that it is the sampler's noise)
    nll_memory_ratio=max(nll_peak["full"], 2 ** 20) / max(nll_peak["chunked"], 2 ** 20),
    nll_time_ratio=nll_time["chunked"] / nll_time["full"],
    nll_max_abs_diff=float(np.abs(nll_values["full"] - nll_values["chunked"]).max()),
    nll_peak_bytes=dict(full=nll_peak["full"], chunked=nll_peak["chunked"]),
    seconds=dict(auroc_ours=scoring["ours"], auroc_sort=scoring["sort"],
                 sklearn_per_neuron=sklearn_per_neuron, sklearn_extrapolated=sklearn_total,
                 generate_base=generation["base"], generate_hooked=generation["hooked"],
                 generate_baked=generation["baked"], generate_transport=generation["transport"],
                 forward_body=collection["body"],
                 forward_recorded=collection["recorded"], forward_full=collection["full"],
                 calibration_plain=calibration["plain"], calibration_writer=calibration["writer"],
                 nll_full=nll_time["full"], nll_chunked=nll_time["chunked"]),
    repeat_seconds=raw_times,
    memory=memory,
    meta=dict(model=cfg["model"], neurons=n_neurons, parameters=n_params, machine=platform.machine(),
              processor=platform.processor() or platform.platform(), cpu_count=os.cpu_count(),
              torch_threads=torch.get_num_threads(), torch=torch.__version__, numpy=np.__version__,
              python=platform.python_version(), load_average=list(os.getloadavg()),
              date=datetime.now(timezone.utc).isoformat(timespec="seconds"), settings=cfg,
              peak_rss_mb=peak_rss_mb()),
)
write_text(cfg["out"], json.dumps(result, indent=2) + "\n")

rows = [  # (what, measured, target as text, met)
    ("AUROC: sklearn loop / ours", result["auroc_speedup"], ">= 20x", result["auroc_speedup"] >= 20),
    ("AUROC: ours / np.sort", result["auroc_vs_sort"], "<= 2x", result["auroc_vs_sort"] <= 2),
    ("AUROC: max |ours - sklearn|", result["auroc_max_abs_diff"], "<= 1e-6", result["auroc_max_abs_diff"] <= 1e-6),
    ("generate: hooks / base", result["suppress_overhead"], "<= 1.05x", result["suppress_overhead"] <= 1.05),
    ("generate: folded / base", result["baked_overhead"], "~1.00x", abs(result["baked_overhead"] - 1) <= 0.05),
    ("generate: act hooks / base", result["transport_overhead"], "<= 1.05x", result["transport_overhead"] <= 1.05),
    ("logits: max |hooks - folded|", result["fold_max_abs_logit_diff"], "float32 rounding", None),
    ("collect: recorded / body", result["collect_overhead"], "<= 1.10x", result["collect_overhead"] <= 1.10),
    ("collect: full model / body (LM head)", result["lm_head_cost"],
     f"skip saves {result['lm_head_saving']:.0%}", None),
    ("calibration step: --writer / plain", result["writer_cost"], "<= 3x", result["writer_cost"] <= 3),
    ("NLL peak memory: full logits / chunked", result["nll_memory_ratio"],
     f"chunked <= {4 * NLL_CHUNK_BYTES // 2**20} MB", nll_peak["chunked"] <= 4 * NLL_CHUNK_BYTES),
    ("NLL seconds: chunked / full logits", result["nll_time_ratio"], "<= 1.10x", result["nll_time_ratio"] <= 1.10),
    ("NLL: max |chunked - full logits|", result["nll_max_abs_diff"], "<= 1e-4", result["nll_max_abs_diff"] <= 1e-4),
]
print(f"\n{cfg['model']}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
      f"load average {os.getloadavg()[0]:.1f}; medians of {cfg['repeats']} (scoring {cfg['auroc_repeats']})")
print(f"{'measurement':<38} {'measured':>10}  {'target':<17} met")
for what, value, target, met in rows:
    shown = f"{value:.2e}" if "diff" in what or "|" in what else f"{value:.2f}x"
    print(f"{what:<38} {shown:>10}  {target:<17} {'' if met is None else ('yes' if met else 'NO')}")
seconds = result["seconds"]
print(f"seconds: ours {seconds['auroc_ours']:.2f}, np.sort {seconds['auroc_sort']:.2f}, sklearn {seconds['sklearn_per_neuron'] * 1e3:.2f} ms/neuron "
      f"(timed on {len(columns)} neurons) -> {sklearn_total:.1f} extrapolated to {n_cols:,}; "
      f"generate {seconds['generate_base']:.2f} ({cfg['prompts']} prompts x {cfg['new_tokens']} tokens); "
      f"body forward {seconds['forward_body']:.2f}, full {seconds['forward_full']:.2f} ({cfg['collect_items']} items)")
print(f"teacher-forced NLL, {cfg['nll_items']} prompts x {cfg['nll_tokens']} forced tokens, {vocab:,}-word vocabulary: "
      f"peak memory above the pass's start {nll_peak['full'] / 2**20:,.0f} MB with full logits, "
      f"{nll_peak['chunked'] / 2**20:,.0f} MB chunked (<= {NLL_CHUNK_BYTES / 2**20:.0f} MB of logits at once); "
      f"{seconds['nll_full']:.2f} s vs {seconds['nll_chunked']:.2f} s; this process peaked at "
      f"{result['meta']['peak_rss_mb']:,.0f} MB")

print(f"\nmemory/disk per artifact at N = {n_items:,} calibration items (computed; GB = 1e9 bytes)")
print(f"{'model':<22} {'neurons':>9} {'activations.npz':>16} {'02 sort keys':>15} {'suppression.pt':>15} "
      f"{'weights bf16':>13} {f'NLL logits {NLL_BATCH}x{NLL_POSITIONS} full / chunked':>34}")
for row in memory:
    print(f"{row['model']:<22} {row['neurons']:>9,} {row['activations_npz_bytes'] / 1e9:>14.3f}GB "
          f"{row['score_keys_bytes'] / 1e9:>13.3f}GB {row['suppression_pt_bytes'] / 1e6:>13.3f}MB "
          f"{row['weights_bf16_bytes'] / 1e9:>11.2f}GB {row['nll_full_logits_bytes'] / 1e9:>18.2f}GB / "
          f"{row['nll_chunked_logits_bytes'] / 1e9:.2f}GB")
print(f"wrote {cfg['out']}")
