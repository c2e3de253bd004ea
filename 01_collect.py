"""Stage 1: calibration items -> one pooled activation per neuron per row -> runs/<run>/activations.npz

    python 01_collect.py --model demo --run demo                   # what `make collect` runs
    python 01_collect.py --model demo --run demo-k4 --samples 4    # + 4 sampled continuations per prompt
    python 01_collect.py --model tiny --run tiny --mode prompts    # seconds, random model
    python 01_collect.py --model demo --run demo-writer --writer toxic-odds   # + what each neuron writes

A neuron is one coordinate of the input of an MLP `down_proj` in the language model (see neurons.neuron_sites).
In a mixture-of-experts layer (Qwen3-VL-MoE, GLM-4.5V) a neuron is (layer, expert, index): the input of that
expert's down projection, 0 on tokens the router did not send to the expert, pooled over the same positions as
a dense neuron, so how often an expert is chosen is part of its signal; a shared expert is an ordinary MLP.
The alternatives (pool only over routed tokens; score the router's choice instead) and the reasons: docs/MODELS.md
and neurons.FusedExperts.
Two calibration modes decide what "toxic" means to the later stages:

  responses  (default; the SGM authors' way) the model continues every calibration prompt (greedy); the
             judge labels each continuation toxic or clean; neurons are pooled over the continuation tokens
             only. The contrast is the model's own toxic vs clean output from the same kind of prompt, so
             style cannot separate the classes. `--samples K` adds K sampled continuations per prompt
             (top-k, seeded by --seed), each judged and pooled on its own. With the greedy one alone a prompt
             is either toxic or clean, so the contrast is between prompts and still carries whatever else
             they differ in; with K samples many prompts give both a toxic and a clean continuation, and the
             contrast is within the same prompt. Rows of one prompt are not independent: 02_score.py sees
             the repeated item_ids and uses a within-prompt permutation null.
             `--positions prompt` pools the same rows over the prompt's text tokens instead: the neurons
             that predict, before a word is written, whether the model's continuation will be toxic — rather
             than the neurons that respond to toxic words once they are in the text (which a planted toxic
             generation expert showed to dominate the continuation contrast; docs/RESULTS.md, positive control).
  prompts    (AurA's way) the items' own labels; neurons are pooled over the prompt's text tokens
             (`--positions text`: never the image's placeholders nor the markers and tile tags around them,
             such as Qwen's <|vision_start|> or Gemma 3's <start_of_image>; common.prompt_positions), over
             everything but padding (`all`), or over the image placeholders (`image`).

A row of the artifact is one item (prompts) or one continuation (responses): `item_ids` names its prompt (so
an id repeats K+1 times with --samples K) and `sample_index` which continuation it is (0 = greedy, 1..K =
sampled). Padding is never pooled; a row with nothing to pool (an immediate end-of-sequence) is dropped, loudly.
Pooling is the mean over positions (`--pooling max` for the maximum).

Readers and writers. A pooled activation says what a neuron RESPONDS to. In responses mode the label and the
activation come from the same continuation tokens, so neurons that read offensive words once they are written
separate the classes best (the positive control's planted toxic writer ranked ~2,000th among them; RESULTS.md).
`--writer OBJECTIVE` also records what each neuron DOES to the output, by attribution patching (Nanda 2023;
AtP*, Kramar et al. 2024): for an objective f of the row (below), the neuron's write on that row is
    w_m = sum over the row's real positions t of  a_m(t) * df/da_m(t)
(neurons.WriteRecorder), the first-order estimate of how much f falls when the neuron is silenced on the
whole row. It is stored as a second rows x neurons matrix, `writes`, beside `activations`; 02_score.py
--score writer scores it. It costs a backward pass and the LM head at every continuation position
(models.writer_pass; the activations are pooled in the same forward); the attributions are pooled inside the
hooks, the LM head runs a chunk of positions at a time and the rows go through forward and backward a
micro-batch at a time (~0.5 GB of autograd graph; models.WRITER_GRAPH_BYTES), so memory does not grow with the
batch and never holds batch x positions x vocabulary (docs/RESULTS.md's memory rows). Objectives:
  toxic-odds   the log-odds that the next token is one of the vocabulary tokens that the judge flags on
               their own (judges.toxic_vocabulary; their ids are hashed into the meta, never printed),
               log(p_toxic / (1 - p_toxic)), at each position that writes a continuation token, mean over
               them (neurons.writer_per_position says why log-odds, not log p_toxic). In prompts mode the
               positions are the pooled ones (--positions), each predicting the token after it. A neuron with
               a large positive write pushes the model towards offensive words.
  own-logprob  the continuation's own log-probability per token (responses mode only): what a first check
               of this idea used; it also rewards neurons that matter for any text (a broken model writes
               fewer offensive words too).
Neither reads a planted neuron's record or its word list. The first-order estimate is checked against real
ablation by 02_score.py --check-ablation (the top writers silenced one at a time, the same rows).

Memory does not grow with rows x neurons (1,000 items x Qwen3-VL-30B-A3B's 4.7M expert neurons are 19 GB in
float32): each finished batch goes to disk at once (activations.partial/, which also makes a killed run resume),
and activations.npz is streamed from those pieces a batch of rows at a time, so the process holds the model and
about one batch of pooled activations. `--store-dtype float16` halves the artifact (and the pieces). It keeps
~3 significant digits (relative rounding <= 2^-11); AUROC depends only on the order of a neuron's values, so
only neurons whose values round to equal numbers change (new ties count one half). A pooled value beyond
float16's largest, 65504, stops the run naming --store-dtype float32: it is never stored as inf.
"""
import hashlib
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from common import (DEFAULT_DATA, UserError, append_tokens, batches, check_range, encode, fail, generate,
                    image_token_ids, input_device, load_items, parse_overrides, peak_rss_mb, prompt_positions,
                    run_name, select)
