"""01_collect.py --samples K: K sampled continuations per calibration prompt besides the greedy one, each a row
of the activation matrix that carries its prompt's id; seeded so that reruns and resumed runs are identical."""
import hashlib

import numpy as np
import pytest
from conftest import write_items
from test_pipeline import run_stage

import common
from common import UserError
from sgm import judges
from sgm import models
from sgm.artifacts import load_npz


def verdict(text):
    """A deterministic coin per text: the random tiny model says nothing a real judge flags. Trailing NULs do not
    count: numpy's str arrays drop them, so the stored continuation may lack the judged text's last '\x00'."""
    return float(hashlib.sha256(text.rstrip("\x00").encode()).digest()[0] % 2)


@pytest.fixture
def coin_judge(monkeypatch):
    monkeypatch.setattr(judges, "judge_toxicity", lambda texts: np.array([verdict(t) for t in texts]))


def collect(tmp_path, data, run, *flags):
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--max-new-tokens", 5, "--batch-size", 4,
              "--run", run, *flags, cwd=tmp_path)
    return load_npz(tmp_path / "runs" / run / "activations.npz", "")


def test_samples_are_rows_of_their_prompt(tmp_path, coin_judge, capsys):
    data = write_items(tmp_path / "items.jsonl")
    greedy, greedy_meta = collect(tmp_path, data, "greedy")
    assert "prompts have both" not in capsys.readouterr().out  # said only when there are samples
    sampled, meta = collect(tmp_path, data, "k2", "--samples", 2)
    assert "prompts have both a toxic and a clean continuation" in capsys.readouterr().out
    again, meta_again = collect(tmp_path, data, "k2-again", "--samples", 2)

    # K = 0 is today's artifact plus an all-zero sample_index.
    assert greedy["sample_index"].dtype == np.int16 and not greedy["sample_index"].any()
    assert greedy_meta["n_prompts_both"] == 0 and greedy_meta["n_rows"] == greedy_meta["n_prompts"] == 12
    # One row per (prompt, continuation), prompt-major; every prompt keeps its id.
    assert meta["settings"]["samples"] == 2 and meta["n_rows"] == len(sampled["item_ids"]) == 36 - meta["n_dropped"]
    assert set(sampled["sample_index"]) <= {0, 1, 2} and sampled["sample_index"].dtype == np.int16
    pairs = list(zip(sampled["item_ids"], sampled["sample_index"]))
    prompt_order = list(greedy["item_ids"])
    assert len(set(pairs)) == len(pairs) and pairs == sorted(pairs, key=lambda p: (prompt_order.index(p[0]), p[1]))
    assert meta["n_prompts"] == len(set(sampled["item_ids"])) == 12
    toxic = set(sampled["item_ids"][sampled["labels"] == 1])
    assert meta["n_prompts_both"] == len(toxic & set(sampled["item_ids"][sampled["labels"] == 0])) > 0
    assert list(sampled["labels"]) == [verdict(t) for t in sampled["continuations"]]  # each judged on its own
    # The greedy rows are exactly the K = 0 run's rows; the samples are other continuations.
    is_greedy = sampled["sample_index"] == 0
    for key in greedy:
        np.testing.assert_array_equal(sampled[key][is_greedy], greedy[key])
    greedy_row = {item_id: row for row, item_id in enumerate(sampled["item_ids"]) if is_greedy[row]}
    other = [(row, greedy_row[item_id]) for row, item_id in enumerate(sampled["item_ids"])
             if not is_greedy[row] and item_id in greedy_row]
    assert sum(sampled["continuations"][row] != sampled["continuations"][g] for row, g in other) >= len(other) // 2
    assert sum(not np.array_equal(sampled["activations"][row], sampled["activations"][g]) for row, g in other) \
        >= len(other) // 2
    # Seeded: a rerun gives the same artifact.
    assert meta_again["fingerprint"] == meta["fingerprint"]
    for key in sampled:
        np.testing.assert_array_equal(sampled[key], again[key])


def test_sampled_collect_resumes_and_equals_an_uninterrupted_run(tmp_path, coin_judge, monkeypatch):
    """Killed during batch 2 (after its greedy pass, before its samples): only batch 1's piece is kept, and the
    resumed run, which samples batches 2-3 only, gives the uninterrupted run's artifact."""
    data = write_items(tmp_path / "items.jsonl")
    whole, whole_meta = collect(tmp_path, data, "whole", "--samples", 2)
    calls, real_generate = [], common.generate

    def generate_then_die(*a, **k):  # 3 calls per batch (greedy, 2 samples): the 5th is batch 2's first sample
        calls.append(k["top_k"])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_generate(*a, **k)
    monkeypatch.setattr(common, "generate", generate_then_die)
    with pytest.raises(KeyboardInterrupt):
        collect(tmp_path, data, "resumed", "--samples", 2)
    partial = tmp_path / "runs/resumed/activations.partial"
    assert sorted(p.name for p in partial.glob("batch-*.npz")) == ["batch-00000.npz"]
    piece, _ = load_npz(partial / "batch-00000.npz", "")
    assert len(piece["activations"]) == 4 * 3  # all K+1 rows of each of the batch's 4 prompts
    assert calls == [0, 50, 50, 0, 50]
    calls.clear()
    monkeypatch.setattr(common, "generate", lambda *a, **k: calls.append(k["top_k"]) or real_generate(*a, **k))
    resumed, resumed_meta = collect(tmp_path, data, "resumed", "--samples", 2)
    assert calls == [0, 50, 50] * 2  # only the two unfinished batches were computed
    assert resumed_meta["fingerprint"] == whole_meta["fingerprint"]
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    assert not partial.exists()


