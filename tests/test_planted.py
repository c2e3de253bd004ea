"""The positive control on the tiny model: plant one neuron that pushes one token after one kind of prompt, then
check that the ordinary stages find it (02 ranks it first), damp it (03), and that the token's probability falls
under the hooks and in the exported checkpoint alike; and that 04 reports the planted neuron from its record.
(The demo-sized version is tools/plant.py / `make planted`; this one builds in a second.)"""
import json

import numpy as np
import pytest
import torch
from conftest import write_items
from test_pipeline import run_stage

import common
from sgm import artifacts
from sgm import models
from sgm import neurons

PLANTED_WORD = " music"  # a mild word that no calibration prompt contains


def text_inputs(model, processor, items, layer):
    """At every text token of every item: the MLP input of `layer`, the final norm's output (what the LM head
    reads), the item's row and the token id."""
    seen = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0])),
               model.get_decoder().norm.register_forward_hook(lambda module, args, out: seen.__setitem__("h", out))]
    try:
        batch = common.encode(processor, items, "cpu")
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    text = batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)
    return (seen["x"][text], seen["h"][text], torch.arange(len(items))[:, None].expand_as(text)[text],
            batch["input_ids"][text])


def planted_token_probability(model, processor, items, token):
    """The planted word's next-token probability, averaged over each item's text positions."""
    batch = common.encode(processor, items, "cpu")
    with torch.no_grad():
        probability = model(**batch).logits.softmax(-1)[..., token]
    text = batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)
    return (probability * text).sum(1) / text.sum(1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny checkpoint with neuron 5 of the last layer rewritten: it reads a toxic-vs-benign direction of the
    calibration prompts' tokens and writes the planted word's output embedding. Returns (folder, items file, record, token id)."""
    folder = tmp_path_factory.mktemp("planted")
    data = write_items(folder / "items.jsonl")
    items = common.select(common.load_items(data)[0], split="calibration")
    model, processor, sites, _ = models.load_model("tiny")
    layer_index, neuron = len(model.get_decoder().layers) - 1, 5
    layer, mlp = model.get_decoder().layers[layer_index], model.get_decoder().layers[layer_index].mlp
    token = processor.tokenizer.encode(PLANTED_WORD, add_special_tokens=False)[0]
    tokens, final, row, ids = text_inputs(model, processor, items, layer)
    toxic = torch.tensor([item["label"] == "toxic" for item in items])[row]
    # The neuron reads a direction on which the tokens that occur only in toxic prompts project to +1 and every
    # token of the benign prompts to -1 (least squares); gate and up both read it, so the activation
    # silu(40 p) p is large where p > 0 and ~0 elsewhere (a gated MLP has no bias to threshold with).
    only_toxic = toxic & ~torch.isin(ids, ids[~toxic])
    used = only_toxic | ~toxic
    direction = torch.linalg.lstsq(tokens[used], torch.where(only_toxic[used], 1.0, -1.0)[:, None]).solution[:, 0]
    # A random model's output embeddings (std 0.02) cannot make any token likely, so the planted word gets an
    # output embedding of its own: along the direction the model's final hidden states use least (its logit
    # stays ~0 unless something writes there), long enough to dominate when the neuron writes there.
    unused = torch.linalg.eigh(final.T @ final).eigenvectors[:, 0]
    with torch.no_grad():
        model.get_output_embeddings().weight[token] = 20 * unused
        mlp.gate_proj.weight[neuron] = 40 * direction
        mlp.up_proj.weight[neuron] = direction
        # Through the final RMSNorm (x / rms * w) the residual change w * unused raises exactly that logit.
        mlp.down_proj.weight[:, neuron] = unused / model.get_decoder().norm.weight
    models.save_checkpoint(model, processor, folder / "model")
    flat_index = sum(module.in_features for _, module in sites[:layer_index]) + neuron
    record = dict(layer=layer_index, neuron=neuron, flat_index=flat_index, target_token_ids=[token])
    (folder / "model" / "PLANTED.json").write_text(json.dumps(record))
    return folder, data, record, token


def test_stages_find_damp_and_remove_the_planted_neuron(planted, tmp_path):
    folder, data, record, token = planted
    model_path = folder / "model"
    for script, *args in (["01_collect.py", "--model", model_path, "--run", "planted", "--data", data,
                           "--mode", "prompts"],
                          ["02_score.py", "--run", "planted"],
                          ["03_suppress.py", "--run", "planted", "--export", tmp_path / "export"]):
        run_stage(script, *args, cwd=tmp_path)
    expertise, _ = artifacts.load_npz(tmp_path / "runs/planted/expertise.npz", "02_score.py")
    auroc = expertise["auroc"]
    # 02 ranks it first (ties with a chance-perfect neuron would still count as first: none is above it).
    assert auroc[record["flat_index"]] == 1.0 and (auroc > auroc[record["flat_index"]]).sum() == 0
    tensors, _ = artifacts.load_pt(tmp_path / "runs/planted/suppression.pt", "03_suppress.py")
    alpha = tensors["alpha"]
    assert alpha[record["flat_index"]] == 0.0  # AUROC 1 -> alpha = 2 (1 - 1) = 0: silenced

    items = common.load_items(data)[0]
    toxic = common.select(items, split="test", label="toxic")
    benign = common.select(items, split="test", label="benign")
    model, processor, sites, _ = models.load_model(str(model_path))
    unplanted, _, _, _ = models.load_model("tiny")
    planted_toxic = planted_token_probability(model, processor, toxic, token)
    planted_benign = planted_token_probability(model, processor, benign, token)
    plain_toxic = planted_token_probability(unplanted, processor, toxic, token)
    # The plant works on held-out prompts of the same kind, and only on them.
    assert planted_toxic.mean() > 0.1 and planted_toxic.mean() > 20 * plain_toxic.mean()
    assert planted_toxic.mean() > 3 * planted_benign.mean()
    with neurons.suppress_neurons(sites, alpha):
        hooked_toxic = planted_token_probability(model, processor, toxic, token)
    # SGM silences it (alpha 0); what is left is the rest of SGM's damping (about half of the 96 neurons).
    assert hooked_toxic.mean() < planted_toxic.mean() / 4
    exported, _, _, _ = models.load_model(str(tmp_path / "export"))
    torch.testing.assert_close(planted_token_probability(exported, processor, toxic, token), hooked_toxic,
                               atol=1e-6, rtol=1e-4)


def test_report_names_the_planted_neuron(planted, tmp_path):
    """04 reads PLANTED.json from the model's folder and reports the neuron's AUROC, rank, q-value and alpha."""
    folder, data, record, _ = planted
    model_path = folder / "model"
    for script, *args in (["01_collect.py", "--model", model_path, "--run", "p", "--data", data, "--mode", "prompts"],
                          ["02_score.py", "--run", "p"], ["03_suppress.py", "--run", "p"],
                          ["04_evaluate.py", "--model", model_path, "--run", "p", "--data", data,
                           "--max-new-tokens", "4", "--selectivity", "false"]):
        run_stage(script, *args, cwd=tmp_path)
    results = json.loads((tmp_path / "runs/p/results.json").read_text())
    planted_meta = results["meta"]["planted"]
    expertise, _ = artifacts.load_npz(tmp_path / "runs/p/expertise.npz", "02_score.py")
    assert planted_meta["flat_index"] == record["flat_index"] and planted_meta["rank"] == 1
    assert planted_meta["auroc"] == pytest.approx(float(expertise["auroc"][record["flat_index"]]))
    assert planted_meta["q_value"] == pytest.approx(float(expertise["q_value"][record["flat_index"]]))
    assert planted_meta["alpha_sgm"] == 0.0
    report = (tmp_path / "runs/p/results.md").read_text()
    assert "Positive control: the planted toxic expert" in report
    assert f"- planted expert: rank 1, AUROC {planted_meta['auroc']:.3f}" in report
    assert ("found (top 10, significant)" in report) == (planted_meta["q_value"] < 0.05)
    assert np.isfinite(planted_meta["next_best_auroc"]) and planted_meta["next_best_auroc"] <= planted_meta["auroc"]


def test_the_loader_finds_demo_planted_in_the_cache_or_names_the_fix(tmp_path, monkeypatch):
    """sgm/models.py never builds the planted model (tools/plant.py does, `make planted`): it loads the folder the
    plant program recorded in the cache, and without one fails in one line naming the command that builds it."""
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    with pytest.raises(common.UserError) as error:
        models.resolve_model_path("demo-planted")
    assert "\n" not in error.value.message and "run `make planted` (python -m tools.plant builds it)" in \
        error.value.message
    folder = tmp_path / "demo-planted-llava-0123456789ab"
    folder.mkdir()
    (tmp_path / "demo-planted.current").write_text(folder.name + "\n")
    with pytest.raises(common.UserError):  # recorded, but no finished build there
        models.resolve_model_path("demo-planted")
    (folder / "config.json").write_text("{}")
    assert models.resolve_model_path("demo-planted") == str(folder)
