"""Memory: the teacher-forced NLL (models.token_nll, 04's fluency and selectivity passes) runs the LM head on a
chunk of counted positions at a time, never on batch x positions x vocabulary at once, and gives the NLL of full
logits; the stages report their peak memory; 01 and 02 never hold the rows x neurons activation matrix (01 streams
activations.npz from its batch pieces, byte for byte what artifacts.save_npz writes; 02 reads it a column chunk at a
time), and `--store-dtype float16` keeps the expert ranking."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import load_stage, write_items
from test_families import family  # noqa: F401 (the fixture: a tiny checkpoint per supported family)
from test_options import tripwire  # noqa: F401 (the fixture: loading anything fails the test)
from test_pipeline import run_stage

import common
from common import append_tokens, encode
from sgm import artifacts
from sgm import models
from sgm.models import load_model, token_nll

ITEMS = [dict(id=str(i), text=text, task="continue", image_path=None) for i, text in enumerate(
    ["the cat", "what is the weather like today in the small town by the river", "a small red house", "go"])]


def reference_nll(model, inputs, counted):
    """Per row, from the model's own full logits (every position) and a float32 log-softmax."""
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()
    width = counted.shape[1]
    log_probs = torch.log_softmax(logits[:, -width - 1:-1], dim=-1)
    picked = log_probs.gather(-1, inputs["input_ids"][:, -width:, None])[..., 0]
    return (-(picked * counted).sum(1) / counted.sum(1).clamp(min=1)).numpy()


