"""tools/modalities.py: two calibrations compared neuron by neuron. Synthetic runs with experts planted in both (the
tool must find them, every number checked against one computed here another way: AUROC by counting pairs, Spearman
from average ranks, the hypergeometric tail from binomial coefficients, r from np.corrcoef), runs that share nothing
(it must report chance) or only their task (its stratified chance must hold that), rows that repeat a prompt (shuffled
within it), the refusals, and the real stages' artifacts on `tiny` (schema and pairing)."""
import json
import math
import subprocess

import numpy as np
import pytest
from conftest import MILD_TEXTS, command
from PIL import Image, ImageDraw
from scipy.stats import false_discovery_control, mannwhitneyu
from test_pipeline import run_stage

from common import load_items
from sgm.artifacts import save_npz

N_NEURONS, N_SOURCES, PLANTED = 400, 60, 20


def auroc_by_pairs(activations, labels):
    """P(toxic row > clean row) + half the ties, counted over every (toxic, clean) pair, per neuron."""
    toxic, clean = activations[labels == 1], activations[labels == 0]
    above = (toxic[:, None, :] > clean[None, :, :]).mean((0, 1))
    tied = (toxic[:, None, :] == clean[None, :, :]).mean((0, 1))
    return above + 0.5 * tied


def write_run(folder, name, activations, labels, ids, model="synthetic", auroc=None, upstream=None, tasks=None,
              writes=None, sample_index=None):
    """An activations.npz and its expertise.npz as 01 and 02 write them, and the items they came from (`tasks`:
    each item's task, by default `continue` for all)."""
    run = folder / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    data = run / "items.jsonl"
    data.write_text("".join(json.dumps(dict(
        id=i, split="calibration", label=["benign", "toxic"][int(label)], category="mild", condition="standard",
        task=tasks[n] if tasks else "continue", text="Continue the text in the image.", image="",
        source="tests", image_text="")) + "\n" for n, (i, label) in enumerate(zip(ids, labels))
        if i not in ids[:n]))  # a prompt's sampled rows share its item
    checksum = load_items(data)[1]
    arrays = dict(activations=activations.astype(np.float32), labels=labels, item_ids=np.array(ids),
                  sample_index=np.zeros(len(ids), int) if sample_index is None else sample_index)
    scores = {}
    if writes is not None:  # 01 --writer's second matrix, and 02's writer score d from it
        arrays["writes"] = writes.astype(np.float32)
        scores["writer"] = writes[labels == 1].mean(0) - writes[labels == 0].mean(0)
    saved = save_npz(run / "activations.npz", arrays, dict(model=model, sites="mlp", settings=dict(mode="prompts")))
    auroc = auroc_by_pairs(activations.astype(np.float32), labels) if auroc is None else auroc
    p = mannwhitneyu(activations[labels == 1], activations[labels == 0], axis=0, alternative="greater").pvalue
    save_npz(run / "expertise.npz", dict(auroc=auroc, q_value=false_discovery_control(p), **scores),
             dict(model=model, sites="mlp", upstream={"activations.npz": upstream or saved["fingerprint"]},
                  data=str(data), data_checksum=checksum))