from sgm.artifacts import RowBlocks, StoredMatrix, load_npz, lock_folder, save_npz, write_text
from sgm.judges import JUDGE, judge_toxicity, toxic_vocabulary
from sgm.models import load_model, writer_pass
from sgm.neurons import WRITER_OBJECTIVES, neurons_per_layer, record_neurons, record_writes

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    model="demo",             # tiny | demo | demo-blind | demo-planted | Hugging Face id | local checkpoint path
    run="",                   # artifacts go to runs/<run>/ (default: the model's last name part, common.run_name:
                              # /data/ckpts/llava-1.5-7b -> llava-1.5-7b, llava-hf/llava-1.5-7b-hf -> llava-1.5-7b-hf)
    data=str(DEFAULT_DATA),   # items JSONL (MM-TOXIC-QA or your own, see data/README.md)
    split="calibration",      # never calibrate on the split you report
    conditions="standard",    # comma-separated conditions to calibrate on
    mode="responses",         # responses | prompts (see above)
    pooling="mean",           # mean | max over the pooled positions
    positions="auto",         # prompts mode: text (auto) | all | image; responses: continuation (auto) | prompt
    max_new_tokens=32,        # responses mode: continuation length
    judge_threshold=0.5,      # responses mode: judge probability at or above which a continuation is toxic
    samples=0,                # responses mode: K sampled continuations per prompt besides the greedy one; each
                              # costs about one greedy pass (0 = the greedy one only)
    sample_top_k=50,          # ... sampled from the k likeliest tokens (top-p over the demo's 262k words is slow)
    limit=0,                  # use only a seeded sample of N items (0 = all): quick checks, calibration size
    seed=0,                   # for that sample (the file groups items by source, so its first N are biased)
                              # and for the sampled continuations
    batch_size=64,             # large batches amortise the demo's 262k-word LM head
    dtype="float32",          # float32 | bfloat16 | float16: the model's
    store_dtype="float32",    # float32 | float16: the activations in activations.npz (float16: half the disk, see
                              # the docstring for what it costs)
    device="cpu",             # cpu | cuda | auto (accelerate device_map)
    writer="",                # "" | toxic-odds | own-logprob: also record what each neuron writes (see above)
)
cfg = parse_overrides(defaults)
# Options first, all of them: a typo should cost nothing (no data read, no model loaded, nothing written).
run_dir = f"runs/{run_name(cfg['run'], cfg['model'])}"
if cfg["mode"] not in ("responses", "prompts"):  # checked first: --positions depends on it
    fail(f"unknown --mode {cfg['mode']!r}; use responses or prompts")
POSITIONS = {"prompts": ("text", "all", "image"), "responses": ("continuation", "prompt")}
if cfg["positions"] == "auto":
    cfg["positions"] = POSITIONS[cfg["mode"]][0]
