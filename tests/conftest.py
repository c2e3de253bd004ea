"""Shared fixtures. Every model here is the random `tiny` LLaVA built from config (seconds, no downloads);
it is built into a temp cache so tests never touch the user's ~/.cache."""
import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

if "SGM_CACHE" not in os.environ:
    # Made once, by the first process (pytest-xdist's workers inherit the variable and share it), and removed when
    # that process exits, so test runs leave no model caches behind in the temp folder.
    os.environ["SGM_CACHE"] = tempfile.mkdtemp(prefix="sgm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SGM_CACHE"], ignore_errors=True)
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The tools run as `python -m tools.<name>` from the repository root; tests run them (and the stages) from temp
# folders, so every subprocess gets the root on its path, as it would from the root.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402

from sgm import models  # noqa: E402


def command(script, *args):
    """The command line of a stage (`python 01_collect.py ...`) or a tool (`python -m tools.tune ...`)."""
    head = ["-m", f"tools.{Path(script).stem}"] if script.startswith("tools/") else [str(REPO / script)]
    return [sys.executable, *head, *map(str, args)]

# Mild stand-ins: the "toxic" rows are only rude-ish words, enough to exercise the plumbing.
MILD_TEXTS = {
    "toxic": ["you are a silly rude person", "that was an awful and rude thing", "what a terrible angry day",
              "they are bad and rude people", "go away you silly dog", "this awful story is bad"],
    "benign": ["the cat sat on the mat", "people like to read in the morning", "a small red house by the river",
               "what is the weather like today", "the garden is quiet in the evening", "a happy dog ran home"],
}


def load_stage(name):
    """Import a numbered stage script as a module (its functions; __main__ code does not run)."""
    spec = importlib.util.spec_from_file_location(name.replace(".py", "").lstrip("0123456789_"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_items(path, n_per_label=6, splits=("calibration", "test"), conditions=("standard",), image=None):
    """A small custom-data JSONL in the MM-TOXIC-QA schema; returns its path."""
    rows = []
    for split in splits:
        for condition in conditions:
            for label, texts in MILD_TEXTS.items():
                for k, text in enumerate(texts[:n_per_label]):
                    rows.append(dict(id=f"{split}-{condition}-{label}-{k}", split=split, label=label,
                                     category="mild", condition=condition, task="continue", text=text,
                                     image=image or "", source="tests", image_text=""))
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor, sites, model_meta) of the tiny random LLaVA, float32 on CPU."""
    return models.load_model("tiny")


@pytest.fixture
def items_file(tmp_path):
    return write_items(tmp_path / "items.jsonl")
