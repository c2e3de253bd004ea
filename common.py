"""What two or more SGM stages share and that has no home of its own: errors and options, the data, prompts,
batching and generation. Beside it, each a concept several files use: sgm/artifacts.py (writing and reading what
the stages hand each other), sgm/neurons.py (the neuron sites and the hooks that record and damp them), sgm/models.py
(building tiny/demo, loading checkpoints, the teacher-forced NLL), sgm/judges.py (the judges), sgm/endpoint.py (served
models over an OpenAI-compatible API).

Read the stages in number order (01_collect.py -> 04_evaluate.py); come here when a stage calls a helper.
"""
import hashlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "mm_toxic_qa" / "items.jsonl"


# ----------------------------------------------------------------------------------------------------------
# errors and options

class UserError(SystemExit):
    """Bad input: printed as one line and exit status 1, never a traceback. Tests catch it by type."""

    def __init__(self, message):
        super().__init__(f"error: {message}")
        self.message = message


def fail(message):
    raise UserError(message)


def parse_overrides(defaults, argv=None):
    """`--key value` overrides for the defaults block at the top of each stage; types follow the defaults."""
    import argparse
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in defaults.items():
        kind = type(value) if value is not None else str
        if kind is bool:
            kind = lambda s: s.lower() in ("1", "true", "yes", "on")  # noqa: E731
        flags = sorted({"--" + key.replace("_", "-"), "--" + key})  # --top-k and --top_k both work
        parser.add_argument(*flags, dest=key, type=kind, default=value)
    return vars(parser.parse_args(argv))


def check_range(cfg, key, low=None, high=None, above=None, below=None, fix=""):
    """Refuse cfg[key] outside its range, before any data or model loads: low/high are inclusive bounds,
    above/below exclusive ones. One line, e.g. `--strength must be >= 0 (got -1): 0 leaves the model as it is`."""
    value = cfg[key]
    bounds = [f">= {low:g}" if low is not None else f"> {above:g}" if above is not None else "",
              f"<= {high:g}" if high is not None else f"< {below:g}" if below is not None else ""]
    if (value != value or value in (float("inf"), float("-inf"))  # nan, inf: never a valid setting
            or (low is not None and value < low) or (above is not None and value <= above)
            or (high is not None and value > high) or (below is not None and value >= below)):
        fail(f"--{key.replace('_', '-')} must be {' and '.join(b for b in bounds if b)} (got {value:g})"
             + (f": {fix}" if fix else ""))


def parse_limits(text):
    """--limits "standard=100,jailbreak=16" -> {condition: items per label} ("" or "0" = every item)."""
    try:
        limits = {} if text in ("", "0") else {c: int(n) for c, n in (p.split("=") for p in text.split(","))}
    except ValueError:
        fail(f"--limits must look like standard=100,jailbreak=16 (or 0 for all), got {text!r}")
    for condition, n in limits.items():
        if condition not in ALLOWED["condition"] or n < 0:
            fail(f"--limits {condition}={n}: use a condition of {sorted(ALLOWED['condition'])} and a count >= 0 "
                 "(0 = all its items), e.g. standard=100,jailbreak=16")
    return limits


def run_name(run, model=None, option="--run"):
    """The folder under runs/ that a stage reads and writes: --run as given, or else the model's own name (the
    last part of a path or hub id: /data/ckpts/llava-1.5-7b -> llava-1.5-7b, llava-hf/llava-1.5-7b-hf ->
    llava-1.5-7b-hf; the Makefile's `RUN ?= $(notdir ...)` gives the same). Names of letters, digits and
    . _ - + @ = , only; `/` only between such names (tools/tune.py keeps its runs in runs/tune/<calibration>/)."""
    import re
    given = run
    if not run and model:
        run = re.split(r"[/\\]", str(model).rstrip("/\\"))[-1]
    parts = str(run).split("/")
    if not run or any(part in ("", ".", "..") or not re.fullmatch(r"[\w.+@=,-]+", part) for part in parts):
        if not given and model:
            fail(f"cannot name the run after --model {model!r}: pass --run NAME (artifacts go to runs/NAME/)")
        fail(f"{option} {run!r} must be a plain name like llava15 (letters, digits, . _ - + @ = , and / between "
             "names; no '..', no absolute path, no backslash, no space): artifacts go to runs/<run>/")
    return run


