"""Memory: the teacher-forced NLL (models.token_nll, 04's fluency and selectivity passes) runs the LM head on a
chunk of counted positions at a time, never on batch x positions x vocabulary at once, and gives the NLL of full
logits; the stages report their peak memory."""
import json

import numpy as np
import pytest
import torch
from conftest import write_items
from test_families import family  # noqa: F401 (the fixture: a tiny checkpoint per supported family)
from test_pipeline import run_stage

import common
import models
from common import append_tokens, encode
from models import load_model, token_nll

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
    """Prompts (left-padded) + continuations of the given lengths (right-padded): 04's continuation_nll input."""
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
    _, activations_meta = common.load_npz(tmp_path / "runs/tiny/activations.npz", "")
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    for meta in (activations_meta, results["meta"]):
        assert meta["peak_rss_mb"] > 50  # python + torch alone
