"""Neuron sites, recording and suppression hooks, folding alpha into weights — on the tiny random LLaVA."""
import pytest
import torch

import common
from common import encode
from sgm import models
from sgm.neurons import fold_alpha, record_neurons, suppress_neurons

ITEMS = [dict(id=str(i), text=t, task="continue", image_path=None) for i, t in enumerate(
    ["the cat", "people like to read about the weather in the morning", "a small red house by the quiet river"])]


def batch_and_neurons(tiny):
    model, processor, sites, meta = tiny
    return model, sites, encode(processor, ITEMS, "cpu"), sum(m.in_features for _, m in sites)


def test_sites_are_language_model_down_proj(tiny):
    model, _, sites, meta = tiny
    assert [n for n, _ in sites] == [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sum(size for _, size in meta["sites"]) == 2 * 48
    assert all(not n.startswith("model.vision_tower") for n, _ in sites)


def test_alpha_one_is_bit_identical_and_hooks_are_removed(tiny):
    model, sites, batch, n = batch_and_neurons(tiny)
    with torch.no_grad():
        before = model(**batch).logits
        with suppress_neurons(sites, torch.ones(n)):
            same = model(**batch).logits
        with suppress_neurons(sites, torch.full((n,), 0.5)):
            assert all(len(m._forward_pre_hooks) == 1 for _, m in sites)
            changed = model(**batch).logits
    assert torch.equal(before, same)
    assert not torch.allclose(before, changed)
    assert all(len(m._forward_pre_hooks) == 0 for _, m in sites)


def test_hooks_are_removed_on_error(tiny):
    model, sites, batch, n = batch_and_neurons(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with suppress_neurons(sites, torch.full((n,), 0.5)):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with record_neurons(sites):
            raise RuntimeError("boom")
    assert all(len(m._forward_pre_hooks) == 0 for _, m in sites)


def test_alpha_zero_makes_every_mlp_output_zero(tiny):
    model, sites, batch, n = batch_and_neurons(tiny)
    outputs = []
    handles = [m.register_forward_hook(lambda mod, args, out: outputs.append(out)) for _, m in sites]
    try:
        with torch.no_grad(), suppress_neurons(sites, torch.zeros(n)):
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    assert len(outputs) == len(sites) and all(torch.count_nonzero(o) == 0 for o in outputs)


def test_wrong_alpha_size_is_refused(tiny):
    _, sites, _, n = batch_and_neurons(tiny)
    with pytest.raises(common.UserError, match="rerun 03_suppress.py"):
        with suppress_neurons(sites, torch.ones(n + 1)):
            pass


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_recorded_activations_equal_manual_recomputation_without_padding(tiny, pooling):
    """Pooled act(gate(x)) * up(x) recomputed by hand from each MLP's input, per item, over its own text
    positions only; the batch has unequal lengths, so left padding must be excluded."""
    model, sites, batch, n = batch_and_neurons(tiny)
    mlp_inputs = []
    mlps = [model.model.language_model.layers[i].mlp for i in range(len(sites))]
    handles = [mlp.register_forward_pre_hook(lambda mod, args: mlp_inputs.append(args[0])) for mlp in mlps]
    real = batch["attention_mask"].bool()
    text = real & (batch["input_ids"] != model.config.image_token_id)
    assert (~real).any(), "the batch must contain padding for this test to mean anything"
    try:
        with torch.no_grad(), record_neurons(sites, pooling) as recorder:
            recorder.mask = text
            model.model(**batch)
            recorded = recorder.pop()
    finally:
        for h in handles:
            h.remove()
    for b in range(len(ITEMS)):
        expected = []
        for mlp, x in zip(mlps, mlp_inputs):
            neurons = mlp.act_fn(mlp.gate_proj(x[b])) * mlp.up_proj(x[b])   # positions x intermediate
            kept = neurons[text[b]]
            expected.append(kept.mean(0) if pooling == "mean" else kept.max(0).values)
        torch.testing.assert_close(torch.from_numpy(recorded[b]), torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_pooled_item_does_not_depend_on_its_batch(tiny):
    """The shortest item alone equals the same item left-padded inside a batch (padding never pooled)."""
    model, processor, sites, _ = tiny
    results = []
    for chunk in (ITEMS[:1], ITEMS):
        batch = encode(processor, chunk, "cpu")
        with torch.no_grad(), record_neurons(sites) as recorder:
            recorder.mask = batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)
            model.model(**batch)
            results.append(recorder.pop()[0])
    torch.testing.assert_close(torch.from_numpy(results[0]), torch.from_numpy(results[1]), rtol=1e-4, atol=1e-5)


def test_hooked_logits_equal_baked_weights(tiny, tmp_path):
    """fold_alpha (the exportable checkpoint) gives the logits of the suppression hooks."""
    model, sites, batch, n = batch_and_neurons(tiny)
    alpha = torch.rand(n, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), suppress_neurons(sites, alpha):
        hooked = model(**batch).logits
    baked_model, _, baked_sites, _ = models.load_model("tiny")   # a separate copy to modify
    fold_alpha(baked_sites, alpha)
    with torch.no_grad():
        baked = baked_model(**batch).logits
    torch.testing.assert_close(hooked, baked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_hooks_run(dtype):
    model, processor, sites, _ = models.load_model("tiny", dtype=dtype)
    batch = encode(processor, ITEMS, "cpu")
    n = sum(m.in_features for _, m in sites)
    with torch.no_grad(), suppress_neurons(sites, torch.full((n,), 0.5)):
        logits = model(**batch).logits
    with torch.no_grad(), record_neurons(sites) as recorder:
        recorder.mask = batch["attention_mask"].bool()
        model.model(**batch)
        pooled = recorder.pop()
    assert logits.dtype == models.DTYPES[dtype] and pooled.shape == (3, n)
