"""Transport at the same neurons (03_suppress.py --method act / act-mean, Linear-AcT): the estimate against a brute-force
1-D transport, the hook against hand-computed forwards (dense, bf16, fused experts), the random control, the export
(reloaded with from_pretrained) and its refusal, and the damping methods' artifacts unchanged to the byte."""
import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import load_stage, write_items
from test_families import BUILDERS
from test_hooks import ITEMS
from test_pipeline import run_stage
from test_suppress import suppress_alpha, write_expertise

from common import UserError, encode
from sgm.artifacts import load_npz, load_pt, save_npz
from sgm.models import load_model
from sgm.neurons import (FusedExperts, fold_alpha, matched_random_control, neuron_sites, random_controls,
                         suppress_neurons, transport_conditions, transport_scale_shift)

suppress = load_stage("03_suppress.py")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def brute_force_map(toxic, clean):
    """omega, beta of one neuron, by brute force: each toxic value repeated n_clean times and each clean value
    n_toxic times gives two samples of equal size whose sorted pairing is the 1-D optimal transport plan; then an
    ordinary least-squares line through the pairs (np.polyfit)."""
    a = np.repeat(np.sort(toxic), len(clean))
    b = np.repeat(np.sort(clean), len(toxic))
    omega, beta = np.polyfit(a, b, 1)
    return omega, beta


@pytest.mark.parametrize("n_toxic,n_clean", [(20, 20), (13, 29), (7, 3)])
def test_estimate_matches_brute_force_transport(n_toxic, n_clean):
    rng = np.random.default_rng(n_toxic)
    rows = np.vstack([rng.gamma(2.0, 1.5, size=(n_toxic, 30)) - 1, rng.normal(0.3, 0.5, size=(n_clean, 30))])
    rows[:, 5] = np.concatenate([np.full(n_toxic, 0.7), rng.normal(size=n_clean)])  # constant on the toxic rows
    labels = np.r_[np.ones(n_toxic), np.zeros(n_clean)].astype(np.int8)
    omega, beta = suppress.transport_maps(rows, labels, chunk_neurons=7)  # chunks do not change the answer
    for m in range(30):
        if m == 5:
            continue
        want = brute_force_map(rows[:n_toxic, m], rows[n_toxic:, m])
        np.testing.assert_allclose([omega[m], beta[m]], want, rtol=1e-9, atol=1e-9)
    assert (omega >= 0).all()
    shift = rows[n_toxic:].mean(0) - rows[:n_toxic].mean(0)
    assert omega[5] == 1 and np.isclose(beta[5], shift[5])  # no slope to fit: the shift of the means
    omega_mean, beta_mean = suppress.transport_maps(rows, labels, mean_only=True)
    assert (omega_mean == 1).all()
    np.testing.assert_allclose(beta_mean, shift, rtol=1e-12, atol=1e-12)


def test_equal_counts_match_sorted_samples_and_move_the_distribution():
    """With equal counts the plan is the i-th smallest to the i-th smallest; the mapped toxic sample is closer to
    the clean one in Wasserstein distance (the fitted map is the best affine approximation of the plan)."""
    from scipy.stats import wasserstein_distance
    rng = np.random.default_rng(3)
    toxic, clean = rng.lognormal(0, 0.6, 50), rng.normal(0, 0.3, 50)
    rank_toxic, rank_clean, weight = suppress.quantile_coupling(50, 50)
    assert (rank_toxic == np.arange(50)).all() and (rank_clean == np.arange(50)).all() and np.allclose(weight, 0.02)
    omega, beta = suppress.transport_maps(np.r_[toxic, clean][:, None], np.r_[np.ones(50), np.zeros(50)])
    assert wasserstein_distance(omega[0] * toxic + beta[0], clean) < 0.5 * wasserstein_distance(toxic, clean)