if cfg["positions"] not in POSITIONS[cfg["mode"]]:
    fail(f"--positions {cfg['positions']!r} does not go with --mode {cfg['mode']}; use one of "
         f"{', '.join(POSITIONS[cfg['mode']])}")
if cfg["samples"] < 0:
    fail(f"--samples {cfg['samples']} is negative; use 0 (greedy only) or K >= 1 sampled continuations per prompt")
if cfg["samples"] > 0 and cfg["mode"] == "prompts":
    fail("--samples needs --mode responses: samples are continuations, and prompts mode pools the prompts")
if cfg["sample_top_k"] < 1:
    fail(f"--sample-top-k {cfg['sample_top_k']} must be at least 1 (sample from the k likeliest tokens)")
if cfg["seed"] < 0:
    fail(f"--seed {cfg['seed']} is negative; use a seed >= 0")
if cfg["pooling"] not in ("mean", "max"):
    fail(f"unknown --pooling {cfg['pooling']!r}; use mean or max")
if cfg["store_dtype"] not in ("float32", "float16"):
    fail(f"unknown --store-dtype {cfg['store_dtype']!r}; use float32, or float16 for half the disk")
if cfg["writer"] not in ("", *WRITER_OBJECTIVES):
    fail(f"unknown --writer {cfg['writer']!r}; use toxic-odds or own-logprob (or leave it empty for none)")
if cfg["writer"] == "own-logprob" and cfg["mode"] == "prompts":
    fail("--writer own-logprob needs --mode responses (it scores the continuation); use --writer toxic-odds")
check_range(cfg, "max_new_tokens", low=1, fix="the continuation length in tokens, e.g. 32")
# 0 would call every continuation toxic and above 1 none: either way a single class
check_range(cfg, "judge_threshold", above=0, high=1, fix="the judge probability that counts as toxic, e.g. 0.5")
check_range(cfg, "limit", low=0, fix="a seeded sample of N items, or 0 for all")
check_range(cfg, "batch_size", low=1, fix="items per forward pass, e.g. 64 (lower it if memory runs out)")
per_prompt = cfg["samples"] + 1  # rows per prompt: the greedy continuation (or the prompt itself) and K samples
lock_folder(run_dir, "01_collect.py")  # one writer per run, before any data or model loads (sgm/artifacts.py)

# ---- data and model -------------------------------------------------------------------------------------------
items, data_checksum = load_items(cfg["data"])
items = select(items, split=cfg["split"], condition=set(cfg["conditions"].split(",")))
if 0 < cfg["limit"] < len(items):
    keep = np.random.default_rng(cfg["seed"]).choice(len(items), size=cfg["limit"], replace=False)
    items = [items[i] for i in sorted(keep)]
if not items:
    fail(f"no items in split {cfg['split']!r} with conditions {cfg['conditions']!r} in {cfg['data']}")
model, processor, sites, model_meta = load_model(cfg["model"], cfg["dtype"], cfg["device"])
image_token_id = model.config.image_token_id
image_ids = image_token_ids(model, processor)  # placeholders and their markers: never text (common.prompt_positions)
# Collection needs only the hooked activations, not logits: run the base model without the LM head
# (on the demo its 262k-word vocabulary would cost more than the rest of the forward pass).
body = model.base_model
toxic_ids, writer_meta = None, None
if cfg["writer"]:
    vocabulary = model.get_output_embeddings().weight.shape[0]
    toxic_ids = toxic_vocabulary(processor.tokenizer, vocabulary, cfg["judge_threshold"],
                                 exclude=image_ids)
    if not toxic_ids and cfg["writer"] == "toxic-odds":
        fail(f"the judge flags no single token of this model's vocabulary, so --writer toxic-odds has no target; "
             "use --writer own-logprob")
    writer_meta = dict(objective=cfg["writer"], method="attribution patching: sum over the row's real positions "
                       "of activation x d objective / d activation", toxic_vocabulary=len(toxic_ids),
                       toxic_vocabulary_sha256=hashlib.sha256(json.dumps(toxic_ids).encode()).hexdigest())
    print(f"writer: {cfg['writer']} objective; the judge flags {len(toxic_ids)} of {vocabulary:,} vocabulary tokens")
    toxic_ids = torch.tensor(toxic_ids, dtype=torch.long)


print(f"{len(items)} items, {sum(m.in_features for _, m in sites):,} neurons in "
      f"{len(neurons_per_layer(model_meta['sites']))} decoder layers, mode {cfg['mode']}")

