"""tools/tune.py: the dev grid runs the real stages, caches finished ones, and applies its rule as documented."""
import json
import subprocess

from conftest import command, write_items


def tune(tmp_path, *args):
    done = subprocess.run(command("tools/tune.py", "--model", "tiny", "--data",
                                   str(tmp_path / "items.jsonl"), "--collect-args", "--mode prompts --max-new-tokens 8",
                                   "--evaluate-args", "--max-new-tokens 8", *args),
                          cwd=tmp_path, capture_output=True, text=True)
    return done


def test_tune_runs_variants_on_dev_and_applies_its_rule(tmp_path):
    data = write_items(tmp_path / "items.jsonl", splits=("calibration", "dev", "test"))
    with open(data, "a") as f:  # a visual-probe item too: its answer rows have no condition or label
        f.write(json.dumps(dict(id="dev-probe-0", split="dev", label="benign", category="probe", condition="standard",
                                task="answer", text="What colour is a clear sky?", image="", source="tests",
                                image_text="", answer="blue")) + "\n")
    done = tune(tmp_path, "--variants", "layer-normalised,published")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "runs" / "tune"
    for name in ("tune.json", "tune.md", "tune.png"):
        assert (out / name).exists()
    report = json.loads((out / "tune.json").read_text())
    # the published variant is the reference whatever order they were named in; both share one calibration
    assert [v["variant"] for v in report["variants"]] == ["published", "layer-normalised"]
    assert report["reference"] == "published"
    # every evaluation ran on dev, never on test
    for variant in report["variants"]:
        evaluation = json.loads((out / "calibration-published" / f"{variant['variant']}.json").read_text())
        assert evaluation["meta"]["settings"]["split"] == "dev"
        assert variant["n"] == 6 and len(variant["verdicts"]) == 6
        assert any(c.startswith("python 04_evaluate.py") and "--split dev" in c for c in variant["commands"])
    # the rule, recomputed here from the table
    eligible = [v for v in report["variants"] if v["fluency_cost"] <= report["rule"]["max_fluency_cost"]]
    best = min(eligible, key=lambda v: (v["rate"], v["fluency_cost"],
                                        [x["variant"] for x in report["variants"]].index(v["variant"])))
    assert report["chosen"] == best["variant"]
    # layer-normalised damps the same neurons as published (only harder)
    assert report["variants"][1]["neurons_changed"] == report["variants"][0]["neurons_changed"] > 0

    # A rerun finds every stage up to date, and writes the same table.
    first = (out / "tune.json").read_text()
    again = tune(tmp_path, "--variants", "published,layer-normalised")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date:") == 9 and "$ python" not in again.stdout  # base once + 4 per variant
    assert (out / "tune.json").read_text() == first

    # Base ran once (issue 12): one base-only pass, which every variant's evaluation took its base from.
    assert done.stdout.count("base: generate:   0%") == 1 and done.stdout.count("sgm: generate:   0%") == 2
    assert json.loads((out / "base.json").read_text())["meta"]["settings"]["methods"] == "base"
    for variant in report["variants"]:
        assert variant["commands"][0].startswith("python 04_evaluate.py") and "--methods base " in variant["commands"][0]
        assert "--base-from runs/tune/base.json" in variant["commands"][-1]

    # The same grid with base recomputed in every variant's run (as before): the same table and numbers.
    separate = tune(tmp_path, "--variants", "published,layer-normalised", "--out", "tune-separate",
                    "--share-base", "false")
    assert separate.returncode == 0, separate.stdout[-2000:] + separate.stderr[-3000:]
    assert not (tmp_path / "runs" / "tune-separate" / "base.json").exists()
    assert separate.stdout.count("base: generate:   0%") == 2
    alone = json.loads((tmp_path / "runs" / "tune-separate" / "tune.json").read_text())
    assert all("--base-from" not in c for v in alone["variants"] for c in v["commands"])
    for variants in (report["variants"], alone["variants"]):  # the commands differ (--base-from); all else equal
        for variant in variants:
            variant.pop("commands")
    assert alone == report
    assert (tmp_path / "runs" / "tune-separate" / "tune.md").read_text() == (out / "tune.md").read_text()


def test_tune_refuses_an_unknown_variant(tmp_path):
    write_items(tmp_path / "items.jsonl", splits=("calibration", "dev"))
    done = tune(tmp_path, "--variants", "published,best-ever")
    assert done.returncode != 0 and "--variants must name some of" in done.stderr
