"""Neurons: which units of the language model are SGM's neurons, and the hooks that read and damp them.

A neuron is one coordinate of the input of an MLP's down projection in the language model: in a dense MLP (and
a mixture-of-experts layer's shared expert), the input of `down_proj`; among routed experts, the input of one
expert's down projection, so a neuron there is (layer, expert, index) (FusedExperts). Used by 01 (recording),
03 (--export), 04 (damping), tools/plant.py, tools/tune.py and tools/bench.py.
"""
import re
from contextlib import contextmanager

import torch

from common import fail

# model: in a dense MLP, the input of `down_proj`; in a mixture-of-experts layer, the input of one expert's
# down projection, so a neuron there is (layer, expert, index) (see FusedExperts).

class FusedExperts:
    """The routed experts of one mixture-of-experts layer, as a neuron site.

    transformers 5.x stores them fused: `experts.gate_up_proj` (experts x 2*I x hidden) and `experts.down_proj`
    (experts x hidden x I; transposed in some families), with no per-expert down_proj module to hook. The site
    has experts x I neurons; neuron e*I + m is the m-th input of expert e's down projection, i.e.
    act(gate_e x) * (up_e x) before the router's weight multiplies the expert's output.

    What a routed neuron is on a token the router did not send to its expert: 0, because the expert
    contributes nothing there. Pooling runs over the same positions as for dense models, so how often an
    expert is chosen is part of its neurons' signal (a neuron whose expert never sees toxic tokens has mean 0
    there). Alternatives, not implemented: pool only over routed tokens (the neuron's response given
    routing, blind to routing itself), or score the router's logits per expert as their own "neurons".
    Shared experts (GLM-4.5V's `shared_experts`) are plain MLPs on every token: ordinary down_proj sites.

    Recording recomputes the routed activations in a hook on the experts module, from the inputs the router
    gave it (hidden states, chosen experts), with the model's own gating function; damping scales down_proj's
    columns per expert in place and restores the exact original values on exit (suppress_neurons). The router
    is never touched: damping changes which experts are chosen only through the residual stream it changes."""

    def __init__(self, experts):
        down = experts.down_proj
        if getattr(experts, "has_bias", False) or not hasattr(experts, "_apply_gate") or down.dim() != 3:
            fail(f"cannot read the routed neurons of {type(experts).__name__}: neurons.FusedExperts expects "
                 "transformers' fused experts (3-D gate_up_proj and down_proj, no biases, _apply_gate); add a "
                 "rule for this layout there")
        self.experts, self.transposed = experts, bool(getattr(experts, "is_transposed", False))
        self.n_experts = down.shape[0]
        self.width = down.shape[1] if self.transposed else down.shape[2]  # I: one expert's neurons
        self.in_features = self.n_experts * self.width

    def columns(self):
        """down_proj as (experts, I, hidden): row [e, m] is what neuron (e, m) writes (a view, not a copy)."""
        down = self.experts.down_proj
        return down if self.transposed else down.transpose(1, 2)

    def routed(self, hidden, top_k_index):
        """(expert, token indices, activations tokens x I) for each expert some token was routed to; exactly
        the values the experts' forward feeds into down_proj (same weights, dtype and gating function)."""
        experts = self.experts
        if experts.gate_up_proj.is_meta:  # accelerate's offload loads them only inside the module's own forward
            fail("cannot record the routed neurons of offloaded experts (device_map put their weights on disk or "
                 "CPU offload): give the model enough GPU/CPU memory for --device auto")
        for expert in torch.unique(top_k_index).tolist():
            if expert >= self.n_experts:  # some implementations mark padding or remote experts past the end
                continue
            tokens = (top_k_index == expert).any(-1).nonzero().squeeze(1)
            gate_up = experts.gate_up_proj[expert]
            x = hidden[tokens].to(gate_up.device)  # the same device unless a device_map split the layer
            activations = experts._apply_gate(x @ gate_up if self.transposed else x @ gate_up.T)
            yield expert, tokens, activations.to(hidden.device)