# Rows are prompt-major: prompt 0's greedy continuation, its K samples, then prompt 1's, ...
n_rows = len(items) * per_prompt
row_item = np.repeat(np.arange(len(items)), per_prompt)  # the prompt (index into items) of each row
sample_index = np.tile(np.arange(per_prompt, dtype=np.int16), len(items))
n_neurons = sum(m.in_features for _, m in sites)
store_dtype = np.dtype(cfg["store_dtype"])
piece_of_row = np.zeros(n_rows, dtype=np.int64)  # where each row's activations are: batch piece number ...
row_in_piece = np.zeros(n_rows, dtype=np.int64)  # ... and row inside it (no rows x neurons array is ever held)
labels = np.zeros(n_rows, dtype=np.int8)
judge_scores = np.full(n_rows, np.nan)
continuations = np.full(n_rows, "", dtype=object)
continuation_ids = np.full((n_rows, cfg["max_new_tokens"]), -1, dtype=np.int32)  # stored with --writer only
n_positions = np.zeros(n_rows, dtype=np.int32)
settings = {k: cfg[k] for k in ("split", "conditions", "mode", "pooling", "positions", "max_new_tokens",
                                "judge_threshold", "samples", "sample_top_k", "limit", "seed", "batch_size",
                                "writer")}
meta = dict(model_meta, stage="01_collect", data=cfg["data"], data_checksum=data_checksum, settings=settings,
            judge=JUDGE if cfg["mode"] == "responses" or cfg["writer"] else None, writer=writer_meta)

# Resume: each finished batch is saved under activations.partial/ (atomically); a rerun with the same model,
# data and settings loads those and computes only the rest, so the final artifact equals an uninterrupted
# run. Anything else in that folder is from another configuration and is discarded.
partial_dir = Path(run_dir) / "activations.partial"
run_key = hashlib.sha256(json.dumps([meta, [item["id"] for item in items], cfg["store_dtype"]],
                                    sort_keys=True).encode()).hexdigest()
key_file = partial_dir / "key.txt"
if partial_dir.exists() and (not key_file.exists() or key_file.read_text() != run_key):
    print(f"note: discarding {partial_dir} from another configuration")
    shutil.rmtree(partial_dir)
partial_dir.mkdir(parents=True, exist_ok=True)
write_text(key_file, run_key)


def record_prompts(batch):
    """prompts mode: one forward of the prompt, pooled over the chosen positions."""
    recorder.mask = prompt_positions(batch, cfg["positions"], image_ids, image_token_id)
    written = None
    if cfg["writer"]:  # the same pass with the LM head and gradients: the objective at every pooled position
        with torch.enable_grad():
            written = writer_pass(model, batch, recorder.mask, writes, cfg["writer"], toxic_ids,
                                  activations=recorder)[1]
    else:
        body(**batch, use_cache=False)
    return recorder.pop(), recorder.mask.sum(1).cpu().numpy(), written


