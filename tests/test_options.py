"""Options are checked before any work starts (issue 12, items 3 and 6).

Every numeric option of every stage has a valid range; a bad value (or a bad run name) is refused right after
parsing, before data or a model loads: one line naming the option, exit status 1, no traceback, nothing
written. The run name defaults to the model's last name part (a path or hub id never becomes a folder tree
under runs/), and a --run that leaves runs/ is refused. The whole table runs in-process (the loaders replaced
by a tripwire); one bad option per stage and the by-path run also run as real commands, a few at a time."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, command, write_items
from test_pipeline import run_stage

import common
from common import UserError, run_name
from sgm import artifacts
from sgm import models

# Absolute checkpoint paths as a user would pass them; only their names are used, nothing is read there.
CKPTS = os.path.join(tempfile.gettempdir(), "ckpts")

NO_MODEL = "nonexistent/sgm-model"    # (relative to the test folder) loading it would fail with another message ("cannot load model")
NO_DATA = "nonexistent/items.jsonl"   # and reading it too ("data file ... not found")
MODEL_FLAGS = {"01_collect.py": ["--model", NO_MODEL, "--data", NO_DATA],
               "02_score.py": ["--run", "nothing-here"],  # reading its input would say "not found"
               "03_suppress.py": ["--run", "nothing-here"],
               "04_evaluate.py": ["--model", NO_MODEL, "--data", NO_DATA],
               "tools/tune.py": ["--model", NO_MODEL, "--data", NO_DATA],
               "tools/bench.py": ["--model", NO_MODEL, "--data", NO_DATA]}

# (stage, bad flags, the option the one-line error must name)
BAD = [
    ("01_collect.py", ["--batch-size", "0"], "--batch-size"),  # ran as one batch before
    ("01_collect.py", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("01_collect.py", ["--judge-threshold", "0"], "--judge-threshold"),
    ("01_collect.py", ["--judge-threshold", "1.5"], "--judge-threshold"),
    ("01_collect.py", ["--limit", "-1"], "--limit"),
    ("01_collect.py", ["--samples", "-1"], "--samples"),
    ("01_collect.py", ["--sample-top-k", "0"], "--sample-top-k"),
    ("01_collect.py", ["--seed", "-1"], "--seed"),
    ("01_collect.py", ["--pooling", "median"], "--pooling"),
    ("01_collect.py", ["--store-dtype", "bfloat16"], "--store-dtype"),
    ("01_collect.py", ["--run", "../escape"], "--run"),
    ("02_score.py", ["--chunk-neurons", "0"], "--chunk-neurons"),
    ("02_score.py", ["--permutations", "0"], "--permutations"),
    ("02_score.py", ["--null-draws", "0"], "--null-draws"),
    ("02_score.py", ["--seed", "-2"], "--seed"),
    ("02_score.py", ["--fdr", "1"], "--fdr"),
    ("02_score.py", ["--fdr", "nan"], "--fdr"),
    ("02_score.py", ["--run", "/abs/run"], "--run"),
    ("03_suppress.py", ["--strength", "-1"], "--strength"),  # wrote a suppression that changed nothing before
    ("03_suppress.py", ["--strength", "inf"], "--strength"),
    ("03_suppress.py", ["--top-k", "-5"], "--top-k"),
    ("03_suppress.py", ["--method", "det0", "--top-k", "0"], "--top-k"),
    ("03_suppress.py", ["--damp-factor", "1.5"], "--damp-factor"),
    ("03_suppress.py", ["--damp-factor", "-0.1"], "--damp-factor"),
    ("03_suppress.py", ["--fdr", "0"], "--fdr"),
    ("03_suppress.py", ["--out", "../suppression.pt"], "--out"),
    ("03_suppress.py", ["--run", "a/../../b"], "--run"),
    ("03_suppress.py", ["--seed", "-1"], "--seed"),
    ("03_suppress.py", ["--random-control", "true"], "--random-control"),  # without --export: nothing to bake
    ("04_evaluate.py", ["--strengths", "0.5,-1"], "--strengths"),
    ("04_evaluate.py", ["--limits", "standard=-3"], "--limits"),
    ("04_evaluate.py", ["--limits", "standart=3"], "--limits"),
    ("04_evaluate.py", ["--limits", "standard:3"], "--limits"),
    ("04_evaluate.py", ["--top-k", "-1"], "--top-k"),
    ("04_evaluate.py", ["--perplexity-items", "-1"], "--perplexity-items"),
    ("04_evaluate.py", ["--samples", "-2"], "--samples"),
    ("04_evaluate.py", ["--sample-top-k", "0"], "--sample-top-k"),
    ("04_evaluate.py", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("04_evaluate.py", ["--judge-threshold", "0"], "--judge-threshold"),
    ("04_evaluate.py", ["--batch-size", "0"], "--batch-size"),
    ("04_evaluate.py", ["--seed", "-1"], "--seed"),
    ("04_evaluate.py", ["--report", "../results"], "--report"),
    ("04_evaluate.py", ["--suppression", os.path.join(tempfile.gettempdir(), "suppression.pt")], "--suppression"),
    ("04_evaluate.py", ["--run", "a\\b"], "--run"),
    ("04_evaluate.py", ["--endpoint-workers", "0"], "--endpoint-workers"),
    ("04_evaluate.py", ["--endpoint-timeout", "0"], "--endpoint-timeout"),
    ("04_evaluate.py", ["--endpoint-retries", "-1"], "--endpoint-retries"),
    ("04_evaluate.py", ["--endpoint", "base=http://127.0.0.1:9/v1?key=x,sgm=x,random=y"], "--endpoint"),
    ("tools/tune.py", ["--max-fluency-cost", "-0.1"], "--max-fluency-cost"),
    ("tools/tune.py", ["--judge-threshold", "2"], "--judge-threshold"),
    ("tools/tune.py", ["--limits", "standard"], "--limits"),
    ("tools/tune.py", ["--collect-args", "--mode 'prompts"], "--collect-args"),
    ("tools/tune.py", ["--out", "../tune"], "--out"),
    ("tools/bench.py", ["--items", "1"], "--items"),
    ("tools/bench.py", ["--neurons", "-1"], "--neurons"),
    ("tools/bench.py", ["--toxic-fraction", "1.5"], "--toxic-fraction"),
    ("tools/bench.py", ["--repeats", "0"], "--repeats"),
    ("tools/bench.py", ["--new-tokens", "0"], "--new-tokens"),
    ("tools/bench.py", ["--nll-tokens", "0"], "--nll-tokens"),
    ("tools/bench.py", ["--chunk-neurons", "0"], "--chunk-neurons"),
    ("tools/bench.py", ["--damped-fraction", "2"], "--damped-fraction"),
    ("tools/bench.py", ["--alpha", "-0.1"], "--alpha"),
    ("tools/bench.py", ["--threads", "-1"], "--threads"),
]
# Edge values that are valid: they pass the checks and reach the first load.
GOOD_EDGES = [
    ("01_collect.py", ["--judge-threshold", "1", "--limit", "0", "--batch-size", "1", "--samples", "0",
                       "--store-dtype", "float16"]),
    ("02_score.py", ["--permutations", "1", "--null-draws", "1", "--chunk-neurons", "1", "--seed", "0"]),
    ("03_suppress.py", ["--strength", "0", "--damp-factor", "0", "--top-k", "0"]),
    ("03_suppress.py", ["--method", "damp", "--top-k", "1", "--damp-factor", "1", "--run", "tune/calibration-x"]),
    ("04_evaluate.py", ["--strengths", "0,1.5", "--limits", "0", "--top-k", "0", "--perplexity-items", "0"]),
    ("tools/tune.py", ["--max-fluency-cost", "0", "--judge-threshold", "1", "--limits", "standard=0"]),
    ("tools/bench.py", ["--threads", "0", "--neurons", "0", "--items", "2", "--alpha", "1", "--damped-fraction", "0"]),
]


class Loaded(Exception):
    """Raised by the stand-in loaders: the options were accepted and the stage went on to load something."""


@pytest.fixture
def tripwire(monkeypatch):
    def loaded(*args, **kwargs):
        raise Loaded
    for module, names in ((common, ("load_items",)), (artifacts, ("load_npz", "load_pt")),
                          (models, ("load_model", "resolve_model_path"))):
        for name in names:
            monkeypatch.setattr(module, name, loaded)


@pytest.mark.parametrize("script,flags,option", BAD, ids=[f"{s[:-3]}{''.join(f)}" for s, f, _ in BAD])
def test_bad_option_is_one_line_before_anything_loads(tmp_path, tripwire, script, flags, option):
    with pytest.raises(UserError) as error:  # not Loaded: refused before any load
        run_stage(script, *MODEL_FLAGS[script], *flags, cwd=tmp_path)
    message = error.value.message
    assert re.search(f"(?<![\\w-]){re.escape(option)}(?![\\w-])", message) and "\n" not in message, message
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, no partial artifact


@pytest.mark.parametrize("script,flags", GOOD_EDGES, ids=[f"{s[:-3]}{''.join(f)}" for s, f in GOOD_EDGES])
def test_edge_values_are_accepted(tmp_path, tripwire, script, flags):
    with pytest.raises(Loaded):
        run_stage(script, *MODEL_FLAGS[script], *flags, cwd=tmp_path)


def test_the_two_known_bugs_name_the_fix(tmp_path, tripwire):
    with pytest.raises(UserError, match=r"^error: --strength must be >= 0 \(got -1\): 0 leaves the model as it is"):
        run_stage("03_suppress.py", "--run", "nothing-here", "--strength", "-1", cwd=tmp_path)
    with pytest.raises(UserError, match=r"^error: --batch-size must be >= 1 \(got 0\): items per forward pass"):
        run_stage("01_collect.py", "--model", NO_MODEL, "--batch-size", "0", cwd=tmp_path)


def test_check_range_bounds():
    cfg = dict(p=0.0, n=3, x=float("nan"))
    common.check_range(cfg, "p", low=0, high=1)
    common.check_range(cfg, "n", above=2, below=4)
    for kwargs, rule in [(dict(above=0), "> 0"), (dict(low=1), ">= 1"), (dict(above=-1, below=0), "> -1 and < 0")]:
        with pytest.raises(UserError, match=f"^error: --p must be {rule} \\(got 0\\): fix it$"):
            common.check_range(cfg, "p", fix="fix it", **kwargs)
    with pytest.raises(UserError, match=r"^error: --x must be >= 0 \(got nan\)$"):
        common.check_range(cfg, "x", low=0)


# ---- the run name ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("run,model,expected", [
    ("", CKPTS + "/llava-1.5-7b", "llava-1.5-7b"),
    ("", CKPTS + "/llava-1.5-7b/", "llava-1.5-7b"),
    ("", "ckpts/llava-1.5-7b", "llava-1.5-7b"),
    ("", "C:\\ckpts\\llava-1.5-7b", "llava-1.5-7b"),
    ("", "llava-hf/llava-1.5-7b-hf", "llava-1.5-7b-hf"),
    ("", "Qwen/Qwen2.5-VL-72B-Instruct", "Qwen2.5-VL-72B-Instruct"),
    ("", "tiny", "tiny"), ("", "demo-planted", "demo-planted"),
    ("llava15", CKPTS + "/llava-1.5-7b", "llava15"),
    ("tune/calibration-mode-prompts", None, "tune/calibration-mode-prompts"),  # tools/tune.py's runs
    ("sgm@1_v2+x", None, "sgm@1_v2+x"),
])
def test_run_name(run, model, expected):
    assert run_name(run, model) == expected


@pytest.mark.parametrize("run", ["", "..", ".", "../x", "a/../b", "a/..", "/abs", CKPTS + "/llava", "a\\b",
                                 "..\\x", "a//b", "a/", "a b", "~/x", "C:x"])
def test_bad_run_names_are_refused(run):
    with pytest.raises(UserError, match="^error: --run .* must be a plain name") as error:
        run_name(run, None)
    assert "\n" not in error.value.message


@pytest.mark.parametrize("model", ["/", ".", "..", CKPTS + "/my models/llava 7b"])
def test_a_model_without_a_usable_name_asks_for_run(model):
    with pytest.raises(UserError, match="^error: cannot name the run after --model .*: pass --run NAME"):
        run_name("", model)


@pytest.mark.parametrize("model", ["demo", "demo-blind", "tiny", "demo-planted", CKPTS + "/llava-1.5-7b",
                                   CKPTS + "/llava-1.5-7b/", "llava-hf/llava-1.5-7b-hf"])
def test_makefile_names_the_run_as_the_stages_do(model):
    run = run_name("", model)
    done = subprocess.run(["make", "-p", "-n", "-B", "-C", str(REPO), "all", f"MODEL={model}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # the commands make would run (the database's own recipe lines start with a tab)
    stages = [line for line in done.stdout.splitlines() if re.match(r"\S*python\S* 0[1-4]_\w+\.py ", line)]
    assert len(stages) == 4 and all(f"--run {run} " in line + " " for line in stages), stages
    assert f"--model {model} " in stages[0] + " "
    # the planted model is built by its program (python -m tools.plant) before 01 loads it; no other model is (the
    # demo's collect depends on its eyes file, which ships)
    builds = [line for line in done.stdout.splitlines() if re.match(r"\S*python\S* -m tools\.plant$", line)]
    assert len(builds) == (model == "demo-planted")
    # the rules: each artifact under runs/<run>/ depends on its script, the shared modules and the one before it
    rules = dict(line.split(": ", 1) for line in done.stdout.splitlines() if line.startswith("runs/") and ": " in line)
    # every repository module a stage imports, directly or through another; for the planted model also its recipe,
    # tools/plant.py, which no stage imports (make runs it before 01 to build the model)
    shared = local_modules(["01_collect.py", "02_score.py", "03_suppress.py", "04_evaluate.py"])
    collect = rules[f"runs/{run}/activations.npz"].split()
    inputs = ["data/mm_toxic_qa/items.jsonl", ".venv/.installed"] + (["tools/plant.py"] if model == "demo-planted" else
                                                                     ["sgm/eyes.safetensors"] if model == "demo" else [])
    assert collect[0] == "01_collect.py" and collect[-len(inputs):] == inputs
    assert {p for p in collect[1:] if p.endswith(".py")} - {"tools/plant.py"} == shared
    for stage, artifact, before in [("02_score.py", "expertise.npz", "activations.npz"),
                                    ("03_suppress.py", "suppression.pt", "expertise.npz"),
                                    ("04_evaluate.py", "results.json", "suppression.pt")]:
        prerequisites = rules[f"runs/{run}/{artifact}"].split()
        assert prerequisites[0] == stage and prerequisites[-1] == f"runs/{run}/{before}"
        assert set(prerequisites[1:-1]) == shared
    assert {rule.split("/")[1] for rule in rules} == {run}  # nothing under another name


def local_modules(scripts):
    """The repository's own modules that `scripts` import, directly or through one another (imports inside
    functions too)."""
    import ast
    found, todo = set(), list(scripts)
    while todo:
        for node in ast.walk(ast.parse((REPO / todo.pop()).read_text())):
            # `import sgm.models`, `from sgm.models import x` and `from sgm import models` all name sgm/models.py
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module, *(f"{node.module}.{a.name}" for a in node.names)] \
                if isinstance(node, ast.ImportFrom) and node.module else []
            for name in names:
                module = name.replace(".", "/") + ".py"
                if (REPO / module).exists() and module not in found:
                    found.add(module)
                    todo.append(module)
    return found


def test_makefile_refuses_an_empty_run():
    done = subprocess.run(["make", "-n", "-C", str(REPO), "all", "RUN="], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "RUN is empty" in done.stderr


# ---- as real commands: one bad option per stage, and a model given by path --------------------------------------

COMMANDS = {
    "01_collect.py": (["--batch-size", "0"], "--batch-size"),
    "02_score.py": (["--fdr", "1"], "--fdr"),
    "03_suppress.py": (["--strength", "-1"], "--strength"),
    "04_evaluate.py": (["--max-new-tokens", "0"], "--max-new-tokens"),
    "tools/tune.py": (["--max-fluency-cost", "-1"], "--max-fluency-cost"),
    "tools/bench.py": (["--repeats", "0"], "--repeats"),
}


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    """Every command of this section, run three at a time (each is mostly Python and torch starting up)."""
    folders = {script: tmp_path_factory.mktemp(Path(script).stem) for script in COMMANDS}
    by_path = tmp_path_factory.mktemp("by-path")
    shutil.copytree(models.resolve_model_path("tiny"), by_path / "ckpts" / "my-llava")  # built once per session
    data = write_items(by_path / "items.jsonl", n_per_label=3, splits=("calibration",))
    runs = {script: (command(script, *MODEL_FLAGS[script], *flags), folders[script])
            for script, (flags, _) in COMMANDS.items()}
    runs["by-path"] = ([sys.executable, str(REPO / "01_collect.py"), "--model", str(by_path / "ckpts" / "my-llava"),
                        "--data", str(data), "--mode", "prompts", "--limit", "4", "--batch-size", "4"], by_path)

    def run(name):
        argv, cwd = runs[name]
        return name, subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=180), cwd
    with ThreadPoolExecutor(3) as pool:
        return {name: (done, cwd) for name, done, cwd in pool.map(run, runs)}


@pytest.mark.parametrize("script", COMMANDS)
def test_bad_option_as_a_command(commands, script):
    done, cwd = commands[script]
    option = COMMANDS[script][1]
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"error: {option} ")
    assert "Traceback" not in done.stderr + done.stdout and list(cwd.iterdir()) == []


def test_model_by_path_writes_under_its_folder_name(commands):
    done, cwd = commands["by-path"]
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [p.name for p in (cwd / "runs").iterdir()] == ["my-llava"]
    assert (cwd / "runs" / "my-llava" / "activations.npz").exists()