def test_empty_continuations_drop_their_row_only(tmp_path, coin_judge, monkeypatch):
    """A continuation that ends at once has nothing to pool: its row goes, its prompt's other rows stay."""
    data = write_items(tmp_path / "items.jsonl")
    real_load_model = models.load_model

    def load_with_many_stop_tokens(*a, **k):  # half the vocabulary ends a continuation: many end at once
        model, processor, sites, meta = real_load_model(*a, **k)
        model.generation_config.eos_token_id = list(range(0, len(processor.tokenizer), 2))
        return model, processor, sites, meta
    monkeypatch.setattr(models, "load_model", load_with_many_stop_tokens)
    arrays, meta = collect(tmp_path, data, "k2", "--samples", 2)
    assert meta["n_dropped"] > 0 and meta["n_rows"] == len(arrays["item_ids"]) == 36 - meta["n_dropped"]
    assert np.all(arrays["n_positions"] >= 1)
    rows_per_prompt = {i: int((arrays["item_ids"] == i).sum()) for i in set(arrays["item_ids"])}
    assert min(rows_per_prompt.values()) < 3 and meta["n_prompts"] == len(rows_per_prompt)


@pytest.mark.parametrize("flags,message", [
    (("--samples", -1), "--samples -1 is negative"),
    (("--samples", 2, "--mode", "prompts"), "--samples needs --mode responses"),
    (("--sample-top-k", 0), "--sample-top-k 0 must be at least 1"),
    (("--seed", -3), "--seed -3 is negative"),
])
def test_bad_sample_options_fail_before_loading(tmp_path, monkeypatch, flags, message):
    def never(*a, **k):
        raise AssertionError("loaded data or model before checking the options")
    monkeypatch.setattr(common, "load_items", never)
    monkeypatch.setattr(models, "load_model", never)
    with pytest.raises(UserError, match=message):
        run_stage("01_collect.py", "--model", "tiny", *flags, cwd=tmp_path)


def test_responses_pooled_over_the_prompt(tmp_path, coin_judge):
    """--positions prompt: the same rows and labels (the judged continuations), pooled over the prompt's text
    tokens. Attention is causal, so those activations are exactly prompts mode's (--positions text); the labels
    stay the continuations'."""
    data = write_items(tmp_path / "items.jsonl")
    by_prompt, meta = collect(tmp_path, data, "resp-prompt", "--positions", "prompt")
    by_continuation, _ = collect(tmp_path, data, "resp-continuation")
    prompts_mode, _ = collect(tmp_path, data, "prompts", "--mode", "prompts")
    assert meta["settings"]["positions"] == "prompt"
    order = [list(prompts_mode["item_ids"]).index(i) for i in by_prompt["item_ids"]]
    np.testing.assert_allclose(by_prompt["activations"], prompts_mode["activations"][order], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(by_prompt["labels"], by_continuation["labels"])
    assert (by_prompt["n_positions"] == prompts_mode["n_positions"][order]).all()
    assert not np.allclose(by_prompt["activations"], by_continuation["activations"])


@pytest.mark.parametrize("flags", [("--positions", "text"), ("--mode", "prompts", "--positions", "prompt")])
def test_positions_must_fit_the_mode(tmp_path, flags):
    with pytest.raises(UserError, match="does not go with --mode"):
        run_stage("01_collect.py", "--model", "tiny", *flags, cwd=tmp_path)


def test_a_damaged_batch_piece_is_computed_again(tmp_path, monkeypatch, capsys):
    """A crash can leave a torn per-batch piece: the rerun recomputes it (one note) instead of failing on it,
    and the artifact equals an uninterrupted run's."""
    data = write_items(tmp_path / "items.jsonl")
    whole, _ = collect(tmp_path, data, "whole", "--mode", "prompts")
    real_encode, calls = common.encode, []

    def encode_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second batch never finishes
        return real_encode(*args, **kwargs)
    monkeypatch.setattr(common, "encode", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        collect(tmp_path, data, "torn", "--mode", "prompts")
    monkeypatch.setattr(common, "encode", real_encode)
    piece = tmp_path / "runs" / "torn" / "activations.partial" / "batch-00000.npz"
    piece.write_bytes(piece.read_bytes()[:100])  # torn by the crash
    resumed, _ = collect(tmp_path, data, "torn", "--mode", "prompts")
    assert "computing that batch again" in capsys.readouterr().out
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key])