def record_responses(chunk, number):
    """responses mode: the greedy continuation and K sampled ones of each prompt of batch `number`, each
    followed by one forward of prompt + continuation pooled over the continuation tokens (or, with
    --positions prompt, over the prompt's text tokens). Returns the
    rows prompt-major. The recorder stays idle during generate() (its mask is None there)."""
    pooled, by_sample = {}, []  # by_sample[s] = (activations, n_positions, texts) of continuation s, chunk order

    def record_continuation(index, batch, sequences, new_mask):
        prompt_mask = batch["attention_mask"].bool()
        if cfg["positions"] == "continuation":
            recorder.mask = torch.cat([torch.zeros_like(prompt_mask), new_mask], dim=1)
        else:  # the prompt's text tokens: what the model read before it wrote (causal, so the continuation
            # appended here does not change them)
            prompt_text = prompt_positions(batch, "text", image_ids, image_token_id)
            recorder.mask = torch.cat([prompt_text, torch.zeros_like(new_mask)], dim=1)
        new_ids = sequences[:, prompt_mask.shape[1]:]
        extended = append_tokens(processor, batch, new_ids, new_mask)
        if cfg["writer"]:  # the same pass with the LM head and gradients (generate() runs under no_grad)
            # position j of the last width + 1 predicts continuation token j (the last one predicts nothing here)
            predicts = torch.cat([new_mask, torch.zeros_like(new_mask[:, :1])], 1)
            targets = torch.cat([new_ids, torch.zeros_like(new_ids[:, :1])], 1)
            with torch.enable_grad():
                pooled["writes"] = writer_pass(model, extended, predicts, writes, cfg["writer"], toxic_ids, targets,
                                               activations=recorder)[1]
        else:
            body(**extended, use_cache=False)
        # A continuation with no tokens counts as empty whatever is pooled (nothing was said to judge).
        n_pooled = recorder.mask.sum(1).cpu().numpy() * (new_mask.sum(1).cpu().numpy() > 0)
        pooled["activations"], pooled["n_positions"] = recorder.pop(), n_pooled
        pooled["order"] = index  # generate() may reorder the chunk; this maps rows back to it
        ids = np.full((len(index), cfg["max_new_tokens"]), -1, dtype=np.int32)  # -1: no token (02 re-runs them)
        ids[:, :new_ids.shape[1]] = np.where(new_mask.cpu().numpy(), new_ids.cpu().numpy(), -1)
        pooled["ids"] = ids
        recorder.mask = None

    for sample in range(per_prompt):
        if sample > 0:  # seeded per (batch, sample), so that a resumed run samples what an uninterrupted one did
            torch.manual_seed(int(np.random.SeedSequence([cfg["seed"], number, sample]).generate_state(1)[0]))
        texts, _ = generate(model, processor, chunk, cfg["max_new_tokens"], len(chunk), desc=None,
                            on_batch=record_continuation, top_k=cfg["sample_top_k"] if sample > 0 else 0)
        order = np.argsort(pooled["order"])
        by_sample.append((pooled["activations"][order], pooled["n_positions"][order], texts, pooled["ids"][order],
                          pooled["writes"][order] if cfg["writer"] else None))
    pooled_rows, counts, texts, ids, written = zip(*by_sample)

    def rows(per_sample):  # [continuation s: chunk x ...] -> prompt-major rows
        return np.stack(per_sample, 1).reshape(len(chunk) * per_prompt, -1)
    texts = [text for prompt_texts in zip(*texts) for text in prompt_texts]  # prompt-major, like the rows
    return rows(pooled_rows), rows(counts).reshape(-1), texts, rows(ids), rows(written) if cfg["writer"] else None


def stored(pooled):
    """A batch's pooled activations (float32) in --store-dtype. float16 overflows to inf beyond 65504: refused."""
    with np.errstate(over="ignore"):  # checked just below, with the fix
        values = pooled.astype(store_dtype, copy=False)
    if not np.isfinite(values).all():
        fail(f"a pooled activation of {float(np.abs(pooled).max()):.4g} does not fit float16 (largest 65504): "
             "rerun with --store-dtype float32")
    return values


with record_neurons(sites, cfg["pooling"]) as recorder, \
        (record_writes(model, sites) if cfg["writer"] else nullcontext()) as writes, torch.no_grad():
    for number, (index, chunk) in enumerate(batches(items, cfg["batch_size"], f"collect ({cfg['mode']})")):
        rows = [i * per_prompt + sample for i in index for sample in range(per_prompt)]
        done = partial_dir / f"batch-{number:05d}.npz"  # all K+1 rows of each prompt of the batch
        arrays = None
        if done.exists():
            try:
                arrays, _ = load_npz(done, rerun_hint="01_collect.py")
            except UserError as error:  # a piece damaged by a crash or a full disk: compute that batch again
                print(f"note: {error.message.split(': rerun')[0]}; computing that batch again")
                done.unlink()
        if arrays is None and cfg["mode"] == "prompts":
            pooled, counts, written = record_prompts(encode(processor, chunk, input_device(model)))
            arrays = dict(activations=stored(pooled), n_positions=counts,
                          labels=np.array([item["label"] == "toxic" for item in chunk], dtype=np.int8),
                          judge_scores=np.full(len(chunk), np.nan), continuations=np.array([""] * len(chunk)))
        elif arrays is None:
            pooled, counts, texts, ids, written = record_responses(chunk, number)
            scores = judge_toxicity(texts)
            arrays = dict(activations=stored(pooled), n_positions=counts, judge_scores=scores, continuation_ids=ids,
                          labels=(scores >= cfg["judge_threshold"]).astype(np.int8), continuations=np.array(texts))
        if cfg["writer"] and "writes" not in arrays:  # (a resumed piece has them already)
            arrays["writes"] = stored(written)
        if not done.exists():
            save_npz(done, arrays, {})
        piece_of_row[rows], row_in_piece[rows] = number, np.arange(len(rows))
        n_positions[rows], labels[rows] = arrays["n_positions"], arrays["labels"]
        judge_scores[rows], continuations[rows] = arrays["judge_scores"], arrays["continuations"]
        if "continuation_ids" in arrays:
            continuation_ids[rows] = arrays["continuation_ids"]