def forced_batch(model, processor, lengths=(5, 0, 9, 2), seed=0):
    """Prompts (left-padded) + continuations of the given lengths (right-padded): sgm/models.py's continuation_nll input."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokenizer = processor.tokenizer  # ordinary tokens only: an image token outside an image fails the forward
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), model.config.get_text_config().vocab_size))
                             if i not in special])
    ids = ordinary[torch.randint(len(ordinary), (len(lengths), width), generator=generator)]
    counted = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    ids[~counted] = tokenizer.pad_token_id
    return append_tokens(processor, encode(processor, ITEMS[:len(lengths)], "cpu"), ids, counted), counted


@pytest.mark.parametrize("chunk", [0, 1, 7, 10_000])
def test_chunked_nll_equals_full_logits(tiny, chunk):
    """A batch with left-padded prompts, right-padded continuations, a row with nothing counted and image tokens:
    any chunk (0 = NLL_CHUNK_BYTES, 7 divides none of the lengths) gives the NLL of full logits."""
    model, processor, _, _ = tiny
    inputs, counted = forced_batch(model, processor)
    nll = token_nll(model, inputs, counted, chunk_tokens=chunk)
    np.testing.assert_allclose(nll, reference_nll(model, inputs, counted), rtol=1e-5, atol=1e-6)
    assert nll[1] == 0  # nothing counted
    # text perplexity: every real token but the image placeholders, over the whole prompt
    batch = encode(processor, ITEMS, "cpu")
    targets = batch["input_ids"][:, 1:]
    counted = batch["attention_mask"][:, 1:].bool() & (targets != model.config.image_token_id)
    assert (~counted).any() and counted.any(1).all()
    np.testing.assert_allclose(token_nll(model, batch, counted, chunk_tokens=chunk),
                               reference_nll(model, batch, counted), rtol=1e-5, atol=1e-6)


def test_lm_head_never_sees_more_than_a_chunk(tiny):
    """With a chunk smaller than the counted positions, the LM head's largest output is max(chunk, batch) rows
    (the batch: one position per row, which checks the split against the model's own logits), never
    batch x positions — so no (batch x positions x vocabulary) tensor is made."""
    model, processor, _, _ = tiny
    inputs, counted = forced_batch(model, processor, lengths=(12, 30, 3, 17))
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(output.numel() // output.shape[-1]))
    try:
        token_nll(model, inputs, counted, chunk_tokens=5)
    finally:
        handle.remove()
    # the model's own head and ours on one position per row (the check), then chunks of at most 5
    assert rows[:2] == [len(counted)] * 2 and max(rows[2:]) == 5, rows
    assert sum(rows[2:]) == int(counted.sum()) == 62, rows  # each counted position once, nothing else


def test_default_chunk_bounds_the_logits_bytes(tiny, monkeypatch):
    """The default chunk follows NLL_CHUNK_BYTES: float32 logits of at most that many bytes at once."""
    model, processor, _, _ = tiny
    vocab = model.config.get_text_config().vocab_size
    monkeypatch.setattr(models, "NLL_CHUNK_BYTES", 3 * 4 * vocab)  # three positions' float32 logits
    inputs, counted = forced_batch(model, processor, lengths=(12, 30, 3, 17))
    sizes = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: sizes.append(output.numel() * 4))
    try:
        nll = token_nll(model, inputs, counted)
    finally:
        handle.remove()
    assert max(sizes[2:]) == models.NLL_CHUNK_BYTES and len(sizes) == 2 + -(-int(counted.sum()) // 3)
    np.testing.assert_allclose(nll, reference_nll(model, inputs, counted), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # PaliGemma's processor
def test_every_family_splits_its_head_and_gives_its_own_nll(family):
    """On each supported family (tiny random checkpoints of test_families) the head is split from the forward
    (no fallback) and the chunked NLL equals the one from the model's own full logits, on prompts and on
    continuations; also with final-logit softcapping in the text config, which PaliGemma applies after the head
    (a small cap: far from the uncapped logits) and the others ignore."""
    name, path = family
    model, processor, _, _ = load_model(str(path))
    inputs, counted = forced_batch(model, processor, lengths=(5, 0, 9))
    batch = encode(processor, ITEMS, "cpu")
    text_counted = batch["attention_mask"][:, 1:].bool() & (batch["input_ids"][:, 1:] != model.config.image_token_id)
    for cap in (None, 0.05):
        model.config.get_text_config().final_logit_softcapping = cap
        for inputs_, counted_ in ((inputs, counted), (batch, text_counted)):
            nll = token_nll(model, inputs_, counted_, chunk_tokens=4)
            np.testing.assert_allclose(nll, reference_nll(model, inputs_, counted_), rtol=1e-5, atol=1e-6)
        if cap and name == "paligemma":  # capped at 0.05, every logit is nearly 0: a nearly uniform next token
            assert abs(nll.mean() - np.log(model.config.text_config.vocab_size)) < 0.01
    assert not hasattr(model, "_sgm_full_logits")


def test_unsplittable_head_falls_back_to_full_logits_loudly(capsys):
    """A model that changes its logits after the head in a way token_nll does not know: a printed note, once,
    and the NLL of its own logits all the same."""
    model, processor, _, _ = load_model("tiny")
    model.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * 3))
    inputs, counted = forced_batch(model, processor)
    for _ in range(2):
        np.testing.assert_allclose(token_nll(model, inputs, counted, chunk_tokens=4),
                                   reference_nll(model, inputs, counted), rtol=1e-5, atol=1e-6)
    out = capsys.readouterr().out
    assert out.count("note: cannot split LlavaForConditionalGeneration's LM head") == 1, out
    assert "full logits" in out


def test_stages_report_peak_memory(tmp_path, capsys):
    """01 and 04 print their peak RSS and keep it in their output's meta."""
    data = write_items(tmp_path / "items.jsonl", n_per_label=3)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=tmp_path)
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "3",
              "--selectivity", "false", cwd=tmp_path)
    out = capsys.readouterr().out
    assert out.count("peak memory (RSS): ") == 2, out[-2000:]
    _, activations_meta = artifacts.load_npz(tmp_path / "runs/tiny/activations.npz", "")
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    for meta in (activations_meta, results["meta"]):
        assert meta["peak_rss_mb"] > 50  # python + torch alone


# ---- activations at scale: 01 streams its artifact, 02 reads it a column chunk at a time ---------------------------

