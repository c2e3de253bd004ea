"""Bad input the stages share (issue 12): damaged artifacts, items that are not UTF-8 or whose image leaves
the data folder, and two runs building the same cached checkpoint at once. Each gives one line naming the
file and the fix, or (the cache) simply works."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, write_items

import common
from common import UserError, load_items, load_npz, load_pt, save_npz, save_pt

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
    code = "import common; print(common.resolve_model_path('tiny'))"
    runs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (stdout, stderr) in zip(runs, outputs):
        assert run.returncode == 0, stderr[-3000:]
        assert stdout.strip() == str(tmp_path / "tiny-llava-v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llava-v1", "tiny.lock"]
    common.load_processor(str(tmp_path / "tiny-llava-v1"))  # a whole checkpoint, not a mix of two builds


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_crashed_build_is_cleaned_and_a_failing_one_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    stale = tmp_path / f"tiny-llava-v1.{dead_pid()}.tmp"  # what a build killed halfway leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)

    def broken_build(out_dir):
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    monkeypatch.setattr(common, "build_tiny", broken_build)
    with pytest.raises(RuntimeError, match="disk full"):
        common.resolve_model_path("tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.lock"]  # the stale one went too

    monkeypatch.undo()
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path)
    stale.mkdir()
    assert common.resolve_model_path("tiny") == str(tmp_path / "tiny-llava-v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llava-v1", "tiny.lock"]


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(common, "CACHE_DIR", tmp_path / "file" / "cache")
    with pytest.raises(UserError, match="set SGM_CACHE to a writable folder"):
        common.resolve_model_path("tiny")