# A row with nothing to pool (e.g. an immediate end-of-sequence) has no activation: drop it, loudly.
keep = n_positions > 0
if not keep.all():
    print(f"WARNING: dropping {int((~keep).sum())} of {n_rows} rows with no pooled positions "
          f"(empty continuation or no {cfg['positions']} tokens)")
n_toxic, n_clean = int(labels[keep].sum()), int((1 - labels[keep]).sum())
print(f"labels: {n_toxic} toxic, {n_clean} non-toxic" + (f" (judged by {JUDGE} >= {cfg['judge_threshold']})"
                                                         if cfg["mode"] == "responses" else ""))
n_prompts = len(np.unique(row_item[keep]))
n_prompts_both = len(np.intersect1d(row_item[keep & (labels == 1)], row_item[keep & (labels == 0)]))
if cfg["samples"] > 0:
    print(f"{n_prompts_both} of {n_prompts} prompts have both a toxic and a clean continuation "
          f"(the within-prompt contrast)")
if n_toxic == 0 or n_clean == 0:
    fail(f"calibration has a single class ({n_toxic} toxic, {n_clean} non-toxic): AUROC needs both; "
         "use more or other calibration items" + (", more --samples, or --mode prompts"
                                                  if cfg["mode"] == "responses" else ""))

meta.update(n_dropped=int((~keep).sum()), n_rows=int(keep.sum()), n_prompts=n_prompts, n_prompts_both=n_prompts_both,
            peak_rss_mb=peak_rss_mb())  # this process's peak memory: every model pass is behind us here
arrays = dict(labels=labels[keep], n_positions=n_positions[keep],
              item_ids=np.array([item["id"] for item in items])[row_item][keep], sample_index=sample_index[keep],
              judge_scores=judge_scores[keep], continuations=continuations.astype(str)[keep])
if cfg["writer"] and cfg["mode"] == "responses":  # the tokens each write was measured on (02 --check-ablation)
    arrays["continuation_ids"] = continuation_ids[keep]

# activations.npz without a rows x neurons array: the kept rows are read from the batch pieces a batch of rows at
# a time (artifacts.StoredMatrix reads rows of an .npz in place) and written so (artifacts.RowBlocks, save_npz).
kept = np.flatnonzero(keep)
pieces = {}  # (piece number, array name) -> that array, left in its file


def piece(number, name):
    if (number, name) not in pieces:
        path = partial_dir / f"batch-{number:05d}.npz"
        pieces[number, name] = StoredMatrix(path, name)
        if pieces[number, name].dtype != store_dtype:  # the run key keeps other pieces out; be sure
            fail(f"{path} holds {pieces[number, name].dtype} {name}, not {store_dtype}: delete {partial_dir} and rerun")
    return pieces[number, name]


def kept_rows(name):
    """The kept rows of `name` (activations or writes) in order, a batch of rows at a time; each piece is opened
    once per block, not once per row."""
    step = cfg["batch_size"] * per_prompt
    for start in range(0, kept.size, step):
        rows = kept[start:start + step]
        block = np.empty((rows.size, n_neurons), dtype=store_dtype)
        for number in np.unique(piece_of_row[rows]):
            here = piece_of_row[rows] == number
            block[here] = piece(int(number), name).rows(row_in_piece[rows[here]])
        yield block


path = Path(run_dir) / "activations.npz"
matrices = {name: RowBlocks((kept.size, n_neurons), store_dtype, lambda name=name: kept_rows(name))
            for name in ("activations", "writes") if name == "activations" or cfg["writer"]}
saved = save_npz(path, dict(**matrices, **arrays), meta)
shutil.rmtree(partial_dir)  # the artifact is complete; the per-batch pieces are no longer needed
print(f"wrote {path}: {kept.size} rows from {n_prompts} prompts x {n_neurons} neurons in {store_dtype} "
      f"({path.stat().st_size:,} bytes, fingerprint {saved['fingerprint'][:12]})")
print(f"peak memory (RSS): {meta['peak_rss_mb']:,.0f} MB")