def test_dense_hook_against_hand_baked_weights_and_bias(tiny):
    """suppress_neurons with a shift = a copy of the model whose down_proj weights and biases were set by hand
    (W diag(scale), b = W shift) = fold_alpha's bake."""
    model, processor, sites, _ = tiny
    n = sum(site.in_features for _, site in sites)
    generator = torch.Generator().manual_seed(0)
    scale, shift = 0.5 + torch.rand(n, generator=generator), torch.randn(n, generator=generator)
    scale[:10], shift[:10] = 1.0, 0.0  # neurons the map leaves alone
    batch = encode(processor, ITEMS, "cpu")
    with torch.no_grad():
        plain = model(**batch).logits
        with suppress_neurons(sites, scale, shift):
            hooked = model(**batch).logits
        after = model(**batch).logits
    assert torch.equal(plain, after) and not torch.allclose(plain, hooked)
    by_hand = copy.deepcopy(model)
    start = 0
    with torch.no_grad():
        for _, site in neuron_sites(by_hand):
            part = slice(start, start + site.in_features)
            site.bias = torch.nn.Parameter(site.weight @ shift[part])
            site.weight.mul_(scale[part])
            start += site.in_features
        torch.testing.assert_close(by_hand(**batch).logits, hooked, rtol=1e-5, atol=1e-5)
    baked = copy.deepcopy(model)
    fold_alpha(neuron_sites(baked), scale, shift)
    with torch.no_grad():
        torch.testing.assert_close(baked(**batch).logits, hooked, rtol=1e-5, atol=1e-5)


def test_dense_hook_is_float32_then_cast_back_in_bfloat16(tiny):
    model, processor, sites, _ = tiny
    low = copy.deepcopy(model).to(torch.bfloat16)
    low_sites = neuron_sites(low)
    n = sum(site.in_features for _, site in low_sites)
    scale, shift = torch.linspace(0.3, 1.7, n), torch.linspace(-0.05, 0.05, n)
    seen = {}
    site = low_sites[0][1]
    before = site.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0].clone()), prepend=True)
    batch = encode(processor, ITEMS, "cpu")
    with torch.no_grad(), suppress_neurons(low_sites, scale, shift):
        after = site.register_forward_pre_hook(lambda m, args: seen.__setitem__("y", args[0].clone()))
        low(**batch)
    before.remove(), after.remove()
    x = seen["x"]
    want = (x.float() * scale[:site.in_features] + shift[:site.in_features]).to(torch.bfloat16)
    assert seen["y"].dtype == torch.bfloat16 and torch.equal(seen["y"], want)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("qwen3_vl_moe") / "checkpoint"
    BUILDERS["qwen3_vl_moe"](out_dir)
    return load_model(str(out_dir))


def test_fused_experts_shift_against_a_hand_computed_expert_output(moe):
    """The experts module called with a routing chosen here: with the hook, its output = sum over each token's
    chosen experts of weight x down_e(scale_e * act_e + shift_e), from the weights by hand; the weights are
    bit-identical afterwards."""
    model, _, sites, _ = moe
    routed = [(name, site) for name, site in sites if isinstance(site, FusedExperts)]
    name, site = routed[0]
    experts = site.experts
    n = sum(s.in_features for _, s in sites)
    generator = torch.Generator().manual_seed(1)
    scale, shift = 0.5 + torch.rand(n, generator=generator), torch.randn(n, generator=generator)
    start = sum(s.in_features for other, s in sites[:[other for other, _ in sites].index(name)])
    mine = slice(start, start + site.in_features)
    tokens, hidden_size = 5, experts.gate_up_proj.shape[-1]
    hidden = torch.randn(tokens, hidden_size, generator=generator)
    index = torch.tensor([[0, 1], [2, 0], [3, 1], [1, 2], [3, 0]])
    weights = torch.rand(tokens, 2, generator=generator)
    original = [p.detach().clone() for p in experts.parameters()]
    with torch.no_grad(), suppress_neurons(sites, scale, shift):
        hooked = experts(hidden, index, weights)
    assert all(torch.equal(p, o) for p, o in zip(experts.parameters(), original))
    width = site.width
    s, b = scale[mine].view(site.n_experts, width), shift[mine].view(site.n_experts, width)
    down = site.columns().detach()  # (experts, I, hidden)
    want = torch.zeros(tokens, hidden_size)
    for t in range(tokens):
        for k in range(2):
            e = int(index[t, k])
            gate, up = (hidden[t] @ experts.gate_up_proj[e].T).chunk(2)
            act = experts.act_fn(gate) * up
            want[t] += weights[t, k] * ((s[e] * act + b[e]) @ down[e])
    torch.testing.assert_close(hooked, want, rtol=1e-5, atol=1e-5)


