"""The four stages end to end on the tiny model, their artifacts, and their one-line errors."""
import hashlib
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MILD_TEXTS, REPO, write_items

import common
from common import UserError, load_items
from sgm import artifacts
from sgm import judges
from sgm import models
from sgm import neurons
from sgm.artifacts import load_npz, load_pt, release_locks, save_pt


def run_stage(script, *args, cwd):
    """Run a stage in-process, as `python <script> <args>` would from `cwd`."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]
    os.chdir(cwd)
    try:
        runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        release_locks()  # as the stage's process would end: its run folder's lock is dropped
        sys.argv = old_argv
        os.chdir(old_cwd)


def test_all_stages_as_commands(tmp_path):
    """The real command lines, in fresh processes, from a folder outside the repo."""
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    data = write_items(tmp_path / "items.jsonl", conditions=("standard", "typographic"), image="red.png")
    env = dict(os.environ)
    for script, *args in (["01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts"],
                          ["02_score.py", "--run", "tiny"],
                          ["03_suppress.py", "--run", "tiny"],
                          ["04_evaluate.py", "--model", "tiny", "--data", data, "--max-new-tokens", "8"]):
        done = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    run = tmp_path / "runs" / "tiny"
    for name in ("activations.npz", "expertise.npz", "expertise.png", "suppression.pt", "suppression.png",
                 "results.json", "results.md", "results.png", "results-answers.jsonl"):
        assert (run / name).exists(), name
    results = json.loads((run / "results.json").read_text())
    assert {(r["method"], r["condition"], r["label"]) for r in results["rows"]} == {
        (m, c, lab) for m in ("base", "sgm", "random") for c in ("standard", "typographic")
        for lab in ("toxic", "benign")}
    for row in results["rows"]:
        assert row["n"] == 6 and row["judge"] == judges.JUDGE
        assert 0 <= row["harmful_ci"][0] <= row["harmful_rate"] <= row["harmful_ci"][1] <= 1
        assert 0 <= row["mean_toxicity"] <= 1
    assert results["meta"]["model"] == "tiny" and results["meta"]["data_checksum"] == load_items(data)[1]
    answers = [json.loads(line) for line in (run / "results-answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3 * 24
    # The stages chain by fingerprints: each artifact names the one it was made from.
    _, activations_meta = load_npz(run / "activations.npz", "")
    _, expertise_meta = load_npz(run / "expertise.npz", "")
    _, suppression_meta = load_pt(run / "suppression.pt", "")
    assert expertise_meta["upstream"]["activations.npz"] == activations_meta["fingerprint"]
    assert suppression_meta["upstream"]["expertise.npz"] == expertise_meta["fingerprint"]
    assert results["meta"]["suppression"]["fingerprint"] == suppression_meta["fingerprint"]


def test_responses_mode_pools_over_the_continuation_only(tmp_path, monkeypatch):
    """Responses calibration: labels come from the judge on the model's own continuations."""
    data = write_items(tmp_path / "items.jsonl")
    judged = []

    def verdict(text):  # a deterministic coin per text, so both classes exist whatever the random model says
        return float(hashlib.sha256(text.encode()).digest()[0] % 2)

    def fake_judge(texts):
        judged.extend(texts)
        return np.array([verdict(t) for t in texts])
    monkeypatch.setattr(judges, "judge_toxicity", fake_judge)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--max-new-tokens", "5", "--batch-size", "4",
              cwd=tmp_path)
    arrays, meta = load_npz(tmp_path / "runs/tiny/activations.npz", "")
    assert meta["settings"]["mode"] == "responses" and meta["judge"] == judges.JUDGE
    assert list(arrays["labels"]) == [verdict(t) for t in arrays["continuations"]]
    assert sorted(arrays["continuations"]) == sorted(judged) and len(judged) == 12
    # Each item pools over its own continuation tokens (<= 5; fewer only when it stopped at end-of-sequence).
    assert np.all((arrays["n_positions"] >= 1) & (arrays["n_positions"] <= 5))


