"""Everything two or more SGM stages share: errors and artifacts, data, neuron sites and hooks, prompts and
generation. The model side (building tiny/demo, loading checkpoints, the teacher-forced NLL) is models.py;
the judges are judges.py.

Read the stages in number order (01_collect.py -> 04_evaluate.py); come here when a stage calls a helper.
"""
import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "mm_toxic_qa" / "items.jsonl"


# ----------------------------------------------------------------------------------------------------------
# errors, arguments, artifacts

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
    . _ - + @ = , only; `/` only between such names (tune.py keeps its runs in runs/tune/<calibration>/)."""
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


def array_fingerprint(arrays):
    """sha256 over array names, dtypes, shapes and bytes: equal arrays give equal fingerprints."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _atomic_write(path, write):
    """Write through a temp file in the same folder, then rename: a crash never leaves a half artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz(path, arrays, meta):
    """arrays: name -> numpy array (no object dtype). meta (JSON) travels inside as the string `meta`."""
    meta = dict(meta, fingerprint=array_fingerprint(arrays))
    _atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta, sort_keys=True)), allow_pickle=False,
                                           **arrays))
    return meta


def _load_artifact(path, rerun_hint, read, required):
    """`read(path)` -> (arrays, meta JSON). Any failure (truncated, another format, bad meta, contents unlike
    the saved fingerprint, a `required` array missing) is one line naming the file and the stage to rerun."""
    path = Path(path)
    if not path.exists():
        fail(f"{path} not found: run {rerun_hint} first")
    try:
        arrays, meta = read(path)
        meta = json.loads(meta)
        if array_fingerprint({k: np.asarray(v) for k, v in arrays.items()}) != meta["fingerprint"]:
            raise ValueError("contents do not match the fingerprint in its meta")
    except Exception as e:  # what a damaged file raises depends on where it breaks: zip, pickle, JSON, ...
        reason = (str(e).splitlines() or [""])[0][:120]
        fail(f"{path} is damaged or not a {path.suffix} artifact ({type(e).__name__}: {reason}): rerun {rerun_hint}")
    missing = [name for name in required or () if name not in arrays]
    if missing:
        fail(f"{path} lacks array {missing[0]!r}: rerun {rerun_hint}")
    return arrays, meta


def load_npz(path, rerun_hint, required=None):
    def read(path):
        with np.load(path, allow_pickle=False) as npz:  # no pickle: loading an artifact never runs code
            return {k: npz[k] for k in npz.files if k != "meta"}, str(npz["meta"])
    return _load_artifact(path, rerun_hint, read, required)


def save_pt(path, tensors, meta):
    """Torch artifact loadable with weights_only=True: a dict of tensors plus the meta JSON string."""
    fingerprint = array_fingerprint({k: v.numpy() for k, v in tensors.items()})
    meta = dict(meta, fingerprint=fingerprint)
    _atomic_write(path, lambda f: torch.save({**tensors, "meta": json.dumps(meta, sort_keys=True)}, f))
    return meta


def load_pt(path, rerun_hint, required=None):
    def read(path):
        payload = torch.load(path, weights_only=True, map_location="cpu")  # tensors only, never code
        return payload, payload.pop("meta")
    return _load_artifact(path, rerun_hint, read, required)


def check_same_model(meta, model_meta, artifact, rerun_hint):
    """Refuse an artifact made for another model (or another set of neuron sites)."""
    if meta["model"] != model_meta["model"]:
        fail(f"{artifact} was made for model '{meta['model']}', not '{model_meta['model']}': "
             f"rerun {rerun_hint} with --model {model_meta['model']}")
    if meta["sites"] != model_meta["sites"]:
        fail(f"{artifact} has other neuron sites than model '{model_meta['model']}' "
             f"({len(meta['sites'])} vs {len(model_meta['sites'])} layers): rerun {rerun_hint}")


def write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


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


def load_image(item):
    from PIL import Image
    if item["image_path"] is None:
        return Image.new("RGB", (64, 64), (128, 128, 128))
    with Image.open(item["image_path"]) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# neuron sites and hooks. A neuron is one coordinate of the input of an MLP's down_proj in the language model.

def neuron_sites(model):
    """[(qualified name, down_proj Linear)] of the language model's decoder layers, in layer order.

    The language model is found from the structure (`get_decoder()`), so the vision tower's MLPs are never
    included even when they also name a layer `down_proj` (Qwen2.5-VL's vision blocks do). Works for every
    family whose decoder layers have a gated MLP with a `down_proj` Linear (LLaVA, LLaVA-NeXT, Qwen2-VL,
    Qwen2.5-VL, Idefics3/SmolVLM, PaliGemma, Gemma 3, InternVL3, Llama-3.2-Vision, ...).

    Llama-3.2-Vision (mllama) interleaves cross-attention decoder layers (every 5th) with self-attention ones;
    each has its own MLP, and all of them are neuron sites, one per decoder layer as for every family. A
    cross-attention layer's MLP reads the residual stream right after that layer has attended to the image
    features (gated by tanh(cross_attn_mlp_gate)), so it is post-fusion in the paper's sense, and it is where
    Llama-3.2-Vision's image information first enters the text positions; leaving it out would skip the very
    layers that fuse the image. (Positions before the image token have their cross-attention MLP output
    masked to zero by the model, so damping acts only from the image on; their activations are still pooled.)"""
    language_model = model.get_decoder()
    names = {module: name for name, module in model.named_modules()}
    sites = [(names[module], module) for name, module in language_model.named_modules()
             if name.endswith("mlp.down_proj") and isinstance(module, torch.nn.Linear)]
    vision = [n for n, _ in sites if any(v in n for v in ("vision", "visual"))]
    if not sites or vision or language_model is model:
        found = f"found {vision[0]}, in the vision tower" if vision else f"found {len(sites)}"
        fail(f"cannot find the language model's neurons in {type(model).__name__}: common.neuron_sites looks "
             f"for Linear layers named `mlp.down_proj` inside model.get_decoder() ({type(language_model).__name__}) "
             f"and {found}; add a rule there that returns, per decoder layer, the layer whose input is the "
             "MLP's hidden activation (e.g. `fc2` in OPT)")
    return sites


def split_by_site(flat, sites):
    """A flat per-neuron vector (all sites concatenated in order) -> one tensor per site."""
    sizes = [module.in_features for _, module in sites]
    if flat.numel() != sum(sizes):
        fail(f"alpha has {flat.numel()} neurons but the model has {sum(sizes)} "
             f"({len(sizes)} layers): rerun 03_suppress.py for this model")
    return list(torch.split(flat, sizes))


class NeuronRecorder:
    """Pools each neuron over the positions in `mask` inside the hook, so per-token activations are never
    kept. Set `mask` (batch x positions, bool) before each forward; read `pop()` after it. While `mask` is
    None the hooks record nothing (e.g. during generation)."""

    def __init__(self, sites, pooling):
        if pooling not in ("mean", "max"):
            fail(f"unknown pooling {pooling!r}; use mean or max")
        self.site_names = [name for name, _ in sites]
        self.pooling, self.mask, self.pooled = pooling, None, {}

    def hook(self, index, module, args):
        if self.mask is None:
            return
        x = args[0]
        mask = self.mask.to(x.device)
        if self.pooling == "mean":
            summed = torch.einsum("bti,bt->bi", x.float(), mask.float())
            pooled = summed / mask.sum(1, keepdim=True).clamp(min=1)
        else:
            pooled = x.float().masked_fill(~mask[..., None], float("-inf")).amax(1)
        if not torch.isfinite(pooled).all():
            fail(f"non-finite activations at {self.site_names[index]} (NaN/inf): try --dtype float32, "
                 "or check that every item has at least one pooled position")
        self.pooled[index] = pooled.cpu()

    def pop(self):
        out = torch.cat([self.pooled[i] for i in range(len(self.site_names))], dim=1)
        self.pooled = {}
        return out.numpy()


@contextmanager
def record_neurons(sites, pooling="mean"):
    recorder = NeuronRecorder(sites, pooling)
    handles = []
    try:
        for index, (_, module) in enumerate(sites):
            handles.append(module.register_forward_pre_hook(
                lambda module, args, index=index: recorder.hook(index, module, args)))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def suppress_neurons(sites, alpha):
    """Multiply each down_proj input by alpha (flat, all sites). Hooks are removed on exit, also on error.
    Sites whose alpha is all ones get no hook at all, so they cost nothing and stay bit-identical."""
    handles = []
    try:
        for (_, module), factor in zip(sites, split_by_site(torch.as_tensor(alpha).float(), sites)):
            if torch.all(factor == 1):
                continue
            cast = {}  # alpha in the activation's dtype and device, made once per (dtype, device)

            def hook(module, args, factor=factor, cast=cast):
                x = args[0]
                key = (x.dtype, x.device)
                if key not in cast:
                    cast[key] = factor.to(dtype=x.dtype, device=x.device)
                return (x * cast[key],) + tuple(args[1:])
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def fold_alpha(sites, alpha):
    """Bake alpha into down_proj's weight columns: W[:, m] *= alpha_m, equal to the hook without hooks."""
    for (_, module), factor in zip(sites, split_by_site(torch.as_tensor(alpha).float(), sites)):
        module.weight.mul_(factor.to(module.weight.device, module.weight.dtype)[None, :])


# ----------------------------------------------------------------------------------------------------------
# prompts, batching, generation

def fallback_image_prefix(processor):
    """What stands for the image at the start of a prompt without a chat template; the processor expands it
    into the image's tokens. Most processors take their `image_token` (Gemma 3's is <start_of_image>)."""
    name = type(processor).__name__
    if name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor"):
        # Qwen's position ids (M-RoPE) find an image by the <|vision_start|> before its <|image_pad|>.
        return f"<|vision_start|>{processor.image_token}<|vision_end|>\n"
    if name == "PaliGemmaProcessor":
        return processor.image_token  # the processor itself puts <bos> between image and text
    return f"{processor.image_token}\n"


def prompt_text(processor, item):
    """The prompt string (with the image placeholder) for an item.

    With a chat template (instruction-tuned checkpoints) the item is one user turn: image, then text.
    Without one (base models such as the demo) the fallback is plain text after the image placeholder
    (fallback_image_prefix): `continue` items are continued as written, `answer` items become
    "Question: ...\nAnswer:"."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["text"]}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = item["text"] if item["task"] == "continue" else f"Question: {item['text']}\nAnswer:"
    return fallback_image_prefix(processor) + text


def encode(processor, items, device):
    texts = [prompt_text(processor, item) for item in items]
    # One image per prompt, as a list per prompt: processors that take several images per prompt (Gemma 3)
    # would otherwise read a flat list as all the images of the first prompt.
    batch = processor(text=texts, images=[[load_image(item)] for item in items], return_tensors="pt",
                      padding=True)
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


@torch.no_grad()
def generate(model, processor, items, max_new_tokens, batch_size, desc="generate", on_batch=None, top_k=0):
    """Greedy continuations (top_k > 0: sampling from the k likeliest tokens instead), left-padded batches.
    Returns (texts, token ids per item).
    `on_batch(index, batch, sequences, new_token_mask)` lets a caller reuse the batch (01 records on it)."""
    texts, tokens = [None] * len(items), [None] * len(items)
    pad_id = processor.tokenizer.pad_token_id
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    for index, chunk in batches(items, batch_size, desc):
        batch = encode(processor, chunk, input_device(model))
        sequences = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=top_k > 0,
                                   pad_token_id=pad_id, top_p=None, top_k=top_k or None,
                                   temperature=1.0 if top_k else None)
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
        if on_batch is not None:
            on_batch(index, batch, sequences, new_mask)
    return texts, tokens