def test_random_control_moves_each_map_as_one_and_keeps_layer_counts():
    sizes = [40, 25, 35]
    rng = np.random.default_rng(2)
    omega, beta = np.ones(100), np.zeros(100)
    mapped = rng.choice(100, 30, replace=False)
    omega[mapped], beta[mapped] = rng.uniform(0.2, 2, 30), rng.normal(size=30)
    alpha = torch.ones(100)
    stacked = torch.stack([alpha, torch.tensor(omega), torch.tensor(beta)], 1).float()
    shuffled = matched_random_control(stacked, sizes, 7)
    cuts = np.cumsum(sizes)[:-1]
    for before, after in zip(np.split(stacked.numpy(), cuts), np.split(shuffled.numpy(), cuts)):
        assert sorted(map(tuple, before)) == sorted(map(tuple, after))  # the same (omega, beta) pairs per layer
        assert ((before[:, 1] != 1) | (before[:, 2] != 0)).sum() == ((after[:, 1] != 1) | (after[:, 2] != 0)).sum()
    # The same permutation a vector gets (the alpha-only control of 04 with the same seed).
    assert torch.equal(shuffled[:, 1], matched_random_control(stacked[:, 1], sizes, 7))
    assert not torch.equal(shuffled, stacked)
    scale, shift = transport_scale_shift(shuffled[:, 1], shuffled[:, 2], 0.5)
    torch.testing.assert_close(scale, 1 + 0.5 * (shuffled[:, 1] - 1))
    torch.testing.assert_close(shift, 0.5 * shuffled[:, 2])


# ---- 03 as a command on hand-made artifacts ------------------------------------------------------------------------

SIZES = [400, 300, 300]
GOLDEN = {  # suppression.pt of the damping methods, made before transport existed (commit 19df9b3): meta_sha256, sha256
    (): ("8eb0307ddff7916f8d79e75003af94331e0c0ba7e3861270a39e12447b0e0945",
         "02e97324504a48cd829a43f69354af013715556a2667faef29b041f6a8ea4e16"),
    ("--method", "det0", "--top-k", "25"): (
        "feb3c8dc8a6976d027e6e12ff765a271fb0ffc5092f132477aea614ab7338967",
        "96f992856f1d74571468ed65fc87d4197f671774b0120b1ed6d741d548869a95"),
    ("--method", "damp", "--top-k", "40", "--damp-factor", "0.3"): (
        "753ff2d2fb4ebf64cf3baff920e9207fd43b8767ef0c0520c7264ba5d3c90cf5",
        "6b112f3ff5b72c664767c9410ef41bb0951bfecf626c2f8dde2f02256576e050"),
    ("--method", "published"): ("5928a095043c8f791226f10a121f437cb65a537d96e215cf734b5d0b890452c9",
                                "050dcbc3d6af4e719e6dbc2fe63fe046a98c475c1bab337238fb1d6599824233"),
    ("--strength", "0.5", "--top-k", "100"): (
        "22ab910a9f92e3cc01530d97880e1990129b20372d300acc23ecadaafddb6667",
        "2e5afe925c4410cd3e4a7a4e8c0622463c1166bfee94156f9dda01d62204c934"),
    ("--select", "significant", "--layers", "1:3"): (
        "19f2c57b0aacd713bec2717e56716963d9a1d3446bf89a2af24812736d9600e3",
        "4d4b913ddcdc058c752ce1c24aa84afbf106d62bcc482246a720c8c15cfabd6a"),
    ("--normalise", "layer"): ("6cb8b7015099e450f56f69fe44e2f864c65cb855894f43214ee424987ae668a0",
                               "3e38e5e88ac0dfb5bbfb99533c1382e5d0981af7b54507401da33b9db2d71b2d"),
}