# ----------------------------------------------------------------------------------------------------------
# data: MM-TOXIC-QA items (built by `make data`, see data/README.md) or any JSONL with the same fields

ITEM_FIELDS = ("id", "split", "label", "category", "condition", "task", "text")
ALLOWED = {"split": {"calibration", "dev", "test"}, "label": {"toxic", "benign"},
           "condition": {"standard", "typographic", "jailbreak"}, "task": {"continue", "answer"}}
MAX_TEXT_CHARS = 8000  # ~2k tokens; longer rows are almost always a broken export


def load_items(path=DEFAULT_DATA):
    """Read and validate an items JSONL. Returns (items, checksum over the file and every image it names).

    `image` is optional (a path relative to the JSONL's folder); items without one get a blank image, since
    every model here takes one image per prompt. A bad row stops the run naming its line and the fix.
    """
    import re

    from PIL import Image
    path = Path(path)
    built = path.resolve() == DEFAULT_DATA.resolve()  # MM-TOXIC-QA as `make data` builds it (any spelling)
    if not path.exists():
        hint = "run `make data`" if built else "check the --data path"
        fail(f"data file {path} not found: {hint}")
    # A damaged build (a cut-off copy, a full disk) is rebuilt, not repaired: make would call it up to date.
    rebuild = "; delete it and run `make data` to rebuild it" if built else ""
    try:
        raw = path.read_bytes()
    except OSError as e:
        fail(f"cannot read data file {path} ({e.strerror or type(e).__name__}): check the --data path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[:e.start].count(b"\n") + 1
        fail(f"{path}:{line_no}: not UTF-8 text" + (rebuild or "; save the file as UTF-8"))
    digest = hashlib.sha256(raw)
    folder = path.parent.resolve()
    items, seen = [], set()
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:  # e.g. the last line of a cut-off copy
            fail(f"{where}: not valid JSON ({e.msg})" + (rebuild or "; fix the line: one JSON object per line"))
        if not isinstance(row, dict):
            fail(f"{where}: expected a JSON object per line" + rebuild)
        missing = [f for f in ITEM_FIELDS if f not in row]
        if missing:
            fail(f"{where}: missing field(s) {', '.join(missing)}"
                 + (rebuild or f"; every row needs {', '.join(ITEM_FIELDS)}"))
        for field, allowed in ALLOWED.items():
            if row[field] not in allowed:
                fail(f"{where}: unknown {field} {row[field]!r}; use one of {sorted(allowed)}")
        if not isinstance(row["text"], str) or not row["text"].strip():
            fail(f"{where}: empty text; every item needs the text the model is given")
        if len(row["text"]) > MAX_TEXT_CHARS:
            fail(f"{where}: text has {len(row['text'])} characters (limit {MAX_TEXT_CHARS}); shorten it")
        if row["id"] in seen:
            fail(f"{where}: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])
        if row.get("image"):
            image_path = path.parent / str(row["image"])
            # Images live beside the JSONL: a row must not make the run read (and checksum) any other file.
            if Path(str(row["image"])).is_absolute() or not image_path.resolve().is_relative_to(folder):
                fail(f"{where}: image {row['image']!r} is outside {path.parent}; give a path relative to "
                     "that folder, inside it")
            try:
                with Image.open(image_path) as im:
                    im.verify()
            except FileNotFoundError:
                fail(f"{where}: image {image_path} not found; fix the path (relative to {path.parent})")
            except Exception as e:
                fail(f"{where}: image {image_path} is unreadable ({type(e).__name__}); re-render it")
            digest.update(image_path.read_bytes())
            row["image_path"] = str(image_path)
        else:
            row["image_path"] = None
        items.append(row)
    if not items:
        fail(f"{path} holds no items" + rebuild)
    # A build's card records the checksum of the files it wrote (data/build.py): a copy cut off at a line end,
    # an edited row or a changed image parses, but no longer matches it.
    card = path.with_name("card.md")
    recorded = re.search(r"Build checksum: `([0-9a-f]{64})`", card.read_text(encoding="utf-8", errors="replace")
                         ) if path.name == "items.jsonl" and card.is_file() else None
    if recorded:
        files = {"items.jsonl": raw, **{f"images/{f.name}": f.read_bytes()
                                        for f in sorted(path.parent.glob("images/*")) if f.is_file()}}
        build = hashlib.sha256("".join(f"{name} {hashlib.sha256(files[name]).hexdigest()}\n"
                                       for name in sorted(files)).encode()).hexdigest()
        if build != recorded.group(1):
            fail(f"{path} (or an image beside it) is not the build {card} describes (checksum {build[:12]} vs "
                 f"{recorded.group(1)[:12]}: a cut-off copy or an edit?); " + (
                     f"delete {path.parent} and run `make data` to rebuild it" if built else
                     f"rebuild it with `python data/build.py --out {path.parent}`"))
    return items, digest.hexdigest()


def select(items, **where):
    """Items whose fields equal the given values; a value may be a set of allowed values."""
    def keep(item):
        return all(item[k] in v if isinstance(v, (set, list, tuple)) else item[k] == v
                   for k, v in where.items())
    return [item for item in items if keep(item)]


def source_id(item_id):
    """The source text an MM-TOXIC-QA item was made from: its id less the last `-` part, shared by the versions of
    one text (`rtp-insult-0042-standard` typed, `rtp-insult-0042-typographic` rendered, `...-jailbreak` wrapped)."""
    return item_id.rsplit("-", 1)[0]


def load_image(item):
    from PIL import Image
    if item["image_path"] is None:
        return Image.new("RGB", (64, 64), (128, 128, 128))
    with Image.open(item["image_path"]) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# prompts, batching, generation

def fallback_image_prefix(processor):
    """What stands for the image at the start of a prompt without a chat template; the processor expands it
    into the image's tokens. Most processors take their `image_token` (Gemma 3's is <start_of_image>)."""
    name = type(processor).__name__
    if name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor"):
        # Qwen's position ids (M-RoPE) find an image by the <|vision_start|> before its <|image_pad|>.
        return f"<|vision_start|>{processor.image_token}<|vision_end|>\n"
    if name == "Glm4vProcessor":  # GLM-4.5V's chat template frames the image the same way
        return f"<|begin_of_image|>{processor.image_token}<|end_of_image|>\n"
    if name == "PaliGemmaProcessor":
        return processor.image_token  # the processor itself puts <bos> between image and text
    return f"{processor.image_token}\n"


def user_text(processor, item):
    """The text after the image in prompt_text: the item's text when the checkpoint has a chat template;
    without one, the fallback ("Question: ...\\nAnswer:" for answer items), which prompt_text (and a server,
    through endpoint.fallback_chat_template) places after the image prefix."""
    if getattr(processor, "chat_template", None) or item["task"] == "continue":
        return item["text"]
    return f"Question: {item['text']}\nAnswer:"


def fallback_image(processor):
    """What stands for the image inside fallback_parts: fallback_image_prefix less its closing newline (the text
    after a leading image carries that newline)."""
    return fallback_image_prefix(processor).removesuffix("\n")


def fallback_parts(processor, item):
    """The prompt without a chat template, in order: strings, and None where the image goes (rendered as
    fallback_image; sgm/endpoint.py sends the same parts to a server). The image
    leads and the item's text follows (user_text), except for a `typographic` item, whose text is inside the image:
    it takes the place its standard twin's text has, "Question: <image>\nAnswer:" or, to `continue`, the image
    last, so the LM goes on from the image's text. A base LM does not follow the instruction such an item carries
    ("Answer the question shown in the image."): even with the true embeddings of the image's text in the image
    positions it then answered no toxic item toxically (docs/RESULTS.md, "The demo's eyes", session 20). PaliGemma's
    processor puts the image first whatever the text says, so its items keep the leading image."""
    after = fallback_image_prefix(processor).removeprefix(fallback_image(processor))
    if item.get("condition") == "typographic" and type(processor).__name__ != "PaliGemmaProcessor":
        return ["Question: ", None, "\nAnswer:"] if item["task"] == "answer" else [None]
    return [None, after + user_text(processor, item)]


def prompt_text(processor, item):
    """The prompt string (with the image placeholder) for an item.

    With a chat template (instruction-tuned checkpoints) the item is one user turn: image, then text.
    Without one (base models such as the demo) the fallback is plain text around the image placeholder
    (fallback_parts): `continue` items are continued as written, `answer` items become "Question: ...\nAnswer:"
    (user_text), a typographic item's image stands where its text would."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["text"]}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = fallback_image(processor)
    return "".join(image if part is None else part for part in fallback_parts(processor, item))


def encode(processor, items, device):
    texts = [prompt_text(processor, item) for item in items]
    # One image per prompt, as a list per prompt: processors that take several images per prompt (Gemma 3)
    # would otherwise read a flat list as all the images of the first prompt.
    # A chat template that writes the BOS itself (Gemma 3's, Mistral's) must not get a second one from the
    # tokenizer: the rule transformers' own apply_chat_template(tokenize=True) follows.
    bos = processor.tokenizer.bos_token
    template_wrote_bos = bool(bos) and all(text.startswith(bos) for text in texts)
    batch = processor(text=texts, images=[[load_image(item)] for item in items], return_tensors="pt",
                      padding=True, **({"add_special_tokens": False} if template_wrote_bos else {}))
    # PaliGemma's processor also returns training `labels`; a forward pass given them would compute a loss.
    batch.pop("labels", None)
    return batch.to(device)


def append_tokens(processor, batch, ids, mask):
    """`batch` (from encode) with the tokens `ids` (batch x new) after every prompt, `mask` marking the real
    ones: one forward pass over prompt + continuation (01's responses mode, 04's teacher forcing).

    The per-token fields some processors return grow too, with the value their model's generate() gives new
    tokens: 0 (text) in Qwen's mm_token_type_ids and Gemma 3's token_type_ids, 1 in PaliGemma's
    token_type_ids (after the prefix, attended causally). Left at the prompt's length, Qwen's field makes
    the forward pass fail (IndexError in its M-RoPE position ids). Mllama's cross_attention_mask (which image
    tiles each token attends to) repeats its last position, as Mllama's generate() extends it."""
    ids, mask = ids.to(batch["input_ids"].device), mask.to(batch["input_ids"].device)
    extended = dict(batch, input_ids=torch.cat([batch["input_ids"], ids], 1),
                    attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1))
    new_type = {"token_type_ids": int(type(processor).__name__ == "PaliGemmaProcessor"), "mm_token_type_ids": 0}
    for field, value in new_type.items():
        if field in batch:
            extended[field] = torch.cat([batch[field], torch.full_like(ids, value).to(batch[field].dtype)], 1)
    if "cross_attention_mask" in batch:
        last = batch["cross_attention_mask"][:, -1:]
        extended["cross_attention_mask"] = torch.cat(
            [batch["cross_attention_mask"], last.expand(-1, ids.shape[1], *last.shape[2:])], 1)
    return extended