def synthetic(folder, shared):
    """Two runs over the same N_SOURCES source texts (half toxic). Neurons 0..PLANTED-1 fire on toxic rows in the
    text run; with `shared` they do in the image run too, and each source text moves them alike in both (a latent
    per text). Everything else is independent noise."""
    rng = np.random.default_rng(7)
    labels = np.repeat([1, 0], N_SOURCES // 2)
    latent = rng.normal(size=(N_SOURCES, PLANTED))
    typed = rng.normal(size=(N_SOURCES, N_NEURONS))
    rendered = rng.normal(size=(N_SOURCES, N_NEURONS))
    typed[:, :PLANTED] += 1.5 * labels[:, None] + latent
    if shared:
        rendered[:, :PLANTED] += 1.5 * labels[:, None] + latent
    stems = [f"src-{i:03d}" for i in range(N_SOURCES)]
    # What the neurons write: the planted ones push towards toxic words on toxic rows, in both runs when `shared`.
    writes_typed, writes_rendered = rng.normal(size=(2, N_SOURCES, N_NEURONS))
    writes_typed[:, :PLANTED] += 2.0 * labels[:, None]
    if shared:
        writes_rendered[:, :PLANTED] += 2.0 * labels[:, None]
    write_run(folder, "typed", typed, labels, [f"{s}-standard" for s in stems], writes=writes_typed)
    order = rng.permutation(N_SOURCES)  # the image run's rows in another order: pairing must go by id
    write_run(folder, "seen", rendered[order], labels[order], [f"{stems[i]}-typographic" for i in order],
              writes=writes_rendered[order])
    return typed, rendered, labels, writes_typed.astype(np.float32), writes_rendered.astype(np.float32)


def modalities(folder, *args):
    done = subprocess.run(command("tools/modalities.py", "--text", "typed", "--image", "seen", "--top", "20,50",
                                  "--draws", 40, *args), cwd=folder, capture_output=True,
                          text=True)
    return done


def result_of(folder):
    return json.loads((folder / "runs" / "seen" / "modalities-typed.json").read_text())


def spearman(a, b):
    """Pearson's r of the average ranks (AUROCs tie: they are counts of pairs)."""
    def ranks(x):
        values, group = np.unique(x, return_inverse=True)
        position = np.empty(x.size)
        position[np.argsort(x, kind="stable")] = np.arange(x.size)
        return (np.bincount(group, weights=position) / np.bincount(group))[group]
    return np.corrcoef(ranks(a), ranks(b))[0, 1]


def tail(shared, k):
    """P(at least `shared` of k random neurons fall in a fixed k-set of N_NEURONS)."""
    total = math.comb(N_NEURONS, k)
    return sum(math.comb(k, x) * math.comb(N_NEURONS - k, k - x) for x in range(shared, k + 1)) / total


def test_planted_shared_experts_are_found(tmp_path):
    typed, rendered, labels, writes_typed, writes_rendered = synthetic(tmp_path, shared=True)
    done = modalities(tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = result_of(tmp_path)
    typed, rendered = typed.astype(np.float32), rendered.astype(np.float32)  # as stored
    auroc_text, auroc_image = auroc_by_pairs(typed, labels), auroc_by_pairs(rendered, labels)
    assert result["agreement"]["auroc"]["real"] == pytest.approx(spearman(auroc_text, auroc_image), abs=1e-9)
    d_text, d_image = (w[labels == 1].mean(0) - w[labels == 0].mean(0) for w in (writes_typed, writes_rendered))
    scores = dict(auroc=(auroc_text, auroc_image), writer=(d_text, d_image))
    assert sorted({row["score"] for row in result["overlap"]}) == ["auroc", "writer"]
    for row in result["overlap"]:
        k, (text_score, image_score) = row["k"], scores[row["score"]]
        top_text = set(np.argsort(-text_score, kind="stable")[:k])
        top_image = set(np.argsort(-image_score, kind="stable")[:k])
        assert row["shared"] == len(top_text & top_image)
        assert row["expected"] == pytest.approx(k * k / N_NEURONS)
        assert row["p"] == pytest.approx(tail(row["shared"], k), rel=1e-6)
    assert result["agreement"]["writer"]["real"] == pytest.approx(spearman(d_text, d_image), abs=1e-6)
    assert result["agreement"]["writer"]["p"] < 0.1  # 20 shared writers of 400: a modest rho, above chance
    by_writer = [row for row in result["overlap"] if row["score"] == "writer"]
    assert by_writer[0]["k"] == 20 and by_writer[0]["shared"] >= 15
    top20 = result["overlap"][0]
    assert top20["k"] == 20 and top20["shared"] >= 15 and top20["p"] < 1e-15  # planted: found in both
    carry = result["carry"][0]
    planted_mean = auroc_image[np.argsort(-auroc_text, kind="stable")[:20]].mean()
    assert carry["real"] == pytest.approx(planted_mean)
    assert carry["p"] == pytest.approx(1 / 41) and carry["chance_high"] < 0.6 < carry["real"]  # beats every shuffle
    pairs = result["pairs"]
    assert pairs["n_pairs"] == N_SOURCES
    top = np.argsort(-auroc_text, kind="stable")[:20]
    r = [np.corrcoef(typed[:, m], rendered[:, m])[0, 1] for m in top]
    assert pairs["top"][0]["real"] == pytest.approx(np.median(r), abs=1e-6)  # r is kept in float32
    assert pairs["top"][0]["real"] > 0.5 > pairs["top"][0]["chance_high"]
    # The chance draws: rho with shuffled image labels and r with shuffled pairs sit near zero.
    assert abs(result["agreement"]["auroc"]["chance_mean"]) < 0.1
    assert abs(pairs["all"]["chance_mean"]) < 0.1
    assert (tmp_path / "runs" / "seen" / "modalities-typed.png").stat().st_size > 10_000
    first = (tmp_path / "runs" / "seen" / "modalities-typed.json").read_bytes()
    assert modalities(tmp_path).returncode == 0  # the same inputs give the same artifact
    assert (tmp_path / "runs" / "seen" / "modalities-typed.json").read_bytes() == first


def test_runs_that_share_nothing_score_chance(tmp_path):
    synthetic(tmp_path, shared=False)
    done = modalities(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = result_of(tmp_path)
    assert abs(result["agreement"]["auroc"]["real"]) < 0.15
    assert all(row["p"] > 0.01 for row in result["overlap"])
    assert all(row["p"] > 0.05 for row in result["carry"] + result["pairs"]["top"] + [result["pairs"]["all"]])


def test_what_the_task_shares_is_chance(tmp_path):
    """Typed and rendered rows that share only their task (two instructions, as MM-TOXIC-QA's typographic items
    have, one a task) correlate over the pairs, but not beyond pairs shuffled within label x task.
    A plain shuffle of the pairs would call that correlation the phrase's."""
    rng = np.random.default_rng(3)
    labels = np.repeat([1, 0], N_SOURCES // 2)
    task = np.arange(N_SOURCES) % 2
    typed = rng.normal(size=(N_SOURCES, N_NEURONS)) + 2.0 * task[:, None]
    rendered = rng.normal(size=(N_SOURCES, N_NEURONS)) * 0.01 + 2.0 * task[:, None]  # the task, nothing else
    typed[:, :PLANTED] += 1.5 * labels[:, None]
    stems = [f"src-{i:03d}" for i in range(N_SOURCES)]
    write_run(tmp_path, "typed", typed, labels, [f"{s}-standard" for s in stems])
    write_run(tmp_path, "seen", rendered, labels, [f"{s}-typographic" for s in stems],
              tasks=[["continue", "answer"][t] for t in task])
    done = modalities(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    pairs = result_of(tmp_path)["pairs"]
    assert pairs["strata"] == 4
    top = pairs["top"][0]
    assert top["real"] > 0.5 and top["chance_low"] > 0.4  # the chance holds the task's correlation ...
    assert abs(top["real"] - top["chance_mean"]) < 0.05 and top["p"] > 0.01  # ... so nothing is left over


def test_rows_of_one_prompt_are_shuffled_among_themselves(tmp_path):
    """An image run in responses mode with a sampled row beside each greedy one (01 --samples 1), both rows of a
    prompt with the same label: shuffles within each prompt leave every label where it is, so the carry's chance is
    the real value and p = 1 (a shuffle over all rows would put the chance near 0.5). Pairs use the greedy rows."""
    typed, rendered, labels, _, _ = synthetic(tmp_path, shared=True)
    ids = [f"src-{i:03d}-typographic" for i in range(N_SOURCES)]
    sampled = rendered + np.random.default_rng(5).normal(size=rendered.shape)
    write_run(tmp_path, "seen", np.concatenate([rendered, sampled]), np.concatenate([labels, labels]), ids + ids,
              sample_index=np.repeat([0, 1], N_SOURCES))
    done = modalities(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = result_of(tmp_path)
    carry = result["carry"][0]
    assert carry["real"] > 0.6 and carry["chance_mean"] == pytest.approx(carry["real"], abs=1e-6) and carry["p"] == 1
    assert result["rows"]["image"] == 2 * N_SOURCES and result["pairs"]["n_pairs"] == N_SOURCES
    top = np.argsort(-auroc_by_pairs(typed.astype(np.float32), labels), kind="stable")[:20]
    r = [np.corrcoef(typed[:, m], rendered[:, m])[0, 1] for m in top]  # the greedy rows, not the sampled ones
    assert result["pairs"]["top"][0]["real"] == pytest.approx(np.median(r), abs=1e-6)


def test_refusals_are_one_line(tmp_path):
    typed, rendered, labels, _, _ = synthetic(tmp_path, shared=True)
    ids = [f"src-{i:03d}-typographic" for i in range(N_SOURCES)]

    def refused(*args):
        done = modalities(tmp_path, *args)
        last = done.stderr.strip().splitlines()[-1]  # after a progress bar, when the fault shows in the data
        assert done.returncode == 1 and last.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "runs" / "seen" / "modalities-typed.json").exists()
        return last

    assert "both runs/typed" in refused("--image", "typed")
    assert "02_score.py --run nothing" in refused("--image", "nothing")
    assert "whole numbers" in refused("--top", "ten")
    assert "more than the model's 400 neurons" in refused("--top", "500")
    write_run(tmp_path, "seen", rendered, labels, ids, model="another")
    assert "different models" in refused()
    write_run(tmp_path, "seen", rendered, labels, ids, upstream="0" * 64)
    assert "rerun 02_score.py --run seen" in refused()
    write_run(tmp_path, "seen", rendered, labels, ids)
    with open(tmp_path / "runs" / "seen" / "items.jsonl", "a") as f:
        f.write("\n")  # a changed byte: the pairs' strata come from these items
    assert "changed since runs/seen was collected" in refused()
    wrong = auroc_by_pairs(rendered, labels)
    wrong[3] += 0.01
    write_run(tmp_path, "seen", rendered, labels, ids, auroc=wrong)
    assert "not its activations'" in refused()


def test_real_stages_on_tiny(tmp_path):
    """01 (prompts mode) on typed items and on the same texts drawn into images (--positions image), 02 on both,
    then the tool: the stages' own artifacts are what it reads, and every source text pairs up."""
    rows = []
    for label, texts in MILD_TEXTS.items():
        for k, text in enumerate(texts):
            picture = Image.new("RGB", (256, 256), "white")
            ImageDraw.Draw(picture).text((8, 100), text, fill="black")
            picture.save(tmp_path / f"{label}-{k}.png")
            for condition in ("standard", "typographic"):
                rows.append(dict(id=f"mild-{label}-{k}-{condition}", split="calibration", label=label,
                                 category="mild", condition=condition, task="continue",
                                 text=text if condition == "standard" else "Continue the text in the image.",
                                 image=f"{label}-{k}.png" if condition == "typographic" else "", source="tests",
                                 image_text=text if condition == "typographic" else ""))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", "--run", "typed",
              "--conditions", "standard", cwd=tmp_path)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", "--run", "seen",
              "--conditions", "typographic", "--positions", "image", cwd=tmp_path)
    for run in ("typed", "seen"):
        run_stage("02_score.py", "--run", run, cwd=tmp_path)
    done = modalities(tmp_path, "--top", "5,20")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = result_of(tmp_path)
    assert result["pairs"]["n_pairs"] == 12 and result["rows"] == dict(text=12, image=12)
    assert [row["k"] for row in result["carry"]] == [5, 20]
    assert "Spearman rho" in done.stdout