def test_damping_artifacts_are_byte_identical_to_before_transport(tmp_path):
    write_expertise(tmp_path / "runs/s")
    for flags, (meta_sha256, file_sha256) in GOLDEN.items():
        tensors, meta = load_pt(suppress_alpha(tmp_path, *flags) and tmp_path / "runs/s/suppression.pt", "")
        assert set(tensors) == {"alpha"} and "transport" not in meta
        assert meta["meta_sha256"] == meta_sha256, flags
        assert hashlib.sha256((tmp_path / "runs/s/suppression.pt").read_bytes()).hexdigest() == file_sha256, flags


def write_rows(run_dir, n_toxic=12, n_clean=17):
    """activations.npz (rows x 1000 neurons, labels) and an expertise.npz that names it as its source."""
    rng = np.random.default_rng(5)
    activations = rng.normal(size=(n_toxic + n_clean, sum(SIZES))).astype(np.float32)
    activations[:n_toxic] = activations[:n_toxic] * 1.5 + 0.4
    labels = np.r_[np.ones(n_toxic), np.zeros(n_clean)].astype(np.int8)
    sites = [[f"model.layers.{i}.mlp.down_proj", n] for i, n in enumerate(SIZES)]
    saved = save_npz(run_dir / "activations.npz", dict(activations=activations, labels=labels),
                     dict(model="synthetic", sites=sites, dtype="float32", data="synthetic", data_checksum="0" * 64,
                          settings=dict(pooling="mean")))
    write_expertise(run_dir)
    arrays, meta = load_npz(run_dir / "expertise.npz", "")
    save_npz(run_dir / "expertise.npz", arrays, dict(meta, upstream={"activations.npz": saved["fingerprint"]}))
    return activations, labels, arrays["auroc"]


def test_act_command_writes_the_maps_of_the_chosen_neurons(tmp_path):
    activations, labels, auroc = write_rows(tmp_path / "runs/s")
    run_stage("03_suppress.py", "--run", "s", "--method", "act", "--top-k", 50, "--strength", 0.7, cwd=tmp_path)
    tensors, meta = load_pt(tmp_path / "runs/s/suppression.pt", "")
    assert set(tensors) == {"alpha", "omega", "beta"} and (tensors["alpha"] == 1).all()
    top = np.argsort(-auroc, kind="stable")[:50]
    omega, beta = tensors["omega"].numpy(), tensors["beta"].numpy()
    assert set(np.flatnonzero((omega != 1) | (beta != 0))) <= set(top)
    for m in top[:10]:
        want = brute_force_map(activations[labels == 1, m].astype(np.float64), activations[labels == 0, m])
        np.testing.assert_allclose([omega[m], beta[m]], want, rtol=1e-5, atol=1e-6)
    others = np.setdiff1d(np.arange(auroc.size), top)
    assert (omega[others] == 1).all() and (beta[others] == 0).all()
    assert meta["settings"]["method"] == "act" and meta["settings"]["strength"] == 0.7
    assert meta["transport"]["n_toxic"] == 12 and meta["transport"]["n_clean"] == 17
    assert "activations.npz" in meta["upstream"]
    run_stage("03_suppress.py", "--run", "s", "--method", "act-mean", cwd=tmp_path)  # every neuron
    tensors, _ = load_pt(tmp_path / "runs/s/suppression.pt", "")
    assert (tensors["omega"] == 1).all()
    want = activations[labels == 0].astype(np.float64).mean(0) - activations[labels == 1].astype(np.float64).mean(0)
    np.testing.assert_allclose(tensors["beta"].numpy(), want, rtol=1e-5, atol=1e-6)


def test_act_refuses_rows_that_were_not_scored(tmp_path):
    write_rows(tmp_path / "runs/s")
    arrays, meta = load_npz(tmp_path / "runs/s/activations.npz", "")
    save_npz(tmp_path / "runs/s/activations.npz", dict(arrays, labels=1 - arrays["labels"]), meta)
    with pytest.raises(UserError, match="not the one expertise.npz was scored from") as error:
        run_stage("03_suppress.py", "--run", "s", "--method", "act", cwd=tmp_path)
    assert "\n" not in error.value.message


