"""What a neuron writes (01_collect.py --writer, neurons.WriteRecorder; 02_score.py --score writer; 03 damping by it).

The attribution a * df/da summed over a row's positions is checked against values computed independently:
- to rounding: it is the derivative of the row's objective with respect to the neuron's scale at 1, so it must equal a
  central finite difference of the objective with the neuron scaled by 1 +- h through the damping hooks (every
  neuron of the tiny model, dense and mixture-of-experts; float64 weights, h = 0.01: transformers' RMSNorm
  computes in float32, so a smaller h would measure its rounding; agreement ~1e-3 of the largest value);
- against brute force: silencing every neuron of the tiny model one at a time (the real ablation) changes the
  objective by about minus the estimate (first order; correlation over all neurons);
- the writer score d and Welch's t against scipy.stats.ttest_ind, the shuffled labels' t against one call per shuffle;
- end to end: a tiny model with a planted neuron that writes a word the (test's) judge flags is the top writer,
  and 03 silences it by the writer score."""
import numpy as np
import pytest
import torch
from conftest import load_stage, write_items
from scipy.stats import ttest_ind
from test_pipeline import run_stage
from test_planted import planted  # noqa: F401  (the fixture: tiny with a planted writer of ' music')

import common
from common import UserError
from sgm import artifacts, judges, models, neurons

score = load_stage("02_score.py")


def teacher_forced(model, processor, items, continuation):
    """Inputs of prompt + a fixed continuation (the same tokens for every row), and the mask of its tokens."""
    batch = common.encode(processor, items, "cpu")
    ids = torch.tensor([processor.tokenizer.encode(continuation, add_special_tokens=False)] * len(items))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, -2:] = False  # one row ends early: its padding positions must not count
    inputs = common.append_tokens(processor, batch, ids, mask)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs, ids, mask


def objective_of(model, inputs, ids, mask, kind, toxic_ids):
    logits = model(**inputs, use_cache=False, logits_to_keep=ids.shape[1] + 1).logits[:, :-1]
    return neurons.writer_objective(kind, logits, mask, toxic_ids, ids)


def writes_of(model, sites, inputs, ids, mask, kind, toxic_ids):
    with neurons.record_writes(model, sites) as recorder, torch.enable_grad():
        recorder.mask = inputs["attention_mask"].bool()
        return recorder.attribute(objective_of(model, inputs, ids, mask, kind, toxic_ids))


def scaled_objective(model, sites, inputs, ids, mask, kind, toxic_ids, neuron, factor):
    alpha = torch.ones(sum(site.in_features for _, site in sites), dtype=torch.float64)
    alpha[neuron] = factor
    with torch.no_grad(), neurons.suppress_neurons(sites, alpha):
        return objective_of(model, inputs, ids, mask, kind, toxic_ids).numpy()


ITEMS = [dict(id=str(i), text=text, task="continue", image_path=None) for i, text in
         enumerate(["the cat sat on the mat", "you are a silly rude person", "what a terrible angry day"])]


@pytest.mark.parametrize("kind", neurons.WRITER_OBJECTIVES)
def test_writes_are_the_derivative_of_the_objective_in_the_neurons_scale(kind):
    """Every 4th neuron of tiny (both layers): a * df/da summed over the row = (f(1 + h) - f(1 - h)) / 2h."""
    model, processor, sites, _ = models.load_model("tiny")
    model.double()
    toxic_ids = torch.tensor([5, 17, 42])
    inputs, ids, mask = teacher_forced(model, processor, ITEMS, " the dog ran home")
    writes = writes_of(model, sites, inputs, ids, mask, kind, toxic_ids)
    h = 1e-2
    numeric = np.stack([(scaled_objective(model, sites, inputs, ids, mask, kind, toxic_ids, m, 1 + h)
                         - scaled_objective(model, sites, inputs, ids, mask, kind, toxic_ids, m, 1 - h)) / (2 * h)
                        for m in range(0, writes.shape[1], 4)], 1)
    assert writes.shape == (len(ITEMS), 96) and np.abs(writes).max() > 1e-6
    np.testing.assert_allclose(writes[:, ::4], numeric, rtol=2e-3, atol=2e-3 * np.abs(numeric).max())