def neuron_sites(model):
    """[(qualified name, site)] of the language model's decoder layers, in layer order. A site is a down_proj
    Linear (dense MLPs, shared experts) or FusedExperts (routed experts); each has `in_features` neurons.

    The language model is found from the structure (`get_decoder()`), so the vision tower's MLPs are never
    included even when they also name a layer `down_proj` (Qwen2.5-VL's vision blocks do). Every decoder layer
    must have at least one site, or this fails naming the layers it cannot read: a model whose layers are only
    partly covered never runs quietly. Families: LLaVA, LLaVA-NeXT/OneVision, Qwen2/2.5/3-VL, Idefics3/SmolVLM,
    PaliGemma, Gemma 3, InternVL3, Llama-3.2-Vision, and the mixture-of-experts Qwen3-VL-MoE and GLM-4.5V
    (routed experts + shared experts; GLM's first layers are dense).

    Llama-3.2-Vision (mllama) interleaves cross-attention decoder layers (every 5th) with self-attention ones;
    each has its own MLP, and all of them are neuron sites, one per decoder layer as for every family. A
    cross-attention layer's MLP reads the residual stream right after that layer has attended to the image
    features (gated by tanh(cross_attn_mlp_gate)), so it is post-fusion in the paper's sense, and it is where
    Llama-3.2-Vision's image information first enters the text positions; leaving it out would skip the very
    layers that fuse the image. (Positions before the image token have their cross-attention MLP output
    masked to zero by the model, so damping acts only from the image on; their activations are still pooled.)"""
    language_model = model.get_decoder()
    layers = getattr(language_model, "layers", None)
    if language_model is model or not isinstance(layers, torch.nn.ModuleList):
        fail(f"cannot find the language model's decoder layers in {type(model).__name__}: neurons.neuron_sites "
             "expects model.get_decoder().layers; add a rule there for this family")
    names = {module: name for name, module in model.named_modules()}
    sites, unread = [], []
    for number, layer in enumerate(layers):
        found = []
        for name, module in layer.named_modules():
            parts = name.split(".")
            if "mlp" not in parts:
                continue
            if parts[-1] == "down_proj" and isinstance(module, torch.nn.Linear):
                found.append((names[module], module))  # a dense MLP, or a shared expert
            elif isinstance(getattr(module, "down_proj", None), torch.nn.Parameter) and hasattr(module, "gate_up_proj"):
                found.append((names[module] + ".down_proj", FusedExperts(module)))
        sites += found
        if not found:
            unread.append(number)
    if unread:
        fail(f"cannot find the MLP neurons of decoder layer(s) {unread} of {len(layers)} in {type(model).__name__}: "
             "neurons.neuron_sites looks for Linear layers named `down_proj` under each layer's `mlp` and for fused "
             "experts (3-D down_proj); add a rule there that returns, per decoder layer, the layer whose input is "
             "the MLP's hidden activation (e.g. `fc2` in OPT)")
    return sites


def decoder_layer(site_name):
    """The decoder layer of a site, from its name (model.language_model.layers.7.mlp.experts.down_proj -> 7)."""
    found = re.search(r"\.layers\.(\d+)\.", site_name)
    if not found:
        fail(f"cannot tell the decoder layer of neuron site {site_name!r}: neurons.decoder_layer expects "
             "'.layers.<n>.' in its name; extend it for this family")
    return int(found.group(1))


def neurons_per_layer(site_sizes):
    """[(site name, neurons)] -> neurons per decoder layer, in layer order: a mixture-of-experts layer's routed
    experts and shared expert count together (per-layer tables, 03's --layers and --normalise layer)."""
    layers = [decoder_layer(name) for name, _ in site_sizes]
    if layers != sorted(layers):
        fail("neuron sites are not in decoder-layer order: rerun 01_collect.py with this version")
    return [sum(size for (_, size), at in zip(site_sizes, layers) if at == layer) for layer in sorted(set(layers))]


def split_by_site(flat, sites):
    """A flat per-neuron vector (all sites concatenated in order) -> one tensor per site."""
    sizes = [module.in_features for _, module in sites]
    if flat.numel() != sum(sizes):
        fail(f"alpha has {flat.numel()} neurons but the model has {sum(sizes)} "
             f"({len(sizes)} layers): rerun 03_suppress.py for this model")
    return list(torch.split(flat, sizes))