def test_act_top_k_past_the_neurons_is_one_line(tmp_path):
    write_rows(tmp_path / "runs/s")
    with pytest.raises(UserError, match="--top-k must be between 0 and 1000") as error:
        run_stage("03_suppress.py", "--run", "s", "--method", "act", "--top-k", 5000, cwd=tmp_path)
    assert "\n" not in error.value.message


# ---- on tiny: 01 -> 02 -> 03 act, exported and reloaded; 04 applies it; a family without a bias is refused ---------


@pytest.fixture(scope="module")
def tiny_act(tmp_path_factory):
    folder = tmp_path_factory.mktemp("act")
    data = write_items(folder / "items.jsonl", n_per_label=3)
    for script, *args in (["01_collect.py", "--model", "tiny", "--run", "t", "--data", data, "--mode", "prompts"],
                          ["02_score.py", "--run", "t"],
                          ["03_suppress.py", "--run", "t", "--method", "act", "--strength", 0.8]):
        run_stage(script, *args, cwd=folder)
    return folder, data


def test_export_bakes_the_map_with_a_bias_and_reloads_with_the_hooks_logits(tiny_act, tiny):
    from transformers import AutoModelForImageTextToText
    folder, _ = tiny_act
    model, processor, sites, _ = tiny
    tensors, meta = load_pt(folder / "runs/t/suppression.pt", "")
    scale, shift = transport_scale_shift(tensors["omega"], tensors["beta"], 0.8)
    batch = encode(processor, ITEMS, "cpu")
    with torch.no_grad(), suppress_neurons(sites, scale, shift):
        hooked = model(**batch).logits
    for random in (False, True):
        out = folder / ("exported-random" if random else "exported")
        run_stage("03_suppress.py", "--run", "t", "--method", "act", "--strength", 0.8, "--export", out,
                  "--random-control", random, cwd=folder)
        assert json.loads((out / "config.json").read_text())["text_config"]["mlp_bias"] is True
        assert "Transport (`act`" in (out / "SGM_EXPORT.md").read_text()
        reloaded = AutoModelForImageTextToText.from_pretrained(out).eval()
        with torch.no_grad():
            logits = reloaded(**batch).logits
        if random:  # 04's random control: the same pairs shuffled with seed 0
            shuffled = matched_random_control(torch.stack([tensors["omega"], tensors["beta"]], 1),
                                              [size for _, size in meta["sites"]], 0)
            with torch.no_grad(), suppress_neurons(sites, *transport_scale_shift(shuffled[:, 0], shuffled[:, 1], 0.8)):
                want = model(**batch).logits
        else:
            want = hooked
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)


def test_evaluate_applies_the_map_and_its_control(tiny_act):
    folder, data = tiny_act
    run_stage("03_suppress.py", "--run", "t", "--method", "act-mean", "--strength", 4, cwd=folder)
    run_stage("04_evaluate.py", "--model", "tiny", "--run", "t", "--data", data, "--max-new-tokens", 4,
              "--conditions", "standard", "--selectivity", "false", cwd=folder)
    results = json.loads((folder / "runs/t/results.json").read_text())
    assert results["meta"]["suppression"]["method"] == "act-mean"
    perplexity = {row["method"]: row["perplexity"] for row in results["fluency"]}
    # act-mean's alpha is all ones: only its shift can move the perplexity away from base's
    assert perplexity["sgm"] != perplexity["base"] and perplexity["random"] != perplexity["base"]
    with pytest.raises(UserError, match="det0/damp: SGM has no neuron") as error:
        run_stage("04_evaluate.py", "--model", "tiny", "--run", "t", "--data", data, "--methods", "base,det0",
                  cwd=folder)
    assert "\n" not in error.value.message


def test_export_refuses_a_family_without_a_down_proj_bias(tmp_path):
    BUILDERS["gemma3"](tmp_path / "gemma3")
    model, _, sites, _ = load_model(str(tmp_path / "gemma3"))
    shift = torch.zeros(sum(site.in_features for _, site in sites))
    shift[3] = 0.1
    with pytest.raises(UserError, match="cannot export a transport map into gemma3.*mlp_bias") as error:
        suppress.make_room_for_bias(model, sites, shift)
    assert "\n" not in error.value.message


