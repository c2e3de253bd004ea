"""`make bench` end to end on the tiny model with small sizes: bench.json has every ratio as a finite number.
Timings are never asserted here (a loaded machine would make that flaky); `make bench` reports them."""
import json
import math
import os
import subprocess

from conftest import command, write_items

KEYS = ("auroc_speedup", "auroc_vs_sort", "auroc_max_abs_diff", "suppress_overhead", "baked_overhead",
        "collect_overhead", "lm_head_cost")


def test_bench_writes_finite_ratios(tmp_path):
    data = write_items(tmp_path / "items.jsonl")
    out = tmp_path / "bench.json"
    args = ["--model", "tiny", "--data", str(data), "--items", "120", "--sklearn-columns", "20",
            "--auroc-repeats", "1", "--repeats", "1", "--prompts", "2", "--new-tokens", "3",
            "--collect-items", "2", "--out", str(out)]
    # SGM_CACHE (set by conftest) travels in the environment: the tiny model is built in the tests' temp cache.
    proc = subprocess.run(command("tools/bench.py", *args), cwd=tmp_path, env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), key
    assert result["auroc_max_abs_diff"] <= 1e-9  # correctness
    assert {row["model"] for row in result["memory"]} >= {"llava-1.5-7b", "70b-class"}
    assert result["meta"]["torch"] == __import__("torch").__version__