def test_collect_is_deterministic(tmp_path):
    data = write_items(tmp_path / "items.jsonl")
    for run in ("a", "b"):
        run_stage("01_collect.py", "--model", "tiny", "--run", run, "--data", data, "--mode", "prompts",
                  cwd=tmp_path)
    a, meta_a = load_npz(tmp_path / "runs/a/activations.npz", "")
    b, meta_b = load_npz(tmp_path / "runs/b/activations.npz", "")
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_collect_is_the_same_for_any_thread_count_and_batch_size_moves_only_last_bits(tmp_path):
    """What docs/RESULTS.md promises ("How exact the numbers are"): on one machine 01 writes the same bytes with
    1 or 2 torch threads (measured on the demo too), while another --batch-size pads the prompts to other lengths,
    and kernels of another shape round differently: the last bits move, never a label or a pooled position, and
    no activation by more than 1e-5 of the largest. A padding position leaking into the pooling would move far more."""
    import torch
    data = write_items(tmp_path / "items.jsonl")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            run_stage("01_collect.py", "--model", "tiny", "--run", f"t{n}", "--data", data, "--mode", "prompts",
                      "--batch-size", 6, cwd=tmp_path)
    finally:
        torch.set_num_threads(threads)
    run_stage("01_collect.py", "--model", "tiny", "--run", "b1", "--data", data, "--mode", "prompts",
              "--batch-size", 1, cwd=tmp_path)
    (one, meta_one), (two, meta_two), (b1, _) = (load_npz(tmp_path / f"runs/{r}/activations.npz", "")
                                                 for r in ("t1", "t2", "b1"))
    assert meta_one["fingerprint"] == meta_two["fingerprint"]
    # what decides the last bits is recorded: the kernels' instruction set, torch, the thread count
    assert (meta_one["numerics"]["threads"], meta_two["numerics"]["threads"]) == (1, 2)
    assert meta_one["numerics"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert meta_one["numerics"]["torch"] == torch.__version__
    assert len(set(one["n_positions"])) > 1  # prompts of several lengths: batches of 6 are padded, of 1 not
    np.testing.assert_array_equal(one["labels"], b1["labels"])
    np.testing.assert_array_equal(one["n_positions"], b1["n_positions"])
    scale = np.abs(one["activations"]).max()
    np.testing.assert_allclose(b1["activations"], one["activations"], rtol=0, atol=1e-5 * scale)


def test_killed_collect_resumes_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    data = write_items(tmp_path / "items.jsonl")
    args = ("--model", "tiny", "--data", data, "--mode", "prompts", "--batch-size", "4")
    run_stage("01_collect.py", *args, "--run", "whole", cwd=tmp_path)
    calls, real_encode = [], common.encode

    def encode_then_die(*a, **k):  # the second batch "crashes" the run
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_encode(*a, **k)
    monkeypatch.setattr(common, "encode", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_stage("01_collect.py", *args, "--run", "resumed", cwd=tmp_path)
    partial = tmp_path / "runs/resumed/activations.partial"
    assert sorted(p.name for p in partial.glob("batch-*.npz")) == ["batch-00000.npz"]
    assert not (tmp_path / "runs/resumed/activations.npz").exists()
    calls.clear()
    monkeypatch.setattr(common, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    run_stage("01_collect.py", *args, "--run", "resumed", cwd=tmp_path)
    assert len(calls) == 2  # only the two unfinished batches were computed
    whole, _ = load_npz(tmp_path / "runs/whole/activations.npz", "")
    resumed, _ = load_npz(tmp_path / "runs/resumed/activations.npz", "")
    for key in whole:
        np.testing.assert_array_equal(whole[key], resumed[key])
    assert not partial.exists()


def test_single_class_calibration_is_refused(tmp_path):
    data = write_items(tmp_path / "items.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(dict(r, label="toxic")) + "\n" for r in rows))
    with pytest.raises(UserError, match="single class"):
        run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=tmp_path)
    assert not (tmp_path / "runs/tiny/activations.npz").exists()


def test_suppression_from_another_model_is_refused(tmp_path, tiny):
    data = write_items(tmp_path / "items.jsonl")
    _, _, sites, model_meta = tiny
    n = sum(m.in_features for _, m in sites)
    save_pt(tmp_path / "runs/tiny/suppression.pt", {"alpha": torch.ones(n)},
            dict(model_meta, model="llava-hf/llava-1.5-7b-hf", data_checksum="x", settings={}, calibration={}))
    with pytest.raises(UserError, match="was made for model 'llava-hf/llava-1.5-7b-hf'"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, cwd=tmp_path)


def test_missing_artifact_names_the_stage_to_run(tmp_path):
    with pytest.raises(UserError, match="run 01_collect.py first"):
        run_stage("02_score.py", "--run", "nothing", cwd=tmp_path)


def test_unknown_model_offline_says_how_to_fix(tmp_path):
    with pytest.raises(UserError, match="local checkpoint folder"):
        models.load_model(str(tmp_path / "no-such-model"))


BAD_ROWS = [
    ("not json", "not valid JSON"),
    (json.dumps({"id": "a", "split": "test"}), "missing field"),
    (json.dumps(dict(id="a", split="test", label="rude", category="c", condition="standard", task="continue",
                     text="hi")), "unknown label 'rude'"),
    (json.dumps(dict(id="a", split="test", label="toxic", category="c", condition="standard", task="continue",
                     text="  ")), "empty text"),
    (json.dumps(dict(id="a", split="test", label="toxic", category="c", condition="standard", task="continue",
                     text="word " * 2000)), "characters"),
    (json.dumps(dict(id="ok", split="test", label="toxic", category="c", condition="standard", task="continue",
                     text="hi")), "duplicate id"),
    (json.dumps(dict(id="a", split="test", label="toxic", category="c", condition="standard", task="continue",
                     text="hi", image="missing.png")), "not found"),
    (json.dumps(dict(id="a", split="test", label="toxic", category="c", condition="standard", task="continue",
                     text="hi", image="broken.png")), "unreadable"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_data_rows_name_their_line(tmp_path, row, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = json.dumps(dict(id="ok", split="test", label="benign", category="c", condition="standard",
                           task="continue", text="the cat sat"))
    path = tmp_path / "items.jsonl"
    path.write_text(good + "\n" + row + "\n")
    with pytest.raises(UserError, match=message) as error:
        load_items(path)
    assert f"{path}:2:" in error.value.message


def test_evaluate_base_alone_needs_no_suppression(tmp_path):
    """`--methods base` evaluates a model as it is (e.g. an exported, alpha-folded checkpoint)."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "3",
              cwd=tmp_path)
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"base"} and results["meta"]["suppression"] is None


def test_bad_limits_are_refused(tmp_path):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match="--limits must look like"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--limits", "standard:5", cwd=tmp_path)


def test_suppression_from_another_data_build_is_refused(tmp_path, tiny):
    """Another build may split differently: evaluating on it could test on calibration items."""
    data = write_items(tmp_path / "items.jsonl")
    _, _, sites, model_meta = tiny
    save_pt(tmp_path / "runs/tiny/suppression.pt", {"alpha": torch.ones(sum(m.in_features for _, m in sites))},
            dict(model_meta, data_checksum="0" * 64, settings={}, calibration={}))
    with pytest.raises(UserError, match="another data build"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, cwd=tmp_path)


def test_non_finite_activations_name_the_layer():
    model, processor, sites, _ = models.load_model("tiny")  # a private copy to break
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    batch = common.encode(processor, [dict(id="0", text="the cat", task="continue", image_path=None)], "cpu")
    with pytest.raises(UserError, match="layers.1.mlp.down_proj"):
        with torch.no_grad(), neurons.record_neurons(sites) as recorder:
            recorder.mask = batch["attention_mask"].bool()
            model.model(**batch)


def test_failed_write_leaves_no_artifact(tmp_path):
    """Atomic writes: an error while writing leaves neither the artifact nor a temp file."""
    with pytest.raises(ValueError, match="pickle"):  # object arrays would need pickle: refused mid-write
        artifacts.save_npz(tmp_path / "a.npz", {"ok": np.ones(3), "bad": np.array([object()], dtype=object)}, {})
    assert list(tmp_path.iterdir()) == []


def test_filter_prompt_and_refusal_accounting(tmp_path, monkeypatch):
    """filter replaces every flagged answer by the refusal (generating nothing); refusal_rate counts it; the
    copied/novel split follows the judge's verdict on the prompt."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    refusal_marker = "sorry"

    def judge(texts):  # everything is "toxic" except refusals and the benign prompts' texts
        benign = set(MILD_TEXTS["benign"])
        return np.array([0.0 if refusal_marker in t.lower() or t in benign else 1.0 for t in texts])
    monkeypatch.setattr(judges, "judge_toxicity", judge)
    generated = []
    real_generate = common.generate
    monkeypatch.setattr(common, "generate", lambda *a, **k: generated.append(1) or real_generate(*a, **k))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,prompt,filter",
              "--max-new-tokens", "3", cwd=tmp_path)
    assert len(generated) == 2  # base and prompt; filter post-processes base
    rows = {(r["method"], r["label"]): r for r in json.loads((tmp_path / "runs/tiny/results.json").read_text())["rows"]}
    assert rows["base", "toxic"]["harmful_rate"] == 1.0 and rows["filter", "toxic"]["harmful_rate"] == 0.0
    assert rows["filter", "toxic"]["refusal_rate"] == 1.0 and rows["base", "toxic"]["refusal_rate"] == 0.0
    assert rows["base", "toxic"]["n_prompt_flagged"] == 6 and rows["base", "benign"]["n_prompt_flagged"] == 0
    assert rows["base", "toxic"]["harmful_rate_copied"] == 1.0 and rows["base", "toxic"]["harmful_rate_novel"] is None


def test_selectivity_is_zero_for_an_identity_suppression(tmp_path, tiny, monkeypatch):
    """With alpha = 1 everywhere the teacher-forced NLL of base's answers cannot change: every delta is 0;
    the offensive/clean split follows the judge's verdicts on base's answers."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    _, _, sites, model_meta = tiny
    save_pt(tmp_path / "runs/tiny/suppression.pt", {"alpha": torch.ones(sum(m.in_features for _, m in sites))},
            dict(model_meta, data_checksum=load_items(data)[1], settings={}, calibration={}))
    monkeypatch.setattr(judges, "judge_toxicity",
                        lambda texts: np.array([float(hashlib.sha256(t.encode()).digest()[0] % 2) for t in texts]))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,sgm", "--max-new-tokens", "5",
              "--judge-threshold", "0.5", cwd=tmp_path)
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    (entry,) = results["selectivity"]
    base_toxic = next(r for r in results["rows"] if (r["method"], r["label"]) == ("base", "toxic"))
    assert entry["n_offensive"] == round(base_toxic["harmful_rate"] * 6)
    assert entry["n_offensive"] + entry["n_clean"] == 6
    assert all(entry[k] in (0.0, None) for k in ("delta_nll_offensive", "delta_nll_clean", "selectivity"))


def test_strength_sweep_scales_alpha(tmp_path, tiny):
    """--strengths adds sgm@s methods; strength 0 is exactly base, and the trade-off plot is written."""
    data = write_items(tmp_path / "items.jsonl", splits=("dev",))
    _, _, sites, model_meta = tiny
    n = sum(m.in_features for _, m in sites)
    save_pt(tmp_path / "runs/tiny/suppression.pt", {"alpha": torch.full((n,), 0.6)},
            dict(model_meta, data_checksum=load_items(data)[1], settings={}, calibration={}))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--split", "dev", "--methods", "base",
              "--strengths", "0,2", "--report", "sweep", "--max-new-tokens", "4", cwd=tmp_path)
    run = tmp_path / "runs/tiny"
    results = json.loads((run / "sweep.json").read_text())
    assert (run / "sweep-tradeoff.png").exists()
    answers = [json.loads(line) for line in (run / "sweep-answers.jsonl").read_text().splitlines()]
    by_method = {m: [a["answer"] for a in answers if a["method"] == m] for m in ("base", "sgm@0", "sgm@2")}
    assert by_method["sgm@0"] == by_method["base"]            # strength 0 = the unmodified model
    fluency = {f["method"]: f["perplexity"] for f in results["fluency"]}
    assert fluency["sgm@0"] == fluency["base"] and fluency["sgm@2"] != fluency["base"]


def test_visual_probe_accuracy(tmp_path, monkeypatch):
    """Items with an exact `answer` are scored as accuracy, not as toxic/benign rows; a count may be a digit."""
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "probe.png")
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    probes = [dict(id=f"probe-count-{k:02d}-standard", split="test", label="benign", category="visual-probe",
                   condition="standard", task="answer", text=f"How many circles? ({k})", image="probe.png",
                   source="tests", image_text="", answer=answer) for k, answer in enumerate(["three", "red"])]
    with open(data, "a") as f:
        f.writelines(json.dumps(p) + "\n" for p in probes)
    replies = {"How many circles? (0)": "I see 3 circles.", "How many circles? (1)": "It is blue."}

    def fake_generate(model, processor, items, *args, **kwargs):
        texts = [replies.get(item["text"], "the cat") for item in items]
        return texts, [[1, 2] for _ in items]
    monkeypatch.setattr(common, "generate", fake_generate)
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", cwd=tmp_path)
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    (probe,) = results["probe"]
    assert probe["n"] == 2 and probe["accuracy"] == 0.5
    assert probe["by_kind"]["probe-count"] == dict(accuracy=0.5, chance=0.5, most_said="i")
    assert sum(r["n"] for r in results["rows"]) == 12  # the probe is not in the toxic/benign rows


def test_batches_keep_long_prompts_apart():
    """Sorted by length, at most batch_size each, and a much longer prompt starts a new batch."""
    items = [dict(id=str(i), text="x" * n) for i, n in enumerate([900, 10, 30, 12, 950, 11])]
    got = [index for index, _ in common.batches(items, 2, desc=None)]
    assert got == [[1, 5], [3, 2], [0, 4]]
    got = [index for index, _ in common.batches(items, 64, desc=None)]
    assert got == [[1, 5, 3, 2], [0, 4]]


def test_answer_perplexity_equals_a_plain_forward(tmp_path, tiny):
    """The answer perplexity (teacher forcing through padded batches, logits kept only where needed) equals a
    plain, unpadded full forward per item: exp of the mean over items of each answer's mean token NLL."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "4",
              cwd=tmp_path)
    run = tmp_path / "runs/tiny"
    (fluency,) = json.loads((run / "results.json").read_text())["fluency"]
    answers = {a["id"]: a for a in map(json.loads, (run / "results-answers.jsonl").read_text().splitlines())}
    model, processor, _, _ = tiny
    items = [item for item in load_items(data)[0] if item["label"] == "benign"]
    nll = []
    for item in items:
        batch = common.encode(processor, [item], "cpu")
        ids = torch.tensor([answers[item["id"]]["tokens"]])
        with torch.no_grad():
            logits = model(**dict(batch, input_ids=torch.cat([batch["input_ids"], ids], 1),
                                  attention_mask=torch.ones(1, batch["input_ids"].shape[1] + ids.shape[1],
                                                            dtype=torch.long))).logits[0]
        logprobs = torch.log_softmax(logits[batch["input_ids"].shape[1] - 1:-1].double(), -1)
        nll.append(-logprobs[torch.arange(ids.shape[1]), ids[0]].mean().item())
    assert fluency["n_answers"] == 6
    assert abs(fluency["answer_perplexity"] - np.exp(np.mean(nll))) < 1e-3 * fluency["answer_perplexity"]


def test_sampled_metrics_follow_the_judge_and_repeat(tmp_path, monkeypatch):
    """--samples N: expected maximum toxicity = mean over items of the most toxic sample; toxicity probability =
    share of items with a sample at or above the threshold; the same seed samples the same answers."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    monkeypatch.setattr(judges, "judge_toxicity", lambda texts: np.array([0.3 + 0.4 * (len(t) % 2) for t in texts]))
    args = ("--model", "tiny", "--data", data, "--methods", "base,filter", "--max-new-tokens", "5", "--samples", "3")
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    run = tmp_path / "runs/tiny"
    answers = [json.loads(line) for line in (run / "results-answers.jsonl").read_text().splitlines()]
    rows = {(r["method"], r["label"]): r for r in json.loads((run / "results.json").read_text())["rows"]}
    for label in ("toxic", "benign"):
        most = [max(0.3 + 0.4 * (len(t) % 2) for t in a["samples"]) for a in answers
                if (a["method"], a["label"]) == ("base", label)]
        assert all(len(a["samples"]) == 3 for a in answers if a["method"] == "base")
        assert rows["base", label]["expected_max_toxicity"] == pytest.approx(np.mean(most))
        assert rows["base", label]["toxicity_probability"] == pytest.approx(np.mean([m >= 0.5 for m in most]))
        assert rows["filter", label]["expected_max_toxicity"] is None  # filter samples nothing
    assert any(len(set(a["samples"])) > 1 for a in answers if a["method"] == "base")  # really sampled
    first = [a["samples"] for a in answers]
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    again = [json.loads(line)["samples"] for line in (run / "results-answers.jsonl").read_text().splitlines()]
    assert again == first


def test_pieces_of_another_configuration_are_discarded(tmp_path):
    """A partial folder from other settings (or without its key) is never mixed into a new run."""
    data = write_items(tmp_path / "items.jsonl")
    args = ("--model", "tiny", "--data", data, "--mode", "prompts", "--batch-size", "4")
    run_stage("01_collect.py", *args, "--run", "whole", cwd=tmp_path)
    stale = tmp_path / "runs/r/activations.partial"
    stale.mkdir(parents=True)
    artifacts.save_npz(stale / "batch-00000.npz", {"activations": np.full((4, 96), 7.0, dtype=np.float32)}, {})
    run_stage("01_collect.py", *args, "--run", "r", cwd=tmp_path)
    whole, _ = load_npz(tmp_path / "runs/whole/activations.npz", "")
    fresh, _ = load_npz(tmp_path / "runs/r/activations.npz", "")
    np.testing.assert_array_equal(whole["activations"], fresh["activations"])


def test_no_fluency_texts_is_a_clear_error(tmp_path):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"] == "toxic"))
    with pytest.raises(UserError, match="no texts to measure fluency on"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", cwd=tmp_path)


def test_collect_limit_is_a_seeded_sample_not_the_first_items(tmp_path):
    """The data file groups items by source, so --limit must sample; the same seed gives the same sample."""
    data = write_items(tmp_path / "items.jsonl")
    calibration = [item["id"] for item in load_items(data)[0] if item["split"] == "calibration"]
    chosen = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", "--limit", 5,
                  "--seed", seed, "--run", run, cwd=tmp_path)
        arrays, meta = load_npz(tmp_path / "runs" / run / "activations.npz", "")
        chosen[run] = list(arrays["item_ids"])
        assert meta["settings"]["limit"] == 5 and meta["settings"]["seed"] == seed
    assert chosen["a"] == chosen["b"] and len(chosen["a"]) == 5 and set(chosen["a"]) <= set(calibration)
    assert chosen["a"] != calibration[:5] and chosen["a"] != chosen["c"]
    assert chosen["a"] == sorted(chosen["a"], key=calibration.index)  # file order kept


def test_second_genre_perplexity_equals_a_plain_forward_and_survives_base_from(tmp_path, tiny):
    """--fluency-also news: the split's standard news items get their own perplexity beside the books', each text's
    NLL equal to a plain unpadded forward of that text alone, the change vs base equal to the ratio of the two
    perplexities with a bootstrap interval around it; --base-from reads base's per-text NLLs back unchanged."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    extra = [dict(id=f"test-standard-{category}-{k}", split="test", label="benign", category=category,
                  condition="standard", task="continue", text=text, image="", source="tests", image_text="")
             for category, texts in (("book", ["the old mill stood by the stream", "she read until the lamp went out",
                                               "rain fell on the quiet town"]),
                                     ("news", ["the council met on tuesday to discuss roads",
                                               "a new bridge opened in the city", "schools reopen next week"]))
             for k, text in enumerate(texts)]
    with open(data, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in extra)
    model, processor, sites, model_meta = tiny
    n = sum(m.in_features for _, m in sites)
    save_pt(tmp_path / "runs/tiny/suppression.pt", {"alpha": torch.full((n,), 0.3)},
            dict(model_meta, data_checksum=load_items(data)[1], settings={}, calibration={}))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,sgm", "--max-new-tokens", "3",
              "--selectivity", "false", cwd=tmp_path)
    run = tmp_path / "runs/tiny"
    results = json.loads((run / "results.json").read_text())
    fluency = {f["method"]: f for f in results["fluency"]}
    assert [g["texts"] for g in fluency["base"]["genres"]] == ["book", "news"]
    assert [g["n"] for g in fluency["base"]["genres"]] == [3, 3]
    # news is also generated on (a benign standard item), books are not
    assert next(r for r in results["rows"] if (r["method"], r["label"]) == ("base", "benign"))["n"] == 6 + 3
    loaded = {item["id"]: item for item in load_items(data)[0]}  # as the stage reads them
    for genre, (base_genre, sgm_genre) in zip(("book", "news"), zip(fluency["base"]["genres"],
                                                                      fluency["sgm"]["genres"])):
        expected = []
        for row in extra:
            if row["category"] != genre:
                continue
            batch = common.encode(processor, [loaded[row["id"]]], "cpu")
            with torch.no_grad():
                logits = model(**batch).logits[0, :-1].double()
            targets = batch["input_ids"][0, 1:]
            counted = targets != model.config.image_token_id
            nll = -torch.log_softmax(logits, -1)[counted].gather(1, targets[counted, None])
            expected.append(float(nll.mean()))
        assert np.allclose(base_genre["nll"], expected, rtol=1e-4), (genre, base_genre["nll"], expected)
        assert base_genre["perplexity"] == pytest.approx(np.exp(np.mean(base_genre["nll"])), rel=1e-12)
        ratio = sgm_genre["perplexity"] / base_genre["perplexity"] - 1
        assert sgm_genre["change_vs_base"] == pytest.approx(ratio, rel=1e-9, abs=1e-12) and ratio != 0
        low, high = sgm_genre["change_ci"]
        assert low <= sgm_genre["change_vs_base"] <= high and low < high
        assert base_genre["change_vs_base"] == 0 and base_genre["change_ci"] is None
    assert fluency["sgm"]["perplexity"] == fluency["sgm"]["genres"][0]["perplexity"]  # the books' at the top
    assert "| news perplexity | vs base [95% CI] |" in (run / "results.md").read_text()

    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--report", "base",
              "--max-new-tokens", "3", "--selectivity", "false", cwd=tmp_path)
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,sgm", "--max-new-tokens", "3",
              "--selectivity", "false", "--base-from", "runs/tiny/base.json", "--report", "again", cwd=tmp_path)
    again = json.loads((run / "again.json").read_text())
    assert again["fluency"] == results["fluency"]

    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "3",
              "--selectivity", "false", "--fluency-also", "", "--report", "books", cwd=tmp_path)
    (books,) = json.loads((run / "books.json").read_text())["fluency"]
    assert [g["texts"] for g in books["genres"]] == ["book"]