# ---- stacked: sgm+act (03 --stack), transport then damping ---------------------------------------------------------


def test_stacked_map_transports_then_damps_in_the_hooks_the_export_and_04(tiny_act, tiny):
    """03 --stack keeps a damping's alpha beside the map; the hooks, the baked export and 04's sgm and random all
    apply alpha (x + lambda (omega x + beta - x)), computed here by hand: a silenced neuron stays silent, its shift
    too."""
    from transformers import AutoModelForImageTextToText
    folder, data = tiny_act
    model, processor, sites, _ = tiny
    run_stage("03_suppress.py", "--run", "t", "--method", "det0", "--top-k", 40, "--out", "det0.pt", cwd=folder)
    run_stage("03_suppress.py", "--run", "t", "--method", "act", "--strength", 0.8, "--out", "plain-act.pt", cwd=folder)
    run_stage("03_suppress.py", "--run", "t", "--method", "act", "--strength", 0.8, "--stack", "det0.pt",
              "--out", "stacked.pt", "--export", folder / "stacked-export", cwd=folder)
    damping, damping_meta = load_pt(folder / "runs/t/det0.pt", "")
    plain, _ = load_pt(folder / "runs/t/plain-act.pt", "")
    stacked, meta = load_pt(folder / "runs/t/stacked.pt", "")
    assert torch.equal(stacked["alpha"], damping["alpha"]) and (stacked["alpha"] == 0).sum() == 40
    assert torch.equal(stacked["omega"], plain["omega"]) and torch.equal(stacked["beta"], plain["beta"])
    assert meta["stacked_on"]["fingerprint"] == damping_meta["fingerprint"]
    assert meta["n_changed"] == int(((plain["omega"] != 1) | (plain["beta"] != 0) | (damping["alpha"] != 1)).sum())
    alpha, omega, beta = (stacked[k].double() for k in ("alpha", "omega", "beta"))
    scale, shift = (alpha * (1 + 0.8 * (omega - 1))).float(), (alpha * 0.8 * beta).float()  # by hand
    assert (scale[alpha == 0] == 0).all() and (shift[alpha == 0] == 0).all()
    batch = encode(processor, ITEMS, "cpu")
    with torch.no_grad(), suppress_neurons(sites, scale, shift):
        want = model(**batch).logits
    with torch.no_grad():
        baked = AutoModelForImageTextToText.from_pretrained(folder / "stacked-export").eval()(**batch).logits
        unstacked = model(**batch).logits
    torch.testing.assert_close(baked, want, rtol=1e-4, atol=1e-4)
    assert "times the alpha of" in (folder / "stacked-export/SGM_EXPORT.md").read_text()
    assert not torch.allclose(want, unstacked)

    # 04's conditions: sgm as above; random moves the (alpha, omega, beta) triples together, one permutation
    alphas = {"sgm": stacked["alpha"], "base": torch.ones_like(stacked["alpha"])}
    shifts = transport_conditions(alphas, stacked, meta["settings"], sites, 0)
    torch.testing.assert_close(alphas["sgm"], scale)
    torch.testing.assert_close(shifts["sgm"], shift)
    sizes = [size for _, size in meta["sites"]]
    moved = matched_random_control(torch.stack([alpha, omega, beta], 1), sizes, 0)
    torch.testing.assert_close(alphas["random"], (moved[:, 0] * (1 + 0.8 * (moved[:, 1] - 1))).float())
    torch.testing.assert_close(shifts["random"], (moved[:, 0] * 0.8 * moved[:, 2]).float())
    # --random-draws: another seed's draw is the same construction under that seed (seed 0's is `random`'s)
    draws = random_controls(alphas["sgm"], stacked, meta["settings"], sites, [0, 3])
    torch.testing.assert_close(draws[0][0], alphas["random"])
    torch.testing.assert_close(draws[0][1], shifts["random"])
    moved = matched_random_control(torch.stack([alpha, omega, beta], 1), sizes, 3)
    torch.testing.assert_close(draws[3][0], (moved[:, 0] * (1 + 0.8 * (moved[:, 1] - 1))).float())
    torch.testing.assert_close(draws[3][1], (moved[:, 0] * 0.8 * moved[:, 2]).float())
    run_stage("04_evaluate.py", "--model", "tiny", "--run", "t", "--data", data, "--max-new-tokens", 3,
              "--conditions", "standard", "--selectivity", "false", "--suppression", "stacked.pt",
              "--methods", "base,sgm,sgm+prompt", "--report", "stacked", cwd=folder)
    report = json.loads((folder / "runs/t/stacked.json").read_text())
    assert {f["method"] for f in report["fluency"]} == {"base", "sgm", "sgm+prompt"}