def collect(tmp_path, data, run, *flags, model="tiny"):
    run_stage("01_collect.py", "--model", model, "--data", data, "--mode", "prompts", "--batch-size", "4",
              "--run", run, *flags, cwd=tmp_path)
    return artifacts.load_npz(tmp_path / "runs" / run / "activations.npz", "")


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_streamed_activations_are_byte_for_byte_what_numpy_writes(tmp_path, store_dtype):
    """01 writes activations.npz from its batch pieces, a block of rows at a time (artifacts.RowBlocks through
    artifacts.save_npz), never the whole matrix: the file is still exactly the one np.savez writes for the same arrays
    and meta, so np.load and every reader see the same artifact, and float32 (the default) stores the same numbers
    as before. The fingerprint fed in blocks equals the one of the whole arrays."""
    data = write_items(tmp_path / "items.jsonl")
    arrays, meta = collect(tmp_path, data, "r", "--store-dtype", store_dtype)
    assert arrays["activations"].dtype == np.dtype(store_dtype) and len(arrays["activations"]) == 12
    with open(tmp_path / "numpy.npz", "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), allow_pickle=False, **arrays)
    assert (tmp_path / "numpy.npz").read_bytes() == (tmp_path / "runs/r/activations.npz").read_bytes()
    assert list(np.load(tmp_path / "numpy.npz").files) == ["meta", "activations", "labels", "n_positions",
                                                           "item_ids", "sample_index", "judge_scores",
                                                           "continuations"]
    assert artifacts.array_fingerprint(arrays) == meta["fingerprint"]


def test_float16_activations_give_the_float32_expert_ranking(tmp_path):
    """--store-dtype float16 stores the float32 values rounded (nothing else changes), and 02 scores them as stored:
    AUROC moves only where rounding makes values equal, so the expert ranking is the float32 one."""
    data = write_items(tmp_path / "items.jsonl")
    full, _ = collect(tmp_path, data, "f32")
    half, half_meta = collect(tmp_path, data, "f16", "--store-dtype", "float16")
    np.testing.assert_array_equal(half["activations"], full["activations"].astype(np.float16))
    for key in ("labels", "n_positions", "item_ids"):
        np.testing.assert_array_equal(half[key], full[key])
    scores = {}
    for run in ("f32", "f16"):
        run_stage("02_score.py", "--run", run, cwd=tmp_path)
        scores[run], meta = artifacts.load_npz(tmp_path / "runs" / run / "expertise.npz", "")
        assert meta["activations_dtype"] == {"f32": "float32", "f16": "float16"}[run]
    auroc32, auroc16 = scores["f32"]["auroc"], scores["f16"]["auroc"]
    assert np.abs(auroc16 - auroc32).max() <= 0.05
    top = 20
    assert set(np.argsort(-auroc16, kind="stable")[:top]) == set(np.argsort(-auroc32, kind="stable")[:top])


def test_float16_overflow_stops_collection_naming_float32(tmp_path):
    """A pooled activation beyond float16's 65504 would be stored as inf: refused, one line, nothing written."""
    model, processor, _, _ = load_model("tiny")
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.gate_proj.weight.mul_(1e4)  # down_proj inputs of ~1e6
            layer.mlp.up_proj.weight.mul_(1e4)
    models.save_checkpoint(model, processor, tmp_path / "loud")
    data = write_items(tmp_path / "items.jsonl")
    with pytest.raises(common.UserError, match=r"does not fit float16 \(largest 65504\): rerun with --store-dtype "
                                               r"float32$"):
        collect(tmp_path, data, "loud", "--store-dtype", "float16", model=tmp_path / "loud")
    assert not (tmp_path / "runs/loud/activations.npz").exists()
    arrays, _ = collect(tmp_path, data, "loud32", model=tmp_path / "loud")  # float32 holds them
    assert np.abs(arrays["activations"]).max() > 65504


def wide_model(folder, neurons_per_layer):
    """The tiny LLaVA with a wide MLP: many neurons, almost no compute."""
    from transformers import LlamaConfig
    tokenizer = models.tiny_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=neurons_per_layer,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                              max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    models.save_checkpoint(*models.blank_llava(tokenizer, "<image>", text_config), folder)
    return folder


def many_items(path, n_per_label):
    words = models.tiny_corpus()
    rows = [dict(id=f"{label}-{k}", split="calibration", label=label, category="mild", condition="standard",
                 task="continue", text=words[2 * k + (label == "toxic")]) for k in range(n_per_label)
            for label in ("toxic", "benign")]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_collect_never_holds_rows_x_neurons(tmp_path):
    """01's numpy memory (tracemalloc sees every numpy array; torch's own tensors it does not) stays at about one
    batch of pooled rows, far below the rows x neurons matrix: the pieces go to disk as they are made, and the
    artifact is streamed from them. Holding the matrix (or a copy of it to save or fingerprint) would fail this."""
    import tracemalloc
    model = wide_model(tmp_path / "wide", 50_000)
    data = many_items(tmp_path / "items.jsonl", 32)
    matrix_bytes = 64 * 100_000 * 4  # 25.6 MB; a batch of 4 rows is 1.6 MB
    tracemalloc.start()
    try:
        run_stage("01_collect.py", "--model", model, "--data", data, "--mode", "prompts", "--batch-size", "4",
                  "--run", "wide", cwd=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arrays, _ = artifacts.load_npz(tmp_path / "runs/wide/activations.npz", "")
    assert arrays["activations"].nbytes == matrix_bytes
    assert peak < matrix_bytes / 3, f"01 allocated {peak / 1e6:.1f} MB of numpy/Python memory at once"


def test_score_never_holds_rows_x_neurons(tmp_path):
    """02 reads the activations a column chunk at a time from the file (artifacts.StoredMatrix) and checks its
    fingerprint a block at a time: its peak numpy memory is far below the matrix, and its result is the in-memory
    one. Loading the matrix (artifacts.load_npz, or np.load) would fail this."""
    import tracemalloc
    score = load_stage("02_score.py")
    rng = np.random.default_rng(0)
    activations = rng.normal(size=(400, 40_000)).astype(np.float32)  # 64 MB
    labels = (np.arange(400) % 3 == 0).astype(np.int8)
    activations[labels == 1, :50] += 1  # a few real experts
    artifacts.save_npz(tmp_path / "runs/big/activations.npz", dict(activations=activations, labels=labels),
                    dict(model="synthetic", sites=[[f"model.layers.{i}.mlp.down_proj", 20_000] for i in (0, 1)],
                         dtype="float32", data="synthetic", data_checksum="0" * 64, settings={"mode": "synthetic"}))
    expected = score.auroc_columns(activations, labels)
    matrix_bytes = activations.nbytes
    del activations
    tracemalloc.start()
    try:
        run_stage("02_score.py", "--run", "big", "--chunk-neurons", "512", cwd=tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arrays, meta = artifacts.load_npz(tmp_path / "runs/big/expertise.npz", "")
    np.testing.assert_array_equal(arrays["auroc"], expected)
    assert meta["peak_rss_mb"] > 50
    # ~18 MB: per-neuron arrays (AUROC, p, q, the null's draws: ~9 MB here) and 8 MB blocks of the fingerprint
    assert peak < matrix_bytes / 2, f"02 allocated {peak / 1e6:.1f} MB of numpy/Python memory at once"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_stored_matrix_reads_what_was_saved(tmp_path, dtype):
    score = load_stage("02_score.py")
    matrix = np.random.default_rng(1).normal(size=(7, 1000)).astype(dtype)
    artifacts.save_npz(tmp_path / "a.npz", dict(labels=np.arange(7), activations=matrix), {})
    stored = artifacts.StoredMatrix(tmp_path / "a.npz", "activations")
    assert stored.shape == matrix.shape and stored.dtype == matrix.dtype
    for columns in (slice(0, 300), slice(900, 1200), slice(999, None)):
        np.testing.assert_array_equal(stored[:, columns], matrix[:, columns])
    np.testing.assert_array_equal(np.vstack(list(stored.row_blocks(block_bytes=3 * 1000))), matrix)
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(score.auroc_columns(stored, labels, chunk_neurons=128),
                                  score.auroc_columns(matrix, labels, chunk_neurons=128))


def test_widthcheck_options_are_checked_first(tmp_path, tripwire):
    """(01's --store-dtype is among tests/test_options.py's bad options.) An --out outside runs/ is refused: an
    absolute path built from the temp folder, never a fixed machine path."""
    outside = str(tmp_path.parent / "elsewhere")
    for script, flags, option in [("tools/widthcheck.py", ["--layers", "0"], "--layers"),
                                  ("tools/widthcheck.py", ["--items", "1"], "--items"),
                                  ("tools/widthcheck.py", ["--out", outside], "--out"),
                                  ("tools/widthcheck.py", ["--null-width", "-1"], "--null-width"),
                                  ("tools/widthcheck.py", ["--null-rows", "2"], "--null-rows")]:
        with pytest.raises(common.UserError, match=f"^error: (unknown )?{option} ") as error:
            run_stage(script, *flags, cwd=tmp_path)
        assert "\n" not in error.value.message
    assert list(tmp_path.iterdir()) == []


def test_widthcheck_start_up_imports_what_the_stages_import():
    """The start-up row is a process that imports what 02 imports: after a move of the library (models.py ->
    sgm/models.py) a stale import line would stop `make widthcheck` after its 5-minute build."""
    import subprocess
    import sys
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("widthcheck", REPO / "tools/widthcheck.py")
    source = spec.loader.get_source("widthcheck")
    line = next(x for x in source.splitlines() if x.startswith("STARTUP_IMPORTS = "))
    imports = line.split("=", 1)[1].strip().strip('"')
    stage_imports = {name.split()[1].split(".")[0] for name in (REPO / "02_score.py").read_text().splitlines()
                     if name.startswith(("import ", "from ")) and name.split()[1].split(".")[0] in ("common", "sgm")}
    assert stage_imports <= {name.strip().split(".")[0] for name in imports.removeprefix("import ").split(",")}
    subprocess.run([sys.executable, "-c", imports], cwd=REPO, check=True)