class NeuronRecorder:
    """Pools each neuron over the positions in `mask` inside the hook, so per-token activations are never
    kept. Set `mask` (batch x positions, bool) before each forward; read `pop()` after it. While `mask` is
    None the hooks record nothing (e.g. during generation)."""

    def __init__(self, sites, pooling):
        if pooling not in ("mean", "max"):
            fail(f"unknown pooling {pooling!r}; use mean or max")
        self.site_names = [name for name, _ in sites]
        self.pooling, self.mask, self.pooled = pooling, None, {}

    def linear_hook(self, index, module, args):
        """A down_proj Linear: its input, batch x positions x neurons."""
        if self.mask is None:
            return
        x = args[0]
        mask = self.mask.to(x.device)
        if self.pooling == "mean":
            summed = torch.einsum("bti,bt->bi", x.float(), mask.float())
            pooled = summed / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            pooled = x.float().masked_fill(~mask[..., None], float("-inf")).amax(1)
        self.store(index, pooled)

    def experts_hook(self, index, site, args, kwargs):
        """Fused experts (FusedExperts): their input is the flattened hidden states (batch*positions x hidden)
        and the experts the router chose per token; each expert's neurons are recomputed on the tokens routed
        to it and are 0 on the others."""
        if self.mask is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        mask = self.mask.to(hidden.device)
        n_rows, n_positions = mask.shape
        if hidden.shape[0] != mask.numel():
            fail(f"{self.site_names[index]} saw {hidden.shape[0]} tokens for a {n_rows} x {n_positions} mask: "
                 "the experts module must get the batch flattened in order (neurons.FusedExperts)")
        flat_mask = mask.reshape(-1)
        n_pooled = mask.sum(1)
        if self.pooling == "mean":
            pooled = torch.zeros(n_rows, site.n_experts, site.width, device=hidden.device)
        else:
            pooled = torch.full((n_rows, site.n_experts, site.width), float("-inf"), device=hidden.device)
            n_routed = torch.zeros(n_rows, site.n_experts, device=hidden.device)
        for expert, tokens, activations in site.routed(hidden, top_k_index):
            keep = flat_mask[tokens]
            rows, activations = tokens[keep] // n_positions, activations[keep].float()
            if self.pooling == "mean":
                pooled[:, expert].index_add_(0, rows, activations)
            else:
                pooled[:, expert].scatter_reduce_(0, rows[:, None].expand_as(activations), activations, "amax")
                n_routed[:, expert].index_add_(0, rows, torch.ones_like(rows, dtype=n_routed.dtype))
        if self.pooling == "mean":
            pooled = pooled.reshape(n_rows, -1) / n_pooled[:, None].clamp(min=1)
        else:  # an expert that missed some pooled position was 0 there
            missed = n_routed < n_pooled[:, None]
            pooled = torch.where(missed[..., None], pooled.clamp(min=0), pooled).reshape(n_rows, -1)
        self.store(index, pooled)

    def store(self, index, pooled):
        if not torch.isfinite(pooled).all():
            fail(f"non-finite activations at {self.site_names[index]} (NaN/inf): try --dtype float32, "
                 "or check that every item has at least one pooled position")
        self.pooled[index] = pooled.detach().cpu()  # detach: 01's writer pass records with gradients on

    def pop(self):
        out = torch.cat([self.pooled[i] for i in range(len(self.site_names))], dim=1)
        self.pooled = {}
        return out.numpy()


