"""Bad input the stages share (issue 12): damaged artifacts, items that are not UTF-8 or whose image leaves
the data folder, and two runs building the same cached checkpoint at once. Each gives one line naming the
file and the fix, or (the cache) simply works."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, command, write_items

import common
from common import UserError, load_items
from sgm import models
from sgm.artifacts import load_npz, load_pt, save_npz, save_pt

# ---- damaged artifacts ---------------------------------------------------------------------------------------


def good_npz(path):
    save_npz(path, {"auroc": np.linspace(0, 1, 50)}, {"stage": "02_score"})
    return path


def good_pt(path):
    save_pt(path, {"alpha": torch.linspace(0, 1, 50)}, {"stage": "03_suppress"})
    return path


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a killed copy, a full disk


def rewrite_npz(**arrays):  # an .npz written around save_npz, to damage one part of it
    def damage(path):
        np.savez(path, allow_pickle=False, **arrays)
    return damage


NPZ_DAMAGE = {
    "truncated": truncate,
    "empty": lambda path: path.write_bytes(b""),
    "not a zip": lambda path: path.write_text("auroc,q_value\n0.5,1\n"),
    "no meta": rewrite_npz(auroc=np.zeros(3)),
    "meta not JSON": rewrite_npz(auroc=np.zeros(3), meta=np.array("{not json")),
    "pickled arrays": lambda path: np.savez(path, meta=np.array("{}"), bad=np.array([object()], dtype=object)),
    "edited arrays": rewrite_npz(auroc=np.ones(50), meta=np.array(json.dumps({"fingerprint": "0" * 64}))),
}


PT_DAMAGE = {
    "truncated": truncate,
    "not a torch file": lambda path: path.write_text("alpha\n1.0\n"),
    "an npz": lambda path: good_npz(path.with_suffix(".npz")).rename(path),
    "not a dict": lambda path: torch.save(torch.ones(3), path),
    "no meta": lambda path: torch.save({"alpha": torch.ones(3)}, path),
    "meta not JSON": lambda path: torch.save({"alpha": torch.ones(3), "meta": "{not json"}, path),
    "pickled code": lambda path: torch.save({"alpha": torch.ones(3), "meta": "{}", "f": print}, path),
}


# (artifact name, how a good one is made, its loader, the stage that writes it, its damages)
ARTIFACTS = {"npz": ("expertise.npz", good_npz, load_npz, "02_score.py", NPZ_DAMAGE),
             "pt": ("suppression.pt", good_pt, load_pt, "03_suppress.py", PT_DAMAGE)}


@pytest.mark.parametrize("kind,damage", [(kind, damage) for kind, spec in ARTIFACTS.items() for damage in spec[4]],
                         ids=[f"{kind}-{damage}" for kind, spec in ARTIFACTS.items() for damage in spec[4]])
def test_damaged_artifact_is_one_line_naming_file_and_stage(tmp_path, kind, damage):
    name, make_good, load, stage, damages = ARTIFACTS[kind]
    path = make_good(tmp_path / "runs" / "x" / name)
    damages[damage](path)
    with pytest.raises(UserError) as error:
        load(path, rerun_hint=stage)
    message = error.value.message
    assert str(path) in message and message.endswith(f"rerun {stage}") and "\n" not in message


def test_required_arrays_are_named_when_missing(tmp_path):
    npz, pt = good_npz(tmp_path / "expertise.npz"), good_pt(tmp_path / "suppression.pt")
    assert load_npz(npz, "02_score.py", required=["auroc"])[0].keys() == {"auroc"}
    assert load_pt(pt, "03_suppress.py", required=("alpha",))[0].keys() == {"alpha"}
    with pytest.raises(UserError, match=f"{re.escape(str(npz))} lacks array 'q_value': rerun 02_score.py$"):
        load_npz(npz, "02_score.py", required=["auroc", "q_value"])
    with pytest.raises(UserError, match=f"{re.escape(str(pt))} lacks array 'beta': rerun 03_suppress.py$"):
        load_pt(pt, "03_suppress.py", required=["alpha", "beta"])


def test_a_truncated_activations_file_stops_02_score_with_one_line(tmp_path):
    """The issue's report, as a user meets it: a command, an exit status, and no traceback."""
    path = tmp_path / "runs" / "x" / "activations.npz"
    save_npz(path, {"activations": np.zeros((4, 8), dtype=np.float32), "labels": np.array([0, 1, 0, 1])}, {})
    truncate(path)
    done = subprocess.run([sys.executable, str(REPO / "02_score.py"), "--run", "x"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: runs/x/activations.npz is damaged") and line.endswith("rerun 01_collect.py")


# ---- items.jsonl ---------------------------------------------------------------------------------------------

def test_items_that_are_not_utf8_name_the_line(tmp_path):
    path = write_items(tmp_path / "items.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b'"text": "', b'"text": "caf\xe9 ')  # a Latin-1 export
    path.write_bytes(b"".join(lines))
    with pytest.raises(UserError, match=f"{re.escape(str(path))}:3: not UTF-8 text; save the file as UTF-8$"):
        load_items(path)


@pytest.mark.parametrize("image", ["../outside.png", "images/../../outside.png", "ABSOLUTE"])
def test_an_image_outside_the_data_folder_is_refused_before_it_is_opened(tmp_path, image):
    """A real image outside the folder: were it opened, the row would pass, so the refusal comes first."""
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (tmp_path / "data" / "images").mkdir(parents=True)
    image = str(tmp_path / "outside.png") if image == "ABSOLUTE" else image
    path = write_items(tmp_path / "data" / "items.jsonl", image=image)
    where, folder = re.escape(str(path)), re.escape(str(path.parent))
    with pytest.raises(UserError, match=f"{where}:1: image .* is outside {folder}; give a path relative"):
        load_items(path)


def test_an_image_path_that_stays_inside_the_data_folder_is_fine(tmp_path):
    from PIL import Image
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "red.png")
    items, _ = load_items(write_items(tmp_path / "items.jsonl", image="images/../images/red.png"))
    assert all(item["image_path"] == str(tmp_path / "images/../images/red.png") for item in items)


# ---- the model cache -----------------------------------------------------------------------------------------

def test_two_runs_building_tiny_at_once_both_succeed(tmp_path):
    """Two processes started together on an empty cache (two terminals, make -j): one builds, the other waits
    on the lock and uses what the first built. No temp folder is left."""
    env = dict(os.environ, SGM_CACHE=str(tmp_path))
    code = "from sgm import models; print(models.resolve_model_path('tiny'))"
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
        assert stdout.strip() == str(tmp_path / "tiny-llava-v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llava-v1", "tiny.lock"]
    models.load_processor(str(tmp_path / "tiny-llava-v1"))  # a whole checkpoint, not a mix of two builds


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_crashed_build_is_cleaned_and_a_failing_one_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    stale = tmp_path / f"tiny-llava-v1.{dead_pid()}.tmp"  # what a build killed halfway leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)

    def broken_build(out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setattr(models, "build_tiny", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        models.resolve_model_path("tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.lock"]  # the stale one went too

    monkeypatch.undo()
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    stale.mkdir()
    assert models.resolve_model_path("tiny") == str(tmp_path / "tiny-llava-v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llava-v1", "tiny.lock"]


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "file" / "cache")
    with pytest.raises(UserError, match="set SGM_CACHE to a writable folder"):
        models.resolve_model_path("tiny")


# ---- items.jsonl: a cut-off or damaged file names its line and the fix; a build must match its card -----------

def cut_mid_line(path):
    """A copy killed halfway through the last row."""
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rstrip(b"\n").rfind(b"\n") + 20])
    return raw.count(b"\n")  # the cut row's line number


def test_items_cut_off_mid_line_name_the_line_and_the_fix(tmp_path):
    path = write_items(tmp_path / "items.jsonl")
    line = cut_mid_line(path)
    with pytest.raises(UserError) as error:
        load_items(path)
    message = error.value.message
    assert message.startswith(f"{path}:{line}: not valid JSON (") and "fix the line" in message
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["cut mid-line", "not JSON", "missing fields", "empty"])
def test_the_default_data_when_damaged_says_make_data(tmp_path, monkeypatch, damage):
    """MM-TOXIC-QA as `make data` builds it: whatever is wrong, the fix is to rebuild it (and make would call
    the damaged file up to date, so: delete it first)."""
    (tmp_path / "data").mkdir()
    path = write_items(tmp_path / "data" / "items.jsonl")
    monkeypatch.setattr(common, "DEFAULT_DATA", path)
    line = {"cut mid-line": lambda: cut_mid_line(path),
            "not JSON": lambda: path.write_text("id,split,label\n") and 1,
            "missing fields": lambda: path.write_text(json.dumps({"id": "a", "split": "test"}) + "\n") and 1,
            "empty": lambda: path.write_text("\n") and None}[damage]()
    with pytest.raises(UserError) as error:
        load_items(path)
    message = error.value.message
    assert message.startswith(f"{path}:{line}: " if line else str(path)) and "\n" not in message
    assert message.endswith("delete it and run `make data` to rebuild it")


