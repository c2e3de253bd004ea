"""Mixture-of-experts language models (Qwen3-VL-MoE, GLM-4.5V): a neuron is (layer, expert, index), the input of
that expert's down projection (neurons.FusedExperts). transformers 5.x fuses the experts into 3-D parameters, so
there is no per-expert module to hook: recording recomputes the routed activations from the experts module's
inputs, and damping scales down_proj in place and restores it on exit. Everything here is checked against
values computed by hand from the weights, and against the baked weights (fold_alpha / 03 --export)."""
import numpy as np
import pytest
import torch
from test_families import BUILDERS, EXPERT_WIDTH, HIDDEN, INTERMEDIATE, ITEMS, MOE_FAMILIES, N_EXPERTS

from common import UserError, encode
from sgm.artifacts import load_pt
from sgm.models import load_model
from sgm.neurons import FusedExperts, fold_alpha, neuron_sites, neurons_per_layer, record_neurons, suppress_neurons

# GLM's processor builds its token types in a way numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family(request, tmp_path_factory):
    """(family name, checkpoint folder), built once per test session."""
    out_dir = tmp_path_factory.mktemp(request.param) / "checkpoint"
    BUILDERS[request.param](out_dir)
    return request.param, out_dir


def moe_blocks(model):
    """The decoder layers' MoE blocks (the module holding the router `gate` and the fused `experts`)."""
    return [layer.mlp for layer in model.get_decoder().layers if hasattr(layer.mlp, "experts")]


def routed_by_hand(block, x):
    """Every expert's neurons on every token (tokens x experts x I), 0 where the router did not choose the
    expert, from the weights: the router's top-k (softmax for Qwen, sigmoid + correction bias for GLM) and
    act(x W_gate^T) * (x W_up^T) per expert."""
    gate, experts = block.gate, block.experts
    logits = x.float() @ gate.weight.float().T
    if hasattr(gate, "e_score_correction_bias"):
        choice = logits.sigmoid() + gate.e_score_correction_bias
    else:
        choice = logits.softmax(-1)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, choice.topk(gate.top_k, dim=-1).indices, True)
    width = experts.down_proj.shape[2]
    w_gate, w_up = experts.gate_up_proj[:, :width], experts.gate_up_proj[:, width:]
    act = torch.nn.functional.silu(torch.einsum("th,eih->tei", x, w_gate)) * torch.einsum("th,eih->tei", x, w_up)
    return act * chosen[..., None]