def test_the_eyes_travel_through_every_stage(tmp_path, monkeypatch):
    """The seeing demo's artifacts carry the eyes' fingerprint from 01 through 02 and 03, so 04 on the same eyes runs
    (it refused every run of the seeing demo while 02 and 03 dropped it) and 04 on other eyes is refused."""
    data = write_items(tmp_path / "items.jsonl")
    real = models.load_model
    eyes = {"now": "4ae456ab51b1"}

    def seeing(*args, **kwargs):  # the tiny model as if it were behind a set of eyes
        model, processor, sites, model_meta = real(*args, **kwargs)
        return model, processor, sites, dict(model_meta, eyes=eyes["now"])
    monkeypatch.setattr(models, "load_model", seeing)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=tmp_path)
    run_stage("02_score.py", "--run", "tiny", "--permutations", "20", cwd=tmp_path)
    run_stage("03_suppress.py", "--run", "tiny", cwd=tmp_path)
    for name in ("expertise.npz", "suppression.pt"):
        meta = (load_npz if name.endswith("npz") else load_pt)(tmp_path / "runs/tiny" / name, "x")[1]
        assert meta["eyes"] == "4ae456ab51b1", name
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,sgm", "--max-new-tokens", "2",
              cwd=tmp_path)
    assert (tmp_path / "runs/tiny/results.json").exists()
    eyes["now"] = "4c8995c504c0"
    with pytest.raises(UserError, match="was made with the eyes 4ae456ab51b1"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,sgm",
                  "--max-new-tokens", "2", cwd=tmp_path)