def test_a_build_cut_at_a_line_end_no_longer_matches_its_card(tmp_path, monkeypatch):
    """A copy cut exactly after a row parses; the build checksum in card.md (data/build.py) catches it."""
    import hashlib
    (tmp_path / "data").mkdir()
    path = write_items(tmp_path / "data" / "items.jsonl")
    files = "items.jsonl " + hashlib.sha256(path.read_bytes()).hexdigest() + "\n"
    (path.parent / "card.md").write_text(f"- Build checksum: `{hashlib.sha256(files.encode()).hexdigest()}` (sha256)\n")
    assert len(load_items(path)[0]) == 24  # the build as its card describes it
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-3]))
    with pytest.raises(UserError, match=f"^error: {re.escape(str(path))} .* is not the build .* rebuild it with "
                                        f"`python data/build.py --out {re.escape(str(path.parent))}`$"):
        load_items(path)
    monkeypatch.setattr(common, "DEFAULT_DATA", path)
    with pytest.raises(UserError, match=r"is not the build .*: a cut-off copy or an edit\?\); delete .* and run "
                                        "`make data` to rebuild it$"):
        load_items(path)


def test_the_real_build_matches_its_card():
    if not common.DEFAULT_DATA.exists():
        pytest.skip("no `make data` build here")
    load_items(common.DEFAULT_DATA)