def test_sites_cover_every_layer_with_routed_and_shared_experts(family):
    name, path = family
    model, _, sites, meta = load_model(str(path))
    layers = model.get_decoder().layers
    kinds = [(site_name.split(".layers.")[1], type(site).__name__, site.in_features) for site_name, site in sites]
    if name == "qwen3_vl_moe":
        assert kinds == [(f"{i}.mlp.experts.down_proj", "FusedExperts", N_EXPERTS * EXPERT_WIDTH)
                         for i in range(len(layers))]
    else:  # layer 0 dense, then routed experts and the shared expert in every MoE layer
        assert kinds == [("0.mlp.down_proj", "Linear", INTERMEDIATE)] + [
            entry for i in range(1, len(layers)) for entry in
            [(f"{i}.mlp.experts.down_proj", "FusedExperts", N_EXPERTS * EXPERT_WIDTH),
             (f"{i}.mlp.shared_experts.down_proj", "Linear", EXPERT_WIDTH)]]
    assert meta["sites"] == [[site_name, site.in_features] for site_name, site in sites]
    # per decoder layer (02's table, 03's --layers and --normalise layer): routed and shared experts together
    moe_layer = N_EXPERTS * EXPERT_WIDTH + (EXPERT_WIDTH if name == "glm4v_moe" else 0)
    expected = [INTERMEDIATE, moe_layer, moe_layer] if name == "glm4v_moe" else [moe_layer] * len(layers)
    assert neurons_per_layer(meta["sites"]) == expected


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_recorded_neurons_equal_a_reference_computed_from_the_weights(family, pooling):
    _, path = family
    model, processor, sites, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    blocks = moe_blocks(model)
    inputs = {}
    handles = [block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i, block in enumerate(blocks)]
    mask = batch["attention_mask"].bool() & (torch.arange(batch["input_ids"].shape[1]) % 3 != 0)  # some positions
    with torch.no_grad(), record_neurons(sites, pooling) as recorder:
        recorder.mask = mask
        model(**batch)
        recorded = recorder.pop()
    for handle in handles:
        handle.remove()
    expert_sites = [i for i, (_, site) in enumerate(sites) if isinstance(site, FusedExperts)]
    offsets = np.cumsum([0] + [site.in_features for _, site in sites])
    routed_somewhere_not_everywhere = False
    with torch.no_grad():
        for block_number, site_index in enumerate(expert_sites):
            x = inputs[block_number]
            per_token = routed_by_hand(blocks[block_number], x.reshape(-1, x.shape[-1]))
            per_token = per_token.reshape(*mask.shape, -1)  # rows x positions x (experts * I)
            if pooling == "mean":
                expected = (per_token * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:
                expected = per_token.masked_fill(~mask[..., None], float("-inf")).amax(1)
            got = recorded[:, offsets[site_index]:offsets[site_index + 1]]
            np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
            nonzero = (per_token != 0).reshape(*mask.shape, N_EXPERTS, -1).any(-1)[mask]  # pooled tokens x experts
            routed_somewhere_not_everywhere |= bool((nonzero.any(0) & ~nonzero.all(0)).any())
    assert routed_somewhere_not_everywhere  # the zeros of unrouted tokens were part of what was checked


def test_damping_equals_a_hand_computed_expert_output_and_the_baked_weights(family):
    """suppress_neurons on a fused expert = the expert's output computed by hand with its neurons scaled
    = fold_alpha's baked weights; the weights are bit-identical after the context exits (also on error),
    and the router sees the same input and chooses the same experts in the first MoE layer."""
    _, path = family
    model, processor, sites, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    n = sum(site.in_features for _, site in sites)
    alpha = torch.ones(n)
    expert_site = next(i for i, (_, site) in enumerate(sites) if isinstance(site, FusedExperts))
    start = sum(site.in_features for _, site in sites[:expert_site])
    alpha[start:start + N_EXPERTS * EXPERT_WIDTH] = torch.rand(N_EXPERTS * EXPERT_WIDTH,
                                                               generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    block = moe_blocks(model)[0]
    seen = {}
    handles = [block.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])),
               block.experts.register_forward_hook(lambda m, args, out: seen.__setitem__("experts", out)),
               block.gate.register_forward_hook(lambda m, args, out: seen.__setitem__("route", out[2]))]
    with torch.no_grad():
        base = model(**batch).logits
        base_route = seen["route"].clone()
        with suppress_neurons(sites, alpha):
            hooked = model(**batch).logits
        x = seen["x"].reshape(-1, HIDDEN)
        scaled = routed_by_hand(block, x) * alpha[start:start + N_EXPERTS * EXPERT_WIDTH].view(N_EXPERTS, -1)
        weights = torch.zeros(x.shape[0], N_EXPERTS).scatter_(1, seen["route"], block.gate(x)[1])
        by_hand = torch.einsum("tei,ehi,te->th", scaled, block.experts.down_proj, weights)
        torch.testing.assert_close(seen["experts"], by_hand, rtol=1e-5, atol=1e-6)
        assert torch.equal(seen["route"], base_route)  # the first MoE layer's input is unchanged: same experts
        for handle in handles:
            handle.remove()
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit
        with pytest.raises(RuntimeError):
            with suppress_neurons(sites, alpha):
                raise RuntimeError("interrupted")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        fold_alpha(sites, alpha)
        folded = model(**batch).logits
    assert not torch.allclose(base, hooked)
    assert torch.equal(folded, hooked)  # the same product in the same place: identical, not just close


def test_a_decoder_layer_without_readable_neurons_is_refused_naming_it(family):
    """GLM-4.5V used to "succeed" reading only its dense first layer: every layer must be covered."""
    _, path = family
    model, _, _, _ = load_model(str(path))
    layers = model.get_decoder().layers
    layers[1].mlp = torch.nn.Sequential()
    layers[1].mlp.add_module("fc1", torch.nn.Linear(HIDDEN, 8))
    layers[1].mlp.add_module("fc2", torch.nn.Linear(8, HIDDEN))
    with pytest.raises(UserError, match=rf"decoder layer\(s\) \[1\] of {len(layers)}"):
        neuron_sites(model)


