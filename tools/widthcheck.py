"""Real-width check: a random-weight model with LLaVA-1.5-7B's configuration through 01, 01 --writer, 02, 03 and
03 --export on a handful of items; each stage's peak memory, the artifact sizes and the export's shards, measured
against what docs/RESULTS.md's memory rows compute -> runs/widthcheck/widthcheck.md

    python -m tools.widthcheck              # what `make widthcheck` runs: the full 7B (~14 GB of bf16 weights, see below)
    python -m tools.widthcheck --layers 2   # the real widths with 2 of the 32 decoder layers: ~2 GB, a few minutes
    python -m tools.widthcheck --null-width 4718592   # 02's permutation null at Qwen3-VL-30B-A3B's width (no model)

The model is LLaVA-1.5-7B's configuration written out here (CLIP ViT-L/14-336 vision tower, Llama-2-7B language
model: 32 layers x 4,096 hidden x 11,008 MLP neurons, 32,064-word vocabulary) with seeded random bf16 weights,
so nothing is downloaded. It is built once into the model cache (~/.cache/sgm-repro, SGM_CACHE moves it) one
tensor at a time (this process holds one shard of --shard-gb, never the model), then each stage runs as its own
process exactly as a user runs it (`--dtype bfloat16`, `--mode prompts`), and its peak resident memory is read
from the operating system (os.wait4: the same number as /usr/bin/time -v's "Maximum resident set size").
"Computed" is the arithmetic of docs/RESULTS.md's memory rows plus this machine's measured start-up memory of a
stage (Python, torch, transformers), so a large ratio points at a copy the rows do not know about.

Time and memory of the full check on 2 CPU cores: building ~5 min (7.06B normal draws, 14.1 GB written), 01
~15-20 min (4 items x ~600 positions through a 7B model at ~40 GFLOP/s in bf16), 02 seconds, 03 --export ~3 min;
peak memory ~15 GB (01 and the export hold the weights), disk 28 GB (the checkpoint and the export, which is
deleted afterwards unless --keep-export true). Not part of `make test`.

--null-width N skips the model: a synthetic calibration N neurons wide (seeded float16 activations and writes, as
01 --store-dtype float16 --writer would store them; --null-rows rows, two continuations per prompt, so 02 takes the
within-prompt permutation null) goes through 02_score.py --null permutation as its own process, and its peak
memory is set against the computed row (start-up + per-neuron arrays + one chunk): the null itself, P x N values
until 2026-12-02 (7.5 GB at 4.7M neurons), must not show -> runs/widthcheck/null-width.md.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm

from common import REPO, check_range, fail, parse_overrides, peak_rss_mb
from sgm.artifacts import load_npz, load_pt, write_text
from sgm.models import CACHE_DIR, NLL_CHUNK_BYTES, WRITER_GRAPH_BYTES, tiny_tokenizer

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    layers=32,              # decoder layers of the language model (LLaVA-1.5-7B: 32); fewer keeps every width
    items=4,                # calibration items (half toxic), one batch: enough for both classes, cheap on CPU
    store_dtype="float32",  # 01_collect.py --store-dtype
    shard_gb=2.0,           # safetensors shards of the random checkpoint (what this process holds at most)
    keep_export=False,      # keep the exported checkpoint (params x 2 bytes of disk) after measuring it
    seed=0,                 # of the random weights
    out="runs/widthcheck",  # widthcheck.md, the items and the stages' run folder (runs/widthcheck/<model name>)
    null_width=0,           # > 0: only 02's permutation null on a synthetic calibration this many neurons wide
                            # (Qwen3-VL-30B-A3B: 4718592 = 48 layers x 128 experts x 768), no model
    null_rows=64,           # ... its rows: null_rows / 2 prompts x 2 continuations
    null_writes=True,       # ... with writes (as 01 --writer stores them): 02 also scores the writers
    permutations=100,       # ... 02's --permutations (its default)
)
GB = 1e9
# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf's config.json; the rest are transformers' Llama and CLIP defaults).
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
              patch_size=14, projection_dim=768)
TEXT = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
            max_position_embeddings=4096, rms_norm_eps=1e-5)
IMAGE_TOKENS = (336 // 14) ** 2  # 576 positions per image ("default" strategy drops the CLS feature)
CHUNK_NEURONS, NULL_DRAWS = 4096, 5  # 02_score.py's defaults, which the computed rows assume
# What every stage imports (02's imports, the most): a stage's start-up memory, measured in a process of its own.
# float64 per neuron that 02 holds at its peak (counted in 02_score.py, checked by --null-width): the real labels'
# and the 5 draws' AUROC, p and q with BH's temporaries; with writes also their d, t, p and q and the counting's.
SCORE_PER_NEURON, WRITER_PER_NEURON = 30, 32
STARTUP_IMPORTS = "import common, sgm.models, sgm.artifacts, torch, transformers, scipy.stats, matplotlib.pyplot"
EXPORT_SHARD_BYTES = 50 * GB  # transformers' save_pretrained default max_shard_size ("50GB")
# A random model needs only two labelled classes, not toxic words: mild texts, as in the tests (never write toxic
# examples here; real calibration text comes from MM-TOXIC-QA's public sources).
TEXTS = {"toxic": ["you are a silly rude person", "that was an awful and rude thing", "what a terrible angry day",
                   "go away you silly dog"],
         "benign": ["the garden is quiet in the evening after the rain", "a small red house stands by the river",
                    "people like to read a good book in the morning", "the weather today is mild and sunny"]}


def build_config(layers):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    return LlavaConfig(vision_config=CLIPVisionConfig(**VISION),
                       text_config=LlamaConfig(**TEXT, num_hidden_layers=layers),
                       vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def build_checkpoint(out_dir, config, seed, shard_bytes):
    """The random checkpoint, without ever holding the model: names and shapes come from a model built on the meta
    device (no memory, no init), each tensor is drawn on its own (seeded by its name, so a shard size or order
    change gives the same weights) and written with its shard. Norms are 1, biases 0, the rest N(0, 0.02^2) —
    a well-scaled random network: activations stay finite in bf16."""
    import zlib

    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The processor: the real image pipeline (336 px, 576 image tokens) and an in-code tokenizer (sgm/models.py's,
    # offline) padded with placeholder words to the real 32,064 ids, so every id the model has is a word.
    tokenizer = tiny_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_tokens([f"<unused{i}>" for i in range(TEXT["vocab_size"] - len(tokenizer))])
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336},
                                                                     crop_size={"height": 336, "width": 336}),
                               tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in LlavaForConditionalGeneration(config).state_dict().items()}
    out_dir.mkdir(parents=True)
    weight_map, shard, shard_size, files = {}, {}, 0, []

    def write_shard():
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shard, out_dir / files[-1], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, files[-1]))
        shard.clear()

    for name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor", file=sys.stdout):
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        if name.endswith(".bias"):
            tensor.zero_()
        elif "norm" in name:  # layer norms (CLIP) and RMS norms (Llama): weight 1
            tensor.fill_(1)
        else:
            generator = torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32(name.encode()))
            tensor.normal_(0, 0.02, generator=generator)
        if shard and shard_size + tensor.nbytes > shard_bytes:
            write_shard()
            shard_size = 0
        shard[name], shard_size = tensor, shard_size + tensor.nbytes
    write_shard()
    # Shard names as save_pretrained writes them (model-00001-of-00003.safetensors), and their index.
    renamed = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in renamed.items():
        os.replace(out_dir / old, out_dir / new)
    total = sum(math.prod(shape) * 2 for shape in shapes.values())
    write_text(out_dir / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, indent=2))
    config.save_pretrained(out_dir)
    GenerationConfig(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# Starts the stage and reports its peak memory. Linux counts a process's peak from before its exec, i.e. the
# memory of whoever forked it: forked from this process (which has held a shard of the checkpoint) a stage would
# report that. So a fresh, small Python forks it, as /usr/bin/time does, and writes its rusage to argv[1].
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss * 1024))  # KB on Linux
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(script, *args, log):
    """Run a Python script as its own process from the repository root, its output to the terminal and `log`.
    Returns (seconds, that process's peak resident memory in bytes, from the kernel's rusage of it)."""
    started = time.perf_counter()
    peak_file = Path(log).with_suffix(".peak")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(peak_file),
                                    *([str(REPO / script)] if script else []), *map(str, args)],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            out.write(line)
    if process.wait() != 0:
        fail(f"{script or 'python -c'} {' '.join(map(str, args))} failed (exit {process.returncode}): its output is "
             f"above and in {log}")
    return time.perf_counter() - started, int(peak_file.read_text())


def null_width_check(cfg):
    """02's permutation null at a real width, without a model: a seeded synthetic calibration (activations and
    writes in float16, written a block of rows at a time, never whole) scored by 02_score.py --null permutation
    in its own process; its peak memory against the computed row -> <out>/null-width.md."""
    from sgm.artifacts import RowBlocks, save_npz
    n_neurons, n_rows, chunk = cfg["null_width"], cfg["null_rows"], CHUNK_NEURONS
    out = REPO / cfg["out"]
    run = f"{Path(*Path(cfg['out']).parts[1:])}/null-width-{n_neurons}"
    run_dir = REPO / "runs" / run
    # Prompt k gives rows 2k and 2k + 1: mixed (toxic, clean) for even k, both clean or both toxic for odd k, so
    # the within-prompt shuffles have prompts to move. Layers of 128 experts x 768 when the width allows.
    labels = np.array([[1, 0], [0, 0], [1, 0], [1, 1]] * (n_rows // 8 + 1)).ravel()[:n_rows].astype(np.int8)
    layer_width = 128 * 768 if n_neurons % (128 * 768) == 0 else n_neurons
    sites = [[f"model.language_model.layers.{i}.mlp.experts", layer_width] for i in range(n_neurons // layer_width)]

    def blocks(seed):  # 8 rows at a time, each block seeded on its own: the same matrix for any block order
        for start in range(0, n_rows, 8):
            rng = np.random.default_rng([cfg["seed"], seed, start])
            yield rng.standard_normal((min(8, n_rows - start), n_neurons), dtype=np.float32).astype(np.float16)

    arrays = dict(activations=RowBlocks((n_rows, n_neurons), np.float16, lambda: blocks(0)),
                  labels=labels, item_ids=np.repeat(np.arange(n_rows // 2 + 1), 2)[:n_rows])
    if cfg["null_writes"]:
        arrays["writes"] = RowBlocks((n_rows, n_neurons), np.float16, lambda: blocks(1))
    stored = " and ".join(name for name in ("activations", "writes") if name in arrays)
    print(f"writing a synthetic calibration: {n_rows} rows x {n_neurons:,} neurons, float16 {stored}")
    save_npz(run_dir / "activations.npz", arrays, dict(
        model="synthetic", sites=sites, dtype="float16", data="synthetic", data_checksum="0" * 64,
        settings={"mode": "synthetic (tools/widthcheck.py --null-width)"},
        writer={"objective": "synthetic", "form": "seeded normal noise"} if cfg["null_writes"] else None))
    logs = run_dir.with_name(f"{run_dir.name}-logs")
    logs.mkdir(parents=True, exist_ok=True)
    startup_seconds, startup = run_measured("", "-c", STARTUP_IMPORTS, log=logs / "startup.log")
    args = ["--run", run, "--null", "permutation", "--permutations", cfg["permutations"]]
    print(f"---- python 02_score.py {' '.join(map(str, args))}")
    seconds, peak = run_measured("02_score.py", *args, log=logs / "02.log")
    _, meta = load_npz(run_dir / "expertise.npz", "02_score.py")
    n_pos = int(labels.sum())
    # Computed: per neuron, the float64 arrays 02 holds at once (SCORE_PER_NEURON, counted in 02_score.py's code);
    # one chunk: its float16 reads, float32 copy, sort keys twice, ranks, and U of every shuffle; U's grid.
    floats = SCORE_PER_NEURON + WRITER_PER_NEURON * cfg["null_writes"]
    per_neuron = n_neurons * 8 * floats
    one_chunk = n_rows * chunk * (2 + 4 + 2 * 8 + 8) + (cfg["permutations"] + NULL_DRAWS + 1) * chunk * 8 * 2
    grid = (2 * n_pos * (n_rows - n_pos) + 1) * 8
    old_null = 2 * cfg["permutations"] * n_neurons * 8  # the null's AUROCs, and their sorted copy
    rows = [("start-up of a stage (import only; measured)", startup, startup),
            (f"per-neuron arrays ({floats} x neurons x 8)", per_neuron, None),
            ("one chunk of 4,096 neurons + U's grid", one_chunk + grid, None),
            ("02 peak (the three above)", startup + per_neuron + one_chunk + grid, peak),
            (f"for comparison: the old pooled null (2 x {cfg['permutations']} x neurons x 8)", old_null, None)]
    table = "\n".join(f"| {what} | {c / GB:,.3f} GB | " + (f"{v / GB:,.3f} GB | {v / c:.2f} |" if v else "| |")
                      for what, c, v in rows)
    writer_seconds = f", writers {meta['writer_seconds']:.0f} s" if cfg["null_writes"] else ""
    report = f"""# 02's permutation null at real width: {n_neurons:,} neurons, no model