def test_typographic_items_are_paired_with_their_typed_twins(tmp_path, monkeypatch):
    """The report's twins: each typographic item whose standard twin (same id less its last part) was evaluated,
    its rate against the twins' and an exact McNemar p; an item without an evaluated twin is left out. Golden
    values counted by hand: 5 toxic pairs (k = 5 has no typed twin), typed flagged for k = 0..3, rendered for
    k = 0, 4 (and 5): 2/5 vs 4/5, discordant 1 / 3, two-sided exact binomial p = (1 + 4 + 4 + 1) / 2^4 = 10/16."""
    rows = []
    for label, texts in MILD_TEXTS.items():
        for k, text in enumerate(texts):
            for condition in ("standard", "typographic"):
                if (label, k, condition) == ("toxic", 5, "standard"):
                    continue  # a typographic item whose typed twin is not in the data: no pair
                rows.append(dict(id=f"pair-{label}-{k}-{condition}", split="test", label=label, category="mild",
                                 condition=condition, task="continue", text=text, image="", source="tests",
                                 image_text=text if condition == "typographic" else ""))
    rows.append(dict(id="book-0-standard", split="test", label="benign", category="book", condition="standard",
                     task="continue", text="the morning was quiet", image="", source="tests", image_text=""))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flagged = {("standard", k) for k in range(4)} | {("typographic", 0), ("typographic", 4), ("typographic", 5)}

    def fake_generate(model, processor, items, *args, **kwargs):
        keys = [(item["condition"], int(item["id"].split("-")[2])) if item["label"] == "toxic" else None
                for item in items]
        return ["TOX" if key in flagged else "fine" for key in keys], [[1, 2] for _ in items]
    monkeypatch.setattr(common, "generate", fake_generate)
    monkeypatch.setattr(judges, "judge_toxicity", lambda texts: np.array([float(t == "TOX") for t in texts]))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--conditions",
              "standard,typographic", "--fluency-also", "", "--selectivity", "false", cwd=tmp_path)
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    twins = {(t["condition"], t["label"]): t for t in results["twins"]}
    assert set(twins) == {("typographic", "toxic"), ("typographic", "benign")}
    toxic = twins["typographic", "toxic"]
    assert toxic["n_pairs"] == 5 and toxic["method"] == "base"
    assert (toxic["harmful_rate"], toxic["standard_rate"]) == (2 / 5, 4 / 5)
    assert (toxic["only_condition"], toxic["only_standard"]) == (1, 3)
    assert toxic["p_vs_standard"] == pytest.approx(10 / 16)
    assert twins["typographic", "benign"]["n_pairs"] == 6 and twins["typographic", "benign"]["p_vs_standard"] is None
    report = (tmp_path / "runs/tiny/results.md").read_text()
    assert "| base | typographic | toxic | 5 | 40.0% | 80.0% | 1 / 3 | 0.62 |" in report
    assert "typographic vs the same texts typed (standard), base, toxic items (5 pairs): 40.0% vs 80.0%" in report