def batches(items, batch_size, desc):
    """Fixed-order batches with a progress bar (none when desc is None). Items are sorted by text length so
    that a batch pads little, and a batch also ends before an item more than twice as long as its first (+200
    characters), so that a few long prompts (jailbreak templates) never make a whole batch pad to their
    length. Callers get the index of each item back and restore the original order."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i]["text"]), items[i]["id"]))
    chunks = []
    for i in order:
        if not chunks or len(chunks[-1]) == batch_size or \
                len(items[i]["text"]) > 2 * len(items[chunks[-1][0]]["text"]) + 200:
            chunks.append([])
        chunks[-1].append(i)
    for index in (chunks if desc is None else tqdm(chunks, desc=desc, unit="batch", file=sys.stdout)):
        yield index, [items[i] for i in index]


def input_device(model):
    return model.get_input_embeddings().weight.device


def peak_rss_mb():
    """This process's peak resident memory so far, in MB (getrusage's ru_maxrss: KB on Linux, bytes on macOS)."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


def image_token_ids(model, processor):
    """Token ids that stand for or frame an image: the placeholders the processor expands (image, video), their
    start/end markers and tile tags (Qwen's <|vision_start|>, Gemma 3's <start_of_image>, Idefics3's
    <fake_token_around_image>, ...). Generated text must never contain them: a continuation with an image
    placeholder, fed back with its prompt (01's responses mode, 04's teacher forcing), would ask the model for
    one image more than it was given. Found two ways, because no single field names them all: the config's
    *_token_id / *_token_index fields (other than bos/eos/pad), and the special tokens the processor writes
    for an image (encode the fallback prompt with an image, minus the same text without it)."""
    tokenizer = processor.tokenizer
    ids = set()
    for key, value in model.config.to_dict().items():
        if key.endswith(("_token_id", "_token_index")) and key not in (
                "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            ids.update(value if isinstance(value, list) else [value])
    item = {"text": "x", "task": "continue", "image_path": None}
    with_image = processor(text=[fallback_image_prefix(processor) + "x"], images=[[load_image(item)]],
                           return_tensors="pt")["input_ids"][0].tolist()
    ids |= (set(with_image) - set(tokenizer("x")["input_ids"])) & set(tokenizer.all_special_ids)
    eos = model.generation_config.eos_token_id
    ids -= {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
            *(eos if isinstance(eos, list) else [eos])}
    vocabulary = model.get_output_embeddings().weight.shape[0]  # configs carry defaults past a tiny vocabulary
    return sorted(i for i in ids if isinstance(i, int) and 0 <= i < vocabulary)


def prompt_positions(batch, which, image_ids, placeholder_id):
    """The positions of an encoded prompt batch that 01_collect.py pools (batch x positions, bool):
      text   every real token that is not one of the image's tokens: neither the placeholders nor the markers
             and tile tags around them (`image_ids`, from image_token_ids: Qwen's <|vision_start|>, Gemma 3's
             <start_of_image>, Idefics3's <fake_token_around_image>, ...), which are not the prompt's words;
      all    every real token;
      image  the placeholders only (`placeholder_id`, the config's image_token_id)."""
    real, ids = batch["attention_mask"].bool(), batch["input_ids"]
    if which == "text":
        return real & ~torch.isin(ids, torch.as_tensor(image_ids, dtype=ids.dtype, device=ids.device))
    return real if which == "all" else real & (ids == placeholder_id)


@torch.no_grad()
def generate(model, processor, items, max_new_tokens, batch_size, desc="generate", on_batch=None, top_k=0,
             cache=None):
    """Greedy continuations (top_k > 0: sampling from the k likeliest tokens instead), left-padded batches,
    never writing an image token (image_token_ids). Returns (texts, token ids per item).
    `on_batch(index, batch, sequences, new_token_mask)` lets a caller reuse the batch (01 records on it).
    `cache` = (store, salt): each answer is added to `store` (a JSONL cache: `.values`, `.add`; sgm/endpoint.py's
    AnswerCache) as its batch finishes, keyed by `salt` (what else the answer depends on: model, neurons,
    settings), the batch's item ids and the item; a batch whose answers are all there is not generated again,
    so a killed run resumes. Batches are the same either way, so the answers are too."""
    texts, tokens = [None] * len(items), [None] * len(items)
    pad_id = processor.tokenizer.pad_token_id
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    never = image_token_ids(model, processor)
    for index, chunk in batches(items, batch_size, desc):
        keys = [hashlib.sha256(json.dumps([cache[1], [c["id"] for c in chunk], item["id"], item["text"]]).encode())
                .hexdigest() for item in chunk] if cache else []
        if keys and all(key in cache[0].values for key in keys):
            for i, key in zip(index, keys):
                texts[i], tokens[i] = cache[0].values[key]["answer"], cache[0].values[key]["tokens"]
            continue
        batch = encode(processor, chunk, input_device(model))
        sequences = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=top_k > 0,
                                   pad_token_id=pad_id, top_p=None, top_k=top_k or None,
                                   temperature=1.0 if top_k else None, suppress_tokens=never or None)
        new = sequences[:, batch["input_ids"].shape[1]:]
        # Keep tokens up to (not including) the first end-of-sequence; later positions are padding.
        is_eos = torch.zeros_like(new, dtype=torch.bool)
        for eos in eos_ids:
            is_eos |= new == eos
        new_mask = torch.cumsum(is_eos.int(), dim=1) == 0
        for row, i in enumerate(index):
            ids = new[row][new_mask[row]].tolist()
            tokens[i] = ids
            texts[i] = processor.tokenizer.decode(ids, skip_special_tokens=True)
        for i, key in zip(index, keys):
            cache[0].add(key, dict(answer=texts[i], tokens=tokens[i]))
        if on_batch is not None:
            on_batch(index, batch, sequences, new_mask)
    return texts, tokens