@pytest.mark.parametrize("flags,message", [  # --stack on a damping method: an option error (tests/test_suppress.py)
    (["--method", "act", "--stack", "plain-act.pt"], "is a transport map: stack on a damping artifact"),
    (["--method", "act", "--stack", "other.pt"], "was made on another model or data build"),
])
def test_bad_stacks_are_one_line(tiny_act, flags, message):
    folder, _ = tiny_act
    run_stage("03_suppress.py", "--run", "t", "--method", "det0", "--top-k", 40, "--out", "det0.pt", cwd=folder)
    run_stage("03_suppress.py", "--run", "t", "--method", "act", "--out", "plain-act.pt", cwd=folder)
    tensors, meta = load_pt(folder / "runs/t/det0.pt", "")
    from sgm.artifacts import save_pt
    save_pt(folder / "runs/t/other.pt", tensors, {k: v for k, v in dict(meta, data_checksum="f" * 64).items()
                                                   if k not in ("fingerprint", "meta_sha256")})
    with pytest.raises(UserError, match=message) as error:
        run_stage("03_suppress.py", "--run", "t", *flags, "--out", "never.pt", cwd=folder)
    assert "\n" not in error.value.message and not (folder / "runs/t/never.pt").exists()


def test_routed_shift_adds_nothing_for_a_padding_expert_index():
    """Some mixture-of-experts implementations pad the routing with an index one past the last expert: that slot
    adds nothing; the others add router weight x their expert's row."""
    from sgm.neurons import routed_shift
    table = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    output = torch.ones(2, 4, dtype=torch.bfloat16)
    index, weights = torch.tensor([[0, 3], [2, 1]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]])
    for args, kwargs in (((None, index, weights), {}), ((None,), dict(top_k_index=index, top_k_weights=weights))):
        got = routed_shift(table, args, kwargs, output)
        want = 1 + torch.stack([0.7 * table[0], 0.5 * table[2] + 0.5 * table[1]])
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float())


def test_bfloat16_export_holds_the_shift_in_bfloat16_and_keeps_the_hooks_logits(tiny_act, tiny):
    """--export --dtype bfloat16 of a map: the bias is saved in bf16 and the reloaded model's logits stay within
    bf16 rounding of the float32 hooks'."""
    from transformers import AutoModelForImageTextToText
    folder, _ = tiny_act
    model, processor, sites, _ = tiny
    run_stage("03_suppress.py", "--run", "t", "--method", "act-mean", "--strength", 2, "--out", "mean2.pt",
              "--export", folder / "bf16-export", "--dtype", "bfloat16", cwd=folder)
    tensors, _ = load_pt(folder / "runs/t/mean2.pt", "")
    batch = encode(processor, ITEMS, "cpu")
    with torch.no_grad(), suppress_neurons(sites, *transport_scale_shift(tensors["omega"], tensors["beta"], 2)):
        want = model(**batch).logits
    with torch.no_grad():
        base = model(**batch).logits
    reloaded = AutoModelForImageTextToText.from_pretrained(folder / "bf16-export").eval()
    biases = [m.bias for n, m in reloaded.named_modules() if n.endswith("mlp.down_proj")]
    assert biases and all(b is not None and b.dtype == torch.bfloat16 for b in biases)
    with torch.no_grad():
        got = reloaded(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}).logits
    error, moved = (got.float() - want).abs().max(), (want - base).abs().max()
    assert error < 0.1 * moved, (error, moved)  # bf16 rounding, far below what the shift changes