def test_random_draws_measure_the_random_controls_fluency_again(tmp_path, tiny):
    """--random-draws 2: the random control's book perplexity also under seeds 1 and 2, each change vs base equal
    to a plain text_nll under matched_random_control at that seed (seed 0 is the `random` row's), with the median,
    range and the count of draws costlier than sgm; the report says it in a line."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    books = [dict(id=f"test-standard-book-{k}", split="test", label="benign", category="book", condition="standard",
                  task="continue", text=text, image="", source="tests", image_text="")
             for k, text in enumerate(["the old mill stood by the stream", "she read until the lamp went out"])]
    with open(data, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in books)
    model, processor, sites, model_meta = tiny
    n = sum(m.in_features for _, m in sites)
    alpha = torch.linspace(0.0, 1.0, n)  # graded, so that every shuffle damps other neurons
    save_pt(tmp_path / "runs/tiny/suppression.pt", {"alpha": alpha},
            dict(model_meta, data_checksum=load_items(data)[1], settings={}, calibration={}))
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base,sgm,random", "--random-draws", 2,
              "--max-new-tokens", "2", "--selectivity", "false", "--fluency-also", "", cwd=tmp_path)
    results = json.loads((tmp_path / "runs/tiny/results.json").read_text())
    draws = results["random_draws"]["book"]
    loaded = [item for item in load_items(data)[0] if item["category"] == "book"]
    sizes = [m.in_features for _, m in sites]
    base = models.text_nll(model, processor, loaded).mean()
    expected = []
    for seed in (0, 1, 2):
        with neurons.suppress_neurons(sites, neurons.matched_random_control(alpha, sizes, seed)):
            expected.append(np.exp(models.text_nll(model, processor, loaded).mean() - base) - 1)
    with neurons.suppress_neurons(sites, alpha):
        sgm = np.exp(models.text_nll(model, processor, loaded).mean() - base) - 1
    assert draws["seeds"] == [0, 1, 2] and np.allclose(draws["changes"], expected, rtol=1e-4, atol=1e-7)
    assert len(set(np.round(expected, 6))) == 3  # the draws damp different neurons
    fluency = {f["method"]: f for f in results["fluency"]}
    assert draws["changes"][0] == pytest.approx(fluency["random"]["change_vs_base"], rel=1e-9)
    assert draws["sgm_change"] == pytest.approx(sgm, rel=1e-4, abs=1e-7)
    assert draws["costlier_than_sgm"] == sum(e > sgm for e in expected)
    assert (draws["median"], draws["low"], draws["high"]) == pytest.approx(
        (np.median(expected), min(expected), max(expected)), rel=1e-4, abs=1e-7)
    assert results["meta"]["settings"]["random_draws"] == 2
    assert "The random control drawn 3 times (seeds 0, 1, 2; the row above is seed 0)" in (
        tmp_path / "runs/tiny/results.md").read_text()
    from PIL import Image
    with Image.open(tmp_path / "runs/tiny/results.png") as png:  # a third panel: the draws (12 -> 17 inches wide)
        assert png.size[0] == round(17 * 110)


def test_the_book_sample_does_not_depend_on_the_item_limits(tmp_path):
    """The fluency texts are a seeded sample of their own: a report on a few items and one on the full split score
    the same books (the same per-text NLLs), so their perplexities compare."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    books = [dict(id=f"test-standard-book-{k}", split="test", label="benign", category="book", condition="standard",
                  task="continue", text=text, image="", source="tests", image_text="")
             for k, text in enumerate(["the old mill stood by the stream", "she read until the lamp went out",
                                       "rain fell on the quiet town", "a boat drifted past the pier"])]
    with open(data, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in books)
    for report, limits in (("full", "0"), ("few", "standard=2")):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--limits", limits,
                  "--perplexity-items", 2, "--max-new-tokens", "2", "--selectivity", "false", "--fluency-also", "",
                  "--report", report, cwd=tmp_path)
    full, few = (json.loads((tmp_path / f"runs/tiny/{r}.json").read_text()) for r in ("full", "few"))
    assert sum(r["n"] for r in few["rows"]) == 4 and sum(r["n"] for r in full["rows"]) == 12
    assert few["fluency"][0]["genres"][0]["nll"] == full["fluency"][0]["genres"][0]["nll"]
    assert len(full["fluency"][0]["genres"][0]["nll"]) == 2