# ---- an exported checkpoint (03_suppress.py --export) and any other checkpoint folder ------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A real export of the tiny model: 01 -> 02 -> 03 --export, as a user runs them."""
    from test_pipeline import run_stage
    folder = tmp_path_factory.mktemp("export")
    data = write_items(folder / "items.jsonl", n_per_label=3)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=folder)
    run_stage("02_score.py", "--run", "tiny", cwd=folder)
    run_stage("03_suppress.py", "--run", "tiny", "--export", folder / "export", cwd=folder)
    return folder / "export"


EXPORT_DAMAGE = {
    "weights cut off": lambda folder: truncate(folder / "model.safetensors"),
    "weights missing": lambda folder: (folder / "model.safetensors").unlink(),
    "no config.json": lambda folder: (folder / "config.json").unlink(),
    "config.json cut off": lambda folder: truncate(folder / "config.json"),
    "tokenizer cut off": lambda folder: truncate(folder / "tokenizer.json"),
}


@pytest.mark.parametrize("damage", EXPORT_DAMAGE)
def test_a_damaged_export_says_rerun_the_export(export, tmp_path, damage):
    import shutil
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    EXPORT_DAMAGE[damage](copy)
    with pytest.raises(UserError) as error:
        models.load_model(str(copy))
    message = error.value.message
    assert message.startswith(f"cannot load model '{copy}' (") and "\n" not in message
    assert f"the SGM export {copy} is damaged or incomplete: rerun 03_suppress.py --export" in message
    assert f"--export {export}" in message  # the command its SGM_EXPORT.md records


def test_a_damaged_checkpoint_that_is_no_export_names_its_folder(export, tmp_path):
    import shutil
    copy = tmp_path / "ckpt"
    shutil.copytree(export, copy)
    (copy / "SGM_EXPORT.md").unlink()
    models.load_model(str(copy))  # without its note an export is an ordinary checkpoint, and loads as one
    truncate(copy / "model.safetensors")
    with pytest.raises(UserError) as error:
        models.load_model(str(copy))
    message = error.value.message
    assert message.startswith(f"cannot load model '{copy}' (SafetensorError") and "\n" not in message
    assert message.endswith(f"the checkpoint folder {copy} is damaged or incomplete: copy or download it again")