@contextmanager
def record_neurons(sites, pooling="mean"):
    recorder = NeuronRecorder(sites, pooling)
    handles = []
    try:
        for index, (_, site) in enumerate(sites):
            if isinstance(site, FusedExperts):
                handles.append(site.experts.register_forward_pre_hook(
                    lambda module, args, kwargs, index=index, site=site: recorder.experts_hook(index, site, args,
                                                                                               kwargs),
                    with_kwargs=True))
            else:
                handles.append(site.register_forward_pre_hook(
                    lambda module, args, index=index: recorder.linear_hook(index, module, args)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


class WriteRecorder:
    """What each neuron writes, by attribution patching (Nanda 2023; AtP*, Kramar et al. 2024): for an objective
    f computed per row from the model's logits, the neuron's contribution on that row is
        c_m = sum over the row's real positions t of  a_m(t) * df/da_m(t),
    the first-order change of f if the neuron were silenced on every position of that row is -c_m (f is linear
    in a_m's scale s at first order: c_m = df/ds at s = 1). Rows in a batch are independent sequences, so one
    backward pass of sum_rows f gives every row's gradients.

    How: the input embeddings' output is made a leaf that requires grad (no weight gets a gradient), so every
    neuron's activation is in the autograd graph; a tensor hook on each down_proj input pools a * grad * mask
    over positions as the backward pass reaches it, so per-position gradients are never kept (memory: the
    autograd graph of one batch, as in training, plus rows x neurons pooled). Routed experts (FusedExperts)
    have no per-expert tensor: their neurons are recomputed from the experts module's inputs (as in
    NeuronRecorder) and their gradient is the router weight times the gradient at the experts' output read
    through that expert's down projection; the router's choice is held fixed, as a silenced neuron does not
    change the layer's own routing. Set `mask` (real positions, batch x positions) before the forward; call
    attribute(objective) after it; None outside a writer pass (e.g. during generation)."""

    def __init__(self, sites):
        self.sites, self.mask, self.pooled = sites, None, {}

    def linear_hook(self, index, args):
        if self.mask is None or not torch.is_grad_enabled():
            return
        x, mask = args[0], self.mask.to(args[0].device)
        wide = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 pooled in float32 (float64 stays)
        # The hook holds a detached alias of x, never x itself: x -> its hook -> x would be a reference cycle that
        # only Python's cyclic GC frees, and each micro-batch's down_proj inputs piled up until it ran (+90 MB per
        # micro-batch on the demo, 3.4 GB by the end of the writer calibration; tests/test_neurons.py checks).
        seen = x.detach()
        x.register_hook(lambda grad: self.store(index, torch.einsum("bti,bti,bt->bi", seen.to(wide), grad.to(wide),
                                                                      mask.to(wide))))

    def experts_hook(self, index, site, args, kwargs, output):
        if self.mask is None or not torch.is_grad_enabled():
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        top_k_weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        # detached: the hook below must not hold the graph (see linear_hook)
        hidden, top_k_weights = hidden.detach(), top_k_weights.detach()
        flat_mask = self.mask.to(hidden.device).reshape(-1)
        n_rows, n_positions = self.mask.shape

        def pool(grad_out):
            wide = torch.promote_types(grad_out.dtype, torch.float32)
            pooled = torch.zeros(n_rows, site.n_experts, site.width, device=hidden.device, dtype=wide)
            columns = site.columns()  # (experts, I, hidden): row [e, m] is what neuron (e, m) writes
            with torch.no_grad():
                for expert, tokens, activations in site.routed(hidden.detach(), top_k_index):
                    keep = flat_mask[tokens]
                    tokens, activations = tokens[keep], activations[keep].to(wide)
                    weight = (top_k_weights[tokens] * (top_k_index[tokens] == expert)).sum(-1).to(wide)
                    grad = (grad_out[tokens].to(wide) @ columns[expert].to(grad_out.device, wide).T) * weight[:, None]
                    pooled[:, expert].index_add_(0, tokens // n_positions, activations * grad)
            self.store(index, pooled.reshape(n_rows, -1))

        output.register_hook(pool)

    def store(self, index, pooled):
        self.pooled[index] = self.pooled.get(index, 0) + pooled.detach().cpu()

    def attribute(self, objective, grad=None):
        """Backward of `objective` (one value per row; or any tensor of the graph with its `grad`, as
        models.writer_pass gives the final hidden states); returns rows x neurons (numpy) of sum_t a * grad."""
        if grad is None:
            objective = objective.sum()
        torch.autograd.backward(objective, grad, inputs=[self.leaf])
        self.leaf.grad = None
        missing = [self.sites[i][0] for i in range(len(self.sites)) if i not in self.pooled]
        if missing:
            fail(f"no gradient reached {missing[0]} (and {len(missing) - 1} more sites): the objective does not "
                 "depend on them through the logits; check that the writer pass runs the model's LM head")
        out = torch.cat([self.pooled[i] for i in range(len(self.sites))], dim=1)
        self.pooled = {}
        if not torch.isfinite(out).all():
            fail("non-finite writer attributions (NaN/inf): try --dtype float32")
        return out.numpy()

    def make_leaf(self, module, args, output):
        """Forward hook on the input embeddings: their output becomes the graph's leaf (see the class doc)."""
        if self.mask is None or not torch.is_grad_enabled():
            return None
        self.leaf = output.detach().requires_grad_(True)
        return self.leaf


WRITER_OBJECTIVES = ("toxic-odds", "own-logprob")
# The expertise scores 02_score.py stores and 03_suppress.py damps by: name -> its array in expertise.npz
# (activation AUROC: what a neuron reads; writer d and its Welch t: what it writes, from 01 --writer).
EXPERTISE_SCORES = {"activation": "auroc", "writer": "writer", "writer-t": "writer_t"}


def writer_per_position(kind, logits, toxic_ids=None, targets=None):
    """The writer objective at each position whose logits (... x V) are given (same leading shape out):
      toxic-odds   log(p_toxic / (1 - p_toxic)), p_toxic = sum_{v in toxic_ids} p(v | context): the log-odds
                   that the next token is a flagged word. Log-odds, not log p_toxic: the gradient of log p_toxic
                   vanishes as p_toxic -> 1, so a neuron that already makes a flagged word near-certain (the
                   strongest writer) would get the smallest first-order write; the log-odds' gradient (softmax
                   within the flagged words minus softmax within the others) does not saturate at either end.
                   Where p_toxic is small, as on most text, the two are the same to O(p_toxic).
      own-logprob  log p(targets): the probability of the tokens that were written (ids, the leading shape)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> float32; float64 stays
    if kind == "toxic-odds":
        flagged = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        flagged[toxic_ids.to(logits.device)] = True
        return (torch.logsumexp(logits[..., flagged], -1)
                - torch.logsumexp(logits.masked_fill(flagged, float("-inf")), -1))
    if kind == "own-logprob":
        return torch.log_softmax(logits, -1).gather(-1, targets[..., None].to(logits.device)).squeeze(-1)
    fail(f"unknown writer objective {kind!r}; use one of {', '.join(WRITER_OBJECTIVES)}")


def writer_objective(kind, logits, positions, toxic_ids=None, targets=None):
    """The writer objective per row (01_collect.py --writer; 02's ablation check): the mean of
    writer_per_position over the row's `positions` (batch x T, bool), from full logits batch x T x V.
    (models.writer_pass computes the same with the LM head a chunk of positions at a time.)"""
    per_position = writer_per_position(kind, logits, toxic_ids, targets)
    weights = positions.to(per_position.device).to(per_position.dtype)
    return (per_position * weights).sum(1) / weights.sum(1).clamp(min=1)


@contextmanager
def record_writes(model, sites):
    """A WriteRecorder hooked into `model` (its input embeddings and every site) while inside."""
    recorder = WriteRecorder(sites)
    handles = [model.get_input_embeddings().register_forward_hook(recorder.make_leaf)]
    try:
        for index, (_, site) in enumerate(sites):
            if isinstance(site, FusedExperts):
                handles.append(site.experts.register_forward_hook(
                    lambda module, args, kwargs, output, index=index, site=site: recorder.experts_hook(
                        index, site, args, kwargs, output), with_kwargs=True))
            else:
                handles.append(site.register_forward_pre_hook(
                    lambda module, args, index=index: recorder.linear_hook(index, args)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def suppress_neurons(sites, alpha, shift=None):
    """Multiply each down_proj input by alpha (flat, all sites) while inside; with `shift` (flat, as alpha: a
    transport map, 03_suppress.py --method act) set it to alpha * x + shift instead. Sites whose alpha is all
    ones (and shift all zeros) are not touched, so they cost nothing and stay bit-identical.

    A Linear gets a forward pre-hook (removed on exit, also on error): x * alpha in the activation's dtype, or,
    with a shift, (alpha * x + shift) computed in float32 and cast back (bf16/fp16 safe). Fused experts have no
    per-expert module to hook, so alpha is folded into their down_proj rows in place (the same product
    fold_alpha bakes) and the original values of the changed entries are put back on exit, bit for bit; a copy
    of those entries is held meanwhile (at most the experts' down_proj size). A routed neuron's shift is what its
    expert writes for it, W_e @ shift_e, added to the experts' output on the tokens routed to that expert,
    times the router's weight, as the expert's own output is (a routed neuron is 0 on the other tokens, and
    stays 0 there: its expert does not run)."""
    handles, saved = [], []
    shifts = [None] * len(sites) if shift is None else split_by_site(torch.as_tensor(shift).float(), sites)
    try:
        for (name, site), factor, offset in zip(sites, split_by_site(torch.as_tensor(alpha).float(), sites), shifts):
            if offset is not None and not offset.any():
                offset = None
            if torch.all(factor == 1) and offset is None:
                continue
            if isinstance(site, FusedExperts):
                columns = site.columns()
                if columns.is_meta:
                    fail(f"cannot damp {name}: its weights are offloaded (device_map put them on disk); give the "
                         "model enough GPU/CPU memory, or export with 03_suppress.py --export and serve that")
                if offset is not None:  # what each expert writes for its neurons' shifts, from the unscaled weights
                    table = torch.einsum("ei,eih->eh", offset.view(site.n_experts, site.width).to(columns.device),
                                         columns.float())
                    handles.append(site.experts.register_forward_hook(
                        lambda module, args, kwargs, output, table=table: routed_shift(table, args, kwargs, output),
                        with_kwargs=True))
                factor = factor.view(site.n_experts, site.width).to(columns.device)
                changed = factor != 1
                with torch.no_grad():
                    saved.append((columns, changed, columns[changed].clone()))
                    columns.mul_(factor.to(columns.dtype)[..., None])
                continue
            cast = {}  # alpha (and shift) in the activation's dtype (float32 with a shift) and device, made once

            def hook(module, args, factor=factor, cast=cast):
                x = args[0]
                key = (x.dtype, x.device)
                if key not in cast:
                    cast[key] = factor.to(dtype=x.dtype, device=x.device)
                return (x * cast[key],) + tuple(args[1:])

            def affine_hook(module, args, factor=factor, offset=offset, cast=cast):
                x = args[0]
                if x.device not in cast:
                    cast[x.device] = (factor.to(x.device), offset.to(x.device))
                scale, add = cast[x.device]
                return (torch.addcmul(add, x.float(), scale).to(x.dtype),) + tuple(args[1:])
            handles.append(site.register_forward_pre_hook(hook if offset is None else affine_hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for columns, changed, original in saved:
                columns[changed] = original


def routed_shift(table, args, kwargs, output):
    """The experts' output plus, per token, sum over its chosen experts e of router weight x table[e] (table:
    experts x hidden, float32); an index past the last expert (padding in some implementations) adds nothing."""
    top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    top_k_weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
    padded = torch.cat([table, table.new_zeros(1, table.shape[1])]).to(output.device)
    index = top_k_index.clamp(max=table.shape[0]).to(output.device)
    added = torch.einsum("tk,tkh->th", top_k_weights.float().to(output.device), padded[index])
    return (output.float() + added).to(output.dtype)


@torch.no_grad()
def fold_alpha(sites, alpha, shift=None):
    """Bake alpha into the weights: column m of a down_proj Linear times alpha_m (the same logits as the hooks
    without hooks); for fused experts, each expert's down projection row for its neuron m. With `shift` (a
    transport map), each down_proj Linear also gets the bias W @ shift (computed from the unscaled weight, added
    to its own bias if it has one); fused experts have no bias to hold a shift and are refused.
    (03_suppress.py --export first checks that the checkpoint's loader will read such a bias back.)"""
    shifts = [None] * len(sites) if shift is None else split_by_site(torch.as_tensor(shift).float(), sites)
    for (name, site), factor, offset in zip(sites, split_by_site(torch.as_tensor(alpha).float(), sites), shifts):
        if isinstance(site, FusedExperts):
            if offset is not None and offset.any():
                fail(f"cannot bake a transport shift into {name}: fused experts have no bias (evaluate it in "
                     "process with 04_evaluate.py instead)")
            columns = site.columns()
            columns.mul_(factor.view(site.n_experts, site.width, 1).to(columns.device, columns.dtype))
            continue
        if offset is not None and offset.any():
            written = site.weight.float() @ offset.to(site.weight.device)
            if site.bias is None:
                site.bias = torch.nn.Parameter(written.to(site.weight.dtype), requires_grad=False)
            else:
                site.bias.copy_((site.bias.float() + written).to(site.bias.dtype))
        site.weight.mul_(factor.to(site.weight.device, site.weight.dtype)[None, :])


def matched_random_control(alpha, sizes, seed):
    """SGM's alpha values shuffled across neurons within each site (`sizes`: neurons per site; a site is a
    decoder layer's MLP, or a mixture-of-experts layer's routed experts or shared expert): the same damping per
    site on random neurons, with a torch generator seeded `seed`. 04_evaluate.py's `random` method and the
    export that serves it (03_suppress.py --random-control). `alpha` may also be neurons x k (a transport map's
    alpha, omega and beta side by side): the rows move together, by the same permutations as a vector's."""
    generator = torch.Generator().manual_seed(seed)
    alpha = torch.as_tensor(alpha)
    return torch.cat([site[torch.randperm(len(site), generator=generator)] for site in torch.split(alpha, sizes)])


def transport_scale_shift(omega, beta, strength, alpha=None):
    """A transport map (omega, beta per neuron; 03_suppress.py --method act) applied at strength lambda,
    x + lambda (omega x + beta - x) = scale * x + shift: scale = 1 + lambda (omega - 1), shift = lambda beta.
    Stacked with a damping (03 --stack: alpha per neuron, applied after the map, so a silenced neuron stays silent):
    alpha (x + lambda (omega x + beta - x)), both scale and shift times alpha."""
    omega, beta = torch.as_tensor(omega).float(), torch.as_tensor(beta).float()
    scale, shift = 1 + strength * (omega - 1), strength * beta
    if alpha is None:
        return scale, shift
    alpha = torch.as_tensor(alpha).float()
    return alpha * scale, alpha * shift


def transport_conditions(alphas, tensors, settings, sites, seed):
    """04_evaluate.py's conditions for a transport map (tensors omega, beta; settings: 03's, with its strength):
    sets alphas["sgm"] and alphas["random"], and each alphas["sgm@s"] already there, to their scale, and returns
    their shifts. random: the same (alpha, omega, beta) triples moved together by matched_random_control's
    permutations; sgm@s: lambda s (the scale unclipped: a map may scale up), alpha as it is. alpha is all ones
    unless the map was stacked on a damping (03 --stack), then each neuron is transported, then damped. A damping
    artifact (alpha only) changes nothing and has no shifts: {}."""
    if "omega" not in tensors:
        return {}
    if "strength" not in settings:
        fail("a transport map without its strength in the suppression's settings: rerun 03_suppress.py")
    strength = settings["strength"]
    sizes = [len(part) for part in split_by_site(tensors["omega"], sites)]
    triples = torch.stack([tensors["omega"], tensors["beta"], tensors["alpha"]], 1)
    shuffled = matched_random_control(triples, sizes, seed)
    maps = dict(sgm=transport_scale_shift(tensors["omega"], tensors["beta"], strength, tensors["alpha"]),
                random=transport_scale_shift(shuffled[:, 0], shuffled[:, 1], strength, shuffled[:, 2]))
    maps.update({name: transport_scale_shift(tensors["omega"], tensors["beta"], strength * float(name[4:]),
                                             tensors["alpha"]) for name in alphas if name.startswith("sgm@")})
    alphas.update({name: scale for name, (scale, _) in maps.items()})
    return {name: shift for name, (_, shift) in maps.items()}


def random_controls(alpha, tensors, settings, sites, seeds):
    """The random control drawn again under each of `seeds`, as 04_evaluate.py's `random` method is drawn under its
    --seed: {seed: (alpha, shift or None)}. A damping: matched_random_control of `alpha`; a transport map
    (`tensors` with omega): its triples moved together (transport_conditions). 04 measures fluency under these
    draws: what random damping of the same size costs varies from draw to draw (docs/RESULTS.md)."""
    if "omega" not in tensors:
        sizes = [part.numel() for part in split_by_site(alpha, sites)]
        return {seed: (matched_random_control(alpha, sizes, seed), None) for seed in seeds}
    draws = {}
    for seed in seeds:
        drawn = {"sgm": alpha}  # transport_conditions puts each map's scale here
        shift = transport_conditions(drawn, tensors, settings, sites, seed)["random"]
        draws[seed] = (drawn["random"], shift)
    return draws