@pytest.mark.parametrize("kind", neurons.WRITER_OBJECTIVES)
def test_writer_pass_with_the_lm_head_in_chunks_equals_full_logits(kind):
    """models.writer_pass (the LM head 3 positions at a time, one backward through the decoder) gives the
    objective and the writes of the plain full-logits computation."""
    model, processor, sites, _ = models.load_model("tiny")
    toxic_ids = torch.tensor([5, 17, 42])
    inputs, ids, mask = teacher_forced(model, processor, ITEMS, " the dog ran home")
    full = writes_of(model, sites, inputs, ids, mask, kind, toxic_ids)
    predicts = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)  # as 01_collect.py: the last T + 1 positions
    targets = torch.cat([ids, torch.zeros_like(ids[:, :1])], 1)
    with neurons.record_writes(model, sites) as recorder, torch.enable_grad():
        recorder.mask = inputs["attention_mask"].bool()
        objective, chunked = models.writer_pass(model, inputs, predicts, recorder, kind, toxic_ids, targets,
                                                chunk_tokens=3)
    with torch.no_grad():
        reference = objective_of(model, inputs, ids, mask, kind, toxic_ids).numpy()
    np.testing.assert_allclose(objective, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked, full, rtol=1e-4, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("kind", neurons.WRITER_OBJECTIVES)
def test_writer_pass_in_micro_batches_equals_the_whole_batch_with_full_logits(kind):
    """The bounded writer pass (rows through forward and backward one or two at a time, the LM head 3 positions at
    a time) gives the objective and the writes of the whole batch with full logits (the pass before micro-batches),
    and the activations pooled in its forwards equal those of one plain forward of the whole batch."""
    model, processor, sites, _ = models.load_model("tiny")
    toxic_ids = torch.tensor([5, 17, 42])
    inputs, ids, mask = teacher_forced(model, processor, ITEMS, " the dog ran home")
    full = writes_of(model, sites, inputs, ids, mask, kind, toxic_ids)
    with torch.no_grad():
        reference = objective_of(model, inputs, ids, mask, kind, toxic_ids).numpy()
    pool_mask = inputs["attention_mask"].bool()
    with neurons.record_neurons(sites) as recorder, torch.no_grad():
        recorder.mask = pool_mask
        model(**inputs, use_cache=False)
        pooled_whole = recorder.pop()
    predicts = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)  # as 01_collect.py: the last T + 1 positions
    targets = torch.cat([ids, torch.zeros_like(ids[:, :1])], 1)
    for rows_per_pass in (1, 2):
        with neurons.record_neurons(sites) as recorder, neurons.record_writes(model, sites) as writes, \
                torch.enable_grad():
            recorder.mask = pool_mask
            objective, written = models.writer_pass(model, inputs, predicts, writes, kind, toxic_ids, targets,
                                                    chunk_tokens=3, activations=recorder, rows_per_pass=rows_per_pass)
            assert recorder.mask is pool_mask and writes.mask is None  # the caller's mask back; the writes idle
            pooled = recorder.pop()
        assert written.shape == full.shape and np.abs(full).max() > 1e-6
        np.testing.assert_allclose(objective, reference, rtol=1e-5, atol=1e-7 * np.abs(reference).max())
        np.testing.assert_allclose(written, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
        np.testing.assert_allclose(pooled, pooled_whole, rtol=1e-5, atol=1e-6 * np.abs(pooled_whole).max())


def test_writer_pass_sizes_its_micro_batches_by_the_graph_formula(monkeypatch):
    """rows_per_pass 0: as many rows as WRITER_GRAPH_BYTES of autograd graph hold by writer_graph_bytes (recomputed
    here from the config: float32, so length x (layers x (6 hidden + 4 intermediate) + hidden) x 4 bytes), at least
    one; the forwards seen are the micro-batches."""
    model, processor, sites, _ = models.load_model("tiny")
    text = model.config.get_text_config()
    inputs, ids, mask = teacher_forced(model, processor, ITEMS, " the dog ran home")
    length = inputs["attention_mask"].shape[1]
    per_row = length * (text.num_hidden_layers * (6 * text.hidden_size + 4 * text.intermediate_size)
                        + text.hidden_size) * 4
    assert models.writer_graph_bytes(model, length) == per_row
    predicts = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    try:
        for budget, expected in ((per_row * 2 + 1, [2, 2, 1]), (per_row - 1, [1, 1, 1, 1, 1]), (10 ** 12, [5])):
            monkeypatch.setattr(models, "WRITER_GRAPH_BYTES", budget)
            seen.clear()
            batch = {key: torch.cat([value, value[:2]]) for key, value in inputs.items()}  # 5 rows
            with neurons.record_writes(model, sites) as writes, torch.enable_grad():
                models.writer_pass(model, batch, torch.cat([predicts, predicts[:2]]), writes, "toxic-odds",
                                   torch.tensor([5, 17, 42]))
            assert seen == expected
    finally:
        handle.remove()


@pytest.mark.parametrize("moe", [False, True])
def test_writer_pass_frees_each_micro_batch_without_the_garbage_collector(moe, tmp_path):
    """With Python's cyclic GC off, no down_proj input (dense) or experts input (mixture-of-experts) outlives the
    writer pass: the write hooks must not hold the tensors they are registered on (that reference cycle kept
    ~90 MB per micro-batch of the demo alive until a full collection; 3.4 GB by the end of the calibration)."""
    import gc
    import weakref
    from test_families import BUILDERS, MOE_FAMILIES
    if moe:
        BUILDERS[MOE_FAMILIES[0]](tmp_path / "moe")
    model, processor, sites, _ = models.load_model(str(tmp_path / "moe") if moe else "tiny")
    inputs, ids, mask = teacher_forced(model, processor, ITEMS, " the dog ran home")
    predicts = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
    alive = []
    handles = [(site.experts if isinstance(site, neurons.FusedExperts) else site).register_forward_pre_hook(
        lambda module, args, kwargs: alive.append(weakref.ref(args[0] if args else kwargs["hidden_states"])),
        with_kwargs=True) for _, site in sites]
    gc.collect()
    gc.disable()
    try:
        with neurons.record_writes(model, sites) as writes, torch.enable_grad():
            written = models.writer_pass(model, inputs, predicts, writes, "toxic-odds", torch.tensor([5, 17, 42]),
                                         rows_per_pass=1)[1]
        assert len(alive) == len(sites) * len(ITEMS) and np.abs(written).max() > 1e-6
        assert not [ref for ref in alive if ref() is not None]
    finally:
        gc.enable()
        for handle in handles:
            handle.remove()


def test_first_order_estimate_against_brute_force_ablation_of_every_neuron():
    """Silencing each of tiny's 96 neurons changes the objective by about -write (the first-order estimate)."""
    model, processor, sites, _ = models.load_model("tiny")
    toxic_ids = torch.tensor([5, 17, 42])
    inputs, ids, mask = teacher_forced(model, processor, ITEMS, " the dog ran home")
    writes = writes_of(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids)
    base = scaled_objective(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids, 0, 1.0)
    measured = np.stack([scaled_objective(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids, m, 0.0) - base
                         for m in range(writes.shape[1])], 1)
    r = np.corrcoef(-writes.ravel(), measured.ravel())[0, 1]
    assert r > 0.95, f"first-order estimate vs ablation: r = {r:.3f}"


def test_routed_expert_writes_are_the_derivative_too(tmp_path):
    """Mixture of experts: a routed neuron's write (router weight x gradient at the experts' output read through
    its expert's down projection) = the finite difference of the objective with that neuron scaled."""
    from test_families import BUILDERS, MOE_FAMILIES
    family = MOE_FAMILIES[0]
    BUILDERS[family](tmp_path / "moe")
    model, processor, sites, _ = models.load_model(str(tmp_path / "moe"))
    toxic_ids = torch.tensor([5, 17, 42])
    inputs, ids, mask = teacher_forced(model, processor, ITEMS[:2], " the dog ran home")
    default_kernel = writes_of(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids)  # grouped_mm, float32
    model.set_experts_implementation("eager")  # the only kernel that runs float64
    np.testing.assert_allclose(writes_of(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids), default_kernel,
                               rtol=1e-4, atol=1e-4 * np.abs(default_kernel).max())
    model.double()
    routed = next(i for i, (_, site) in enumerate(sites) if isinstance(site, neurons.FusedExperts))
    start = sum(site.in_features for _, site in sites[:routed])
    inputs, ids, mask = teacher_forced(model, processor, ITEMS[:2], " the dog ran home")
    writes = writes_of(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids)
    chosen = start + np.argsort(-np.abs(writes[:, start:start + sites[routed][1].in_features]).sum(0))[:6]
    h = 1e-2
    for m in chosen:
        numeric = (scaled_objective(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids, m, 1 + h)
                   - scaled_objective(model, sites, inputs, ids, mask, "toxic-odds", toxic_ids, m, 1 - h)) / (2 * h)
        np.testing.assert_allclose(writes[:, m], numeric, rtol=5e-3, atol=2e-3 * np.abs(numeric).max())
    assert np.abs(writes[:, chosen]).max() > 1e-7


def test_write_contrast_equals_welch_t_test_and_each_shuffle():
    rng = np.random.default_rng(0)
    writes = rng.normal(size=(40, 7)) * [1, 2, 3, 1, 1, 1e-3, 1] + [0, 0, 0, 5, 0, 0, 1e3]
    writes[:, 4] = 0.25  # constant: no evidence either way
    labels = (np.arange(40) % 3 == 0).astype(np.int8)
    writes[labels == 1, 1] += 1.5
    permuted = score.shuffled_labels(labels, np.zeros(40, dtype=int), 3, np.random.default_rng(1))
    (d, *d_null), (t, *t_null), df = score.write_contrast(writes, labels, permuted, chunk_neurons=3)
    for m in range(7):
        toxic, clean = writes[labels == 1, m], writes[labels == 0, m]
        assert d[m] == pytest.approx(toxic.mean() - clean.mean(), abs=1e-12)
        if m == 4:
            assert t[m] == 0
            continue
        reference = ttest_ind(toxic, clean, equal_var=False, alternative="greater")
        assert t[m] == pytest.approx(reference.statistic, rel=1e-6)
        assert score.student_t.sf(t[m], df[m]) == pytest.approx(reference.pvalue, rel=1e-6)
    for draw, shuffled in enumerate(permuted):
        (d_one,), (t_one,), _ = score.write_contrast(writes, shuffled.astype(np.int8))
        np.testing.assert_allclose(t_null[draw], t_one, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(d_null[draw], d_one, rtol=1e-9, atol=1e-12)


def judge_flagging(word):
    """A test judge that flags exactly the texts containing `word`: it stands in for the real judge, which flags
    none of tiny's words that the planted neuron could write."""
    return lambda texts: np.array([1.0 if word.strip() and word.strip() in text else 0.0 for text in texts])


def test_the_planted_writer_is_the_top_writer_and_is_silenced(planted, tmp_path, monkeypatch):  # noqa: F811
    folder, data, record, token = planted
    processor = models.load_model(str(folder / "model"))[1]
    monkeypatch.setattr(judges, "judge_toxicity", judge_flagging(processor.tokenizer.decode([token])))
    for script, *args in (["01_collect.py", "--model", folder / "model", "--run", "w", "--data", data,
                           "--mode", "prompts", "--writer", "toxic-odds"],
                          ["02_score.py", "--run", "w", "--score", "writer"],
                          ["03_suppress.py", "--run", "w", "--method", "det0", "--top-k", "1"]):
        run_stage(script, *args, cwd=tmp_path)
    activations, collect_meta = artifacts.load_npz(tmp_path / "runs/w/activations.npz", "01_collect.py")
    assert activations["writes"].shape == activations["activations"].shape
    assert collect_meta["writer"]["objective"] == "toxic-odds" and collect_meta["writer"]["toxic_vocabulary"] >= 1
    expertise, meta = artifacts.load_npz(tmp_path / "runs/w/expertise.npz", "02_score.py")
    writer = expertise["writer"]
    assert meta["score"] == "writer" and np.argmax(writer) == record["flat_index"]
    assert writer[record["flat_index"]] > 1.5 * np.sort(writer)[-2]
    assert (tmp_path / "runs/w/readers-writers.png").exists()
    tensors, suppression_meta = artifacts.load_pt(tmp_path / "runs/w/suppression.pt", "03_suppress.py")
    assert suppression_meta["score"] == "writer"
    assert tensors["alpha"][record["flat_index"]] == 0 and (tensors["alpha"] == 0).sum() == 1
    # The soft rule on the writer scale: the strongest writer silenced, the others by their share of its write.
    run_stage("03_suppress.py", "--run", "w", cwd=tmp_path)
    alpha = artifacts.load_pt(tmp_path / "runs/w/suppression.pt", "03_suppress.py")[0]["alpha"].numpy()
    expected = np.where(writer > 0, 1 - writer / writer.max(), 1.0)
    np.testing.assert_allclose(alpha, expected, rtol=1e-6, atol=1e-7)
    assert alpha.min() >= 0 and alpha.max() <= 1  # never amplified
    with pytest.raises(UserError, match="published"):
        run_stage("03_suppress.py", "--run", "w", "--method", "published", cwd=tmp_path)
    # --score writer-t: the same rules on Welch's t of the writes (e = t / max t), the top-k by t.
    t = expertise["writer_t"]
    run_stage("03_suppress.py", "--run", "w", "--score", "writer-t", "--method", "det0", "--top-k", "3", cwd=tmp_path)
    tensors, suppression_meta = artifacts.load_pt(tmp_path / "runs/w/suppression.pt", "03_suppress.py")
    assert suppression_meta["score"] == "writer-t"
    np.testing.assert_array_equal(np.flatnonzero(tensors["alpha"].numpy() == 0), np.sort(np.argsort(-t)[:3]))
    run_stage("03_suppress.py", "--run", "w", "--score", "writer-t", cwd=tmp_path)
    alpha = artifacts.load_pt(tmp_path / "runs/w/suppression.pt", "03_suppress.py")[0]["alpha"].numpy()
    np.testing.assert_allclose(alpha, np.where(t > 0, 1 - t / t.max(), 1.0), rtol=1e-6, atol=1e-7)


def test_responses_mode_writes_and_the_ablation_check(tmp_path, monkeypatch):
    """Responses calibration with --writer own-logprob: the continuation's ids are stored, 02's ablation check
    reruns exactly them (its recomputed writes equal 01's) and the estimate tracks the measured change."""
    data = write_items(tmp_path / "items.jsonl")
    monkeypatch.setattr(judges, "judge_toxicity",
                        lambda texts: np.array([float(len(text) % 2) for text in texts]))  # both classes, any model
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--max-new-tokens", "5", "--batch-size", "4",
              "--writer", "own-logprob", cwd=tmp_path)
    arrays, meta = artifacts.load_npz(tmp_path / "runs/tiny/activations.npz", "")
    assert arrays["continuation_ids"].shape == (len(arrays["labels"]), 5)
    assert ((arrays["continuation_ids"] >= 0).sum(1) == arrays["n_positions"]).all()
    run_stage("02_score.py", "--run", "tiny", "--score", "writer", "--check-ablation", "6", "--check-rows", "8",
              cwd=tmp_path)
    scores, meta = artifacts.load_npz(tmp_path / "runs/tiny/expertise.npz", "")
    check = meta["ablation_check"]
    assert check["max_difference_from_stored_writes"] < 1e-5  # the same rows, the same tokens
    assert len(check["neurons"]) == 6 and len(check["rows"]) == 8 and check["r_pairs"] > 0.9
    top_d, top_t = (np.argsort(-scores[name], kind="stable")[:6].tolist() for name in ("writer", "writer_t"))
    assert check["ranked_by"] == "writer" and check["neurons"] == top_d
    # damping by t: the check silences the neurons 03 would, the top 6 by t (not by d)
    run_stage("02_score.py", "--run", "tiny", "--score", "writer-t", "--check-ablation", "6", "--check-rows", "8",
              cwd=tmp_path)
    check_t = artifacts.load_npz(tmp_path / "runs/tiny/expertise.npz", "")[1]["ablation_check"]
    assert check_t["ranked_by"] == "writer-t" and check_t["neurons"] == top_t
    assert check_t["neurons"] != check["neurons"]  # else this fixture cannot tell the two rankings apart


def test_writer_options_are_refused_in_one_line(tmp_path):
    data = write_items(tmp_path / "items.jsonl")
    with pytest.raises(UserError, match="own-logprob needs --mode responses"):
        run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", "--writer", "own-logprob",
                  cwd=tmp_path)
    with pytest.raises(UserError, match="unknown --writer"):
        run_stage("01_collect.py", "--model", "tiny", "--data", data, "--writer", "loud", cwd=tmp_path)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=tmp_path)
    with pytest.raises(UserError, match="no writer measurement"):
        run_stage("02_score.py", "--run", "tiny", "--score", "writer", cwd=tmp_path)
    with pytest.raises(UserError, match="unknown --score"):
        run_stage("02_score.py", "--run", "tiny", "--score", "reader", cwd=tmp_path)