def test_04_on_a_damaged_export_is_one_line(export, tmp_path):
    """The user's view: `04_evaluate.py --model DIR` on a cut-off export, in a fresh process."""
    import shutil
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    truncate(copy / "model.safetensors")
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    done = subprocess.run([sys.executable, str(REPO / "04_evaluate.py"), "--model", str(copy), "--data", str(data),
                           "--methods", "base"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.strip().splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: cannot load model '{copy}'") and "rerun 03_suppress.py --export" in line
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_a_damaged_cached_build_says_delete_it(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    truncate(Path(models.resolve_model_path("tiny")) / "model.safetensors")  # a build into this cache, then cut off
    with pytest.raises(UserError, match=f"the cached build {re.escape(str(tmp_path))}/tiny-llava-v1 is damaged: "
                                        "delete that folder and rerun"):
        models.load_model("tiny")


# ---- reports a later run reads: 04_evaluate.py --base-from, tools/tune.py's per-variant reports ---------------------

@pytest.fixture(scope="module")
def base_report(tmp_path_factory):
    """04_evaluate.py --methods base --report base on the tiny model: what --base-from reads."""
    from test_pipeline import run_stage
    folder = tmp_path_factory.mktemp("base")
    data = write_items(folder / "items.jsonl", splits=("dev",))
    run_stage("04_evaluate.py", "--model", "tiny", "--run", "r", "--data", data, "--split", "dev", "--methods",
              "base", "--report", "base", "--max-new-tokens", "4", "--conditions", "standard", "--limits", "0",
              cwd=folder)
    return folder


def evaluate_from(folder, *args):
    from test_pipeline import run_stage
    run_stage("04_evaluate.py", "--model", "tiny", "--run", "r", "--data", folder / "items.jsonl", "--split", "dev",
              "--methods", "base", "--max-new-tokens", "4", "--conditions", "standard", "--limits", "0", "--report", "again",
              "--base-from", "runs/r/base.json", *args, cwd=folder)


def test_base_from_reuses_base_and_gives_the_same_report(base_report):
    evaluate_from(base_report)
    first, again = (json.loads((base_report / f"runs/r/{name}.json").read_text()) for name in ("base", "again"))
    assert again["rows"] == first["rows"] and again["fluency"] == first["fluency"]
    assert again["meta"]["settings"]["base_from"] == "runs/r/base.json"


@pytest.mark.parametrize("args,message", [
    (("--max-new-tokens", "5"), "was made with max_new_tokens 4, not 5"),
    (("--seed", "1"), "was made with seed 0, not 1"),
    (("--limits", "standard=2"), "was made with limits '0', not 'standard=2'"),
    (("--judge-threshold", "0.7"), "was made with judge_threshold 0.5, not 0.7"),
    (("--batch-size", "2"), "was made with batch_size 64, not 2"),
])
def test_base_from_another_setting_is_refused(base_report, args, message):
    with pytest.raises(UserError) as error:
        evaluate_from(base_report, *args)
    assert error.value.message.startswith(f"--base-from runs/r/base.json {message}: rerun 04_evaluate.py "
                                          "--methods base --report base with this run's settings")


def test_base_from_another_data_build_is_refused(base_report, tmp_path):
    import shutil
    shutil.copytree(base_report / "runs", tmp_path / "runs")
    write_items(tmp_path / "items.jsonl", splits=("dev",), n_per_label=5)
    with pytest.raises(UserError, match="was made with data_checksum '[0-9a-f]{64}', not '[0-9a-f]{64}'"):
        evaluate_from(tmp_path)


@pytest.mark.parametrize("damage", ["report cut off", "answers cut off", "answers missing", "not a report"])
def test_a_damaged_base_from_report_is_one_line(base_report, tmp_path, damage):
    import shutil
    shutil.copytree(base_report / "runs", tmp_path / "runs")
    shutil.copy(base_report / "items.jsonl", tmp_path / "items.jsonl")
    report, answers = tmp_path / "runs/r/base.json", tmp_path / "runs/r/base-answers.jsonl"
    {"report cut off": lambda: truncate(report), "answers cut off": lambda: truncate(answers),
     "answers missing": lambda: answers.unlink(), "not a report": lambda: report.write_text("[]")}[damage]()
    with pytest.raises(UserError) as error:
        evaluate_from(tmp_path)
    message = error.value.message
    assert message.startswith("--base-from runs/r/base.json: cannot read base's results from it and "
                              "base-answers.jsonl (") and "\n" not in message
    assert message.endswith("rerun 04_evaluate.py --methods base --report base with this run's settings (it writes "
                            "base.json and base-answers.jsonl), or leave --base-from out")


def test_tune_on_a_damaged_report_is_one_line_naming_it(tmp_path):
    """tools/tune.py reads each variant's 04 report (and the shared base's): one cut off after its run finished is
    named, with the fix, instead of a JSONDecodeError traceback."""
    data = write_items(tmp_path / "items.jsonl", splits=("calibration", "dev"))

    def tune():
        return subprocess.run([*command("tools/tune.py"), "--model", "tiny", "--data", str(data),
                               "--collect-args", "--mode prompts --max-new-tokens 4", "--evaluate-args",
                               "--max-new-tokens 4", "--variants", "published"], cwd=tmp_path, capture_output=True,
                              text=True)
    done = tune()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for name in ("calibration-published/published.json", "calibration-published/published-answers.jsonl",
                 "base.json"):
        path = tmp_path / "runs/tune" / name
        kept = path.read_bytes()
        truncate(path)
        again = tune()
        assert again.returncode == 1 and "Traceback" not in again.stderr
        [line] = again.stderr.strip().splitlines()
        report = f"runs/tune/{name.replace('-answers.jsonl', '.json')}"
        assert line.startswith(f"error: {report} or {Path(report).stem}-answers.jsonl is damaged or not a "
                               "04_evaluate.py report (")
        assert line.endswith(f"delete {report} and rerun tools/tune.py, which evaluates again")
        path.write_bytes(kept)