def test_layers_option_selects_decoder_layers_not_sites(tmp_path):
    """GLM-4.5V has two sites per MoE layer (routed experts, shared expert): 03 --layers 1:2 changes neurons of
    decoder layer 1 only, both its sites, and the export card counts decoder layers."""
    from conftest import write_items
    from test_pipeline import run_stage
    path = tmp_path / "glm"
    BUILDERS["glm4v_moe"](path)
    data = write_items(tmp_path / "items.jsonl", n_per_label=4)
    run_stage("01_collect.py", "--model", path, "--run", "r", "--data", data, "--mode", "prompts", cwd=tmp_path)
    run_stage("02_score.py", "--run", "r", cwd=tmp_path)
    run_stage("03_suppress.py", "--run", "r", "--layers", "1:2", "--method", "det0", "--top-k", "200",
              "--export", tmp_path / "export", cwd=tmp_path)
    tensors, meta = load_pt(tmp_path / "runs/r/suppression.pt", "")
    alpha = tensors["alpha"]
    start = INTERMEDIATE  # layer 0 is the dense MLP
    layer1 = slice(start, start + N_EXPERTS * EXPERT_WIDTH + EXPERT_WIDTH)
    outside = torch.cat([alpha[:layer1.start], alpha[layer1.stop:]])
    assert (outside == 1).all()
    assert (alpha[start:start + N_EXPERTS * EXPERT_WIDTH] == 0).any()  # routed experts of layer 1
    assert (alpha[layer1.stop - EXPERT_WIDTH:layer1.stop] == 0).any()  # its shared expert
    assert "in 1 of 3 decoder layers" in (tmp_path / "export/SGM_EXPORT.md").read_text()


def test_offloaded_experts_are_refused_in_one_line(family):
    """Experts whose weights accelerate keeps off the device (disk offload: meta tensors until their own forward)
    can be neither recorded nor damped in place: one line each, not a meta-tensor traceback."""
    _, path = family
    model, processor, sites, _ = load_model(str(path))
    experts = moe_blocks(model)[0].experts
    for name in ("gate_up_proj", "down_proj"):
        setattr(experts, name, torch.nn.Parameter(getattr(experts, name).to("meta"), requires_grad=False))
    batch = encode(processor, ITEMS, "cpu")
    with pytest.raises(UserError, match="cannot record the routed neurons of offloaded experts"):
        with torch.no_grad(), record_neurons(sites) as recorder:
            recorder.mask = batch["attention_mask"].bool()
            model(**batch)
    with pytest.raises(UserError, match="cannot damp .*offloaded"):
        with suppress_neurons(sites, torch.full((sum(s.in_features for _, s in sites),), 0.5)):
            pass


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_is_recorded_and_damped_the_same(family, implementation):
    """transformers runs fused experts through one of several kernels (grouped_mm by default, also on CPU here);
    recording reads the module's inputs and weights, damping changes the weights, so neither depends on which:
    the recorded neurons and the damped logits equal the default kernel's, and damped = baked."""
    _, path = family
    reference, processor, sites, _ = load_model(str(path))
    model, _, model_sites, _ = load_model(str(path))
    model.set_experts_implementation(implementation)
    batch = encode(processor, ITEMS, "cpu")
    n = sum(site.in_features for _, site in sites)
    alpha = torch.rand(n, generator=torch.Generator().manual_seed(1))
    outputs = []
    for net, net_sites in ((reference, sites), (model, model_sites)):
        with torch.no_grad(), record_neurons(net_sites) as recorder:
            recorder.mask = batch["attention_mask"].bool()
            net(**batch)
            pooled = recorder.pop()
        with torch.no_grad(), suppress_neurons(net_sites, alpha):
            outputs.append((pooled, net(**batch).logits))
    np.testing.assert_allclose(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-5, atol=1e-5)
    fold_alpha(model_sites, alpha)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, outputs[1][1], rtol=1e-5, atol=1e-5)