`python -m tools.widthcheck {' '.join(sys.argv[1:])}`: {n_rows} rows ({n_rows // 2} prompts x 2 continuations, {n_pos}
toxic), seeded float16 {stored}; `02_score.py {' '.join(map(str, args))}` ({meta['null']} null,
{meta['permutations']} shuffles) in its own process: {seconds:.0f} s. Peak memory from the kernel; GB = 1e9 bytes.
Machine: {os.cpu_count()} CPUs, torch {torch.__version__}.

| quantity | computed | measured | measured / computed |
|---|---:|---:|---:|
{table}

02's stored peak_rss_mb: {meta['peak_rss_mb']:,.0f} MB; null {meta['null_seconds']:.0f} s{writer_seconds}.
"""
    report_path = out / f"null-width{'' if cfg['null_writes'] else '-no-writes'}.md"
    write_text(report_path, report)
    print(report)
    print(f"wrote {report_path}")
    shutil.rmtree(run_dir)  # 2 x rows x neurons x 2 bytes of synthetic noise


def folder_bytes(folder, suffix=".safetensors"):
    return sorted(f.stat().st_size for f in Path(folder).glob(f"*{suffix}"))


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    # Options first: a typo should cost nothing (no build, no disk).
    check_range(cfg, "layers", low=1, fix="decoder layers, 32 for LLaVA-1.5-7B (fewer keeps every width)")
    check_range(cfg, "items", low=2, fix="calibration items, at least one toxic and one benign, e.g. 4")
    check_range(cfg, "shard_gb", above=0, fix="the random checkpoint's shard size in GB, e.g. 2")
    check_range(cfg, "seed", low=0, fix="any seed >= 0")
    if cfg["store_dtype"] not in ("float32", "float16"):
        fail(f"unknown --store-dtype {cfg['store_dtype']!r}; use float32 or float16")
    if cfg["items"] > 2 * len(TEXTS["toxic"]):
        fail(f"--items {cfg['items']} is more than the {2 * len(TEXTS['toxic'])} texts here; use fewer")
    out = Path(cfg["out"])
    if out.is_absolute() or ".." in out.parts or out.parts[:1] != ("runs",):
        fail(f"--out {cfg['out']!r} must be a folder under runs/, e.g. runs/widthcheck")
    check_range(cfg, "null_width", low=0, fix="neurons of the synthetic calibration, e.g. 4718592 (0 = the model check)")
    check_range(cfg, "null_rows", low=8, fix="rows of the synthetic calibration, an even number >= 8, e.g. 64")
    check_range(cfg, "permutations", low=1, fix="02's within-prompt shuffles, e.g. 100")
    if cfg["null_width"]:
        null_width_check(cfg)
        sys.exit(0)
    name = f"llava-1.5-7b-random-{cfg['layers']}L"
    run = f"{Path(*out.parts[1:])}/{name}"  # the stages' --run: runs/<run>/
    run_dir = REPO / "runs" / run
    checkpoint = CACHE_DIR / f"widthcheck-{name}-seed{cfg['seed']}"
    export = CACHE_DIR / f"widthcheck-{name}-export"

    config = build_config(cfg["layers"])
    with torch.device("meta"):
        from transformers import LlavaForConditionalGeneration
        n_params = sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())
    n_neurons = cfg["layers"] * TEXT["intermediate_size"]
    started, built = time.perf_counter(), not (checkpoint / "config.json").exists()
    if built:
        print(f"building the random checkpoint once into {checkpoint} ({n_params / 1e9:.2f}B parameters, "
              f"{n_params * 2 / GB:.1f} GB)")
        shutil.rmtree(checkpoint, ignore_errors=True)  # a build that died: start over
        tmp = checkpoint.with_name(f"{checkpoint.name}.{os.getpid()}.tmp")
        try:
            build_checkpoint(tmp, config, cfg["seed"], int(cfg["shard_gb"] * GB))
            os.replace(tmp, checkpoint)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    build_seconds, build_peak = time.perf_counter() - started, peak_rss_mb() * 2 ** 20

    # A handful of items, half toxic, with no image file (each gets the blank image, resized to 336 px).
    items = [dict(id=f"{label}-{k}", split="calibration", label=label, category="widthcheck", condition="standard",
                  task="continue", text=TEXTS[label][k]) for k in range((cfg["items"] + 1) // 2) for label in TEXTS]
    data = REPO / out / "items.jsonl"
    write_text(data, "".join(json.dumps(item) + "\n" for item in items[:cfg["items"]]))
    logs = run_dir.with_name(f"{name}-logs")
    logs.mkdir(parents=True, exist_ok=True)
    measured = {"start-up": run_measured("", "-c", STARTUP_IMPORTS, log=logs / "startup.log")}
    for stage, script, args in [
            ("01", "01_collect.py", ["--model", checkpoint, "--run", run, "--data", data, "--mode", "prompts",
                                     "--dtype", "bfloat16", "--batch-size", cfg["items"],
                                     "--store-dtype", cfg["store_dtype"]]),
            # the writer pass (make planted's 01): the same batch with the LM head and a backward pass. The
            # judge flags a few of the in-code tokenizer's words (' rude', ' angry', ...): toxic-odds' target
            ("01 --writer", "01_collect.py", ["--model", checkpoint, "--run", f"{run}-writer", "--data", data,
                                              "--mode", "prompts", "--dtype", "bfloat16", "--batch-size", cfg["items"],
                                              "--store-dtype", cfg["store_dtype"], "--writer", "toxic-odds"]),
            ("02", "02_score.py", ["--run", run]),
            ("03", "03_suppress.py", ["--run", run]),
            ("03 --export", "03_suppress.py", ["--run", run, "--export", export])]:
        print(f"---- {stage}: python {script} {' '.join(map(str, args))}")
        measured[stage] = run_measured(script, *args, log=logs / f"{stage.replace(' --', '-')}.log")
    arrays, activations_meta = load_npz(run_dir / "activations.npz", "01_collect.py")
    _, expertise_meta = load_npz(run_dir / "expertise.npz", "02_score.py")
    load_pt(run_dir / "suppression.pt", "03_suppress.py")
    shards, checkpoint_shards = folder_bytes(export), folder_bytes(checkpoint)
    stored_params = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            stored_params += sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())
    if not cfg["keep_export"]:
        shutil.rmtree(export)

    # ---- measured vs computed (docs/RESULTS.md's memory rows) ------------------------------------------------------
    n_rows, positions = len(arrays["labels"]), int(arrays["n_positions"].max())
    length = IMAGE_TOKENS + positions  # a prompt's positions: the image's and the text's (pooled: n_positions)
    itemsize = np.dtype(cfg["store_dtype"]).itemsize
    h, m, heads = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["num_attention_heads"]
    startup = measured["start-up"][1]
    weights = n_params * 2
    # 01: the weights, one decoder layer's activations in bf16, its attention scores, the batch's pooled float32.
    forward = cfg["items"] * length * (5 * h + 3 * m) * 2 + cfg["items"] * heads * length ** 2 * 4
    collect = startup + weights + forward + 3 * cfg["items"] * n_neurons * 4
    # 02: the sort keys of one chunk (twice), and the per-neuron arrays (SCORE_PER_NEURON float64 each).
    score = startup + 2 * n_rows * CHUNK_NEURONS * 8 + n_neurons * 8 * SCORE_PER_NEURON
    suppress = startup + n_neurons * 8 * 4
    # 01 --writer: the weights; the autograd graph of one micro-batch of rows (models.writer_graph_bytes, counted:
    # per row length x (layers x ((4 h + 4 m) x 2 + 2 h x 4) + h x 4) bytes in bf16; as many rows as
    # WRITER_GRAPH_BYTES hold, at least one); one layer's working set for those rows, freed but kept by the
    # allocator: its forward (as in 01's row) and its backward (the write hook's float32 copies of a and its
    # gradient, three MLP-wide gradients: m x 14 bytes a position); the LM head's chunk of float32 logits (~4
    # copies in its backward, at most 4 x NLL_CHUNK_BYTES); the pooled activations and writes (as in 01's row).
    graph_per_row = length * (cfg["layers"] * ((4 * h + 4 * m) * 2 + 2 * h * 4) + h * 4)
    rows_per_pass = max(1, min(cfg["items"], WRITER_GRAPH_BYTES // graph_per_row))
    layer_per_row = length * (5 * h + 3 * m) * 2 + heads * length ** 2 * 4 + length * m * 14
    marked = int(arrays["n_positions"].sum())  # prompts mode: the objective at every pooled position
    head_chunk = 4 * min(marked * TEXT["vocab_size"] * 4, NLL_CHUNK_BYTES)
    writer = (startup + weights + rows_per_pass * (graph_per_row + layer_per_row) + head_chunk
              + 2 * 3 * cfg["items"] * n_neurons * 4)
    rows = [
        ("neurons (layers x 11,008)", n_neurons, len(activations_meta["sites"]) * TEXT["intermediate_size"], "n"),
        ("parameters", n_params, stored_params, "n"),
        ("random checkpoint (params x 2)", weights, sum(checkpoint_shards), "b"),
        (f"activations.npz ({n_rows} x neurons x {itemsize})", n_rows * n_neurons * itemsize,
         (run_dir / "activations.npz").stat().st_size, "b"),
        ("expertise.npz (neurons x 3 x 8)", n_neurons * 24, (run_dir / "expertise.npz").stat().st_size, "b"),
        ("suppression.pt (neurons x 4)", n_neurons * 4, (run_dir / "suppression.pt").stat().st_size, "b"),
        ("export (params x 2)", weights, sum(shards), "b"),
        ("export shards (of 50 GB)", math.ceil(weights / EXPORT_SHARD_BYTES), len(shards), "n"),
        ("start-up of a stage (import only; measured, in every row below)", startup, startup, "b"),
        ("01 peak (start-up + weights + one batch's forward and pooled rows)", collect, measured["01"][1], "b"),
        (f"01 --writer peak (start-up + weights + the graph of {rows_per_pass} of {cfg['items']} rows, "
         f"{rows_per_pass} x {graph_per_row / GB:.3f} GB at {cfg['layers']} layers, + one layer's working set, head "
         "chunk and pooled rows)", writer, measured["01 --writer"][1], "b"),
        ("02 peak (start-up + 2 chunks of sort keys + per-neuron arrays)", score, measured["02"][1], "b"),
        ("03 peak (start-up + per-neuron arrays)", suppress, measured["03"][1], "b"),
        ("03 --export peak (start-up + weights)", startup + weights, measured["03 --export"][1], "b"),
    ] + ([("this process, building the checkpoint (one shard)", startup + cfg["shard_gb"] * GB, build_peak, "b")]
         if built else [])

    def shown(value, kind):
        return f"{value:,.0f}" if kind == "n" else f"{value / GB:,.3f} GB" if value >= 1e7 else f"{value / 1e6:,.3f} MB"

    seconds = ", ".join(f"{stage} {t:.0f} s" for stage, (t, _) in measured.items() if stage != "start-up")
    table = "\n".join(f"| {what} | {shown(c, kind)} | {shown(v, kind)} | {v / c:.2f} |" for what, c, v, kind in rows)
    building = f"building {build_seconds:.0f} s, " if built else "the checkpoint was cached, "
    report = f"""# Real-width check: LLaVA-1.5-7B's configuration, random weights, {cfg['layers']} of 32 decoder layers

`python -m tools.widthcheck {' '.join(sys.argv[1:])}`: {n_params / 1e9:.3f}B parameters in bf16, {cfg['items']} calibration
items ({n_rows} rows, {length} positions each), 01 with `--store-dtype {cfg['store_dtype']}`. Peak memory is each
stage's own process (resident set, from the kernel); GB = 1e9 bytes. Times: {building}{seconds}. Machine: {os.cpu_count()} CPUs, torch {torch.__version__}.

| quantity | computed | measured | measured / computed |
|---|---:|---:|---:|
{table}

Export shards: {', '.join(shown(b, 'b') for b in shards)}. Random checkpoint shards: {len(checkpoint_shards)} of up
to {cfg['shard_gb']:g} GB. 01's stored peak_rss_mb: {activations_meta['peak_rss_mb']:,.0f} MB; 02's:
{expertise_meta['peak_rss_mb']:,.0f} MB.
"""
    write_text(REPO / out / "widthcheck.md", report)
    print(report)
    print(f"wrote {out / 'widthcheck.md'}")
