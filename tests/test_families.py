"""Every stage on each supported model family, offline: a tiny random checkpoint per family (2 decoder layers,
a one-layer vision tower, a few image tokens, an in-code tokenizer with the family's special tokens) is built
from config, saved to a folder and used through `--model PATH`, exactly as a downloaded checkpoint would be.

Each checkpoint carries a small chat template in its family's format (the real checkpoints ship one), except
PaliGemma, whose checkpoints have none; test_fallback_prompt_places_the_image covers the other path per family.
"""
import importlib
import json

import numpy as np
import pytest
import torch
from conftest import write_items
from test_pipeline import run_stage

import common
from common import encode
from sgm import judges
from sgm import models
from sgm import neurons
from sgm.artifacts import load_npz, load_pt
from sgm.models import load_model, tiny_tokenizer
from sgm.neurons import fold_alpha, record_neurons, suppress_neurons

# PaliGemma's processor builds its (unused here) training labels in a way numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

HIDDEN, INTERMEDIATE, LAYERS = 32, 48, 2
TEXT = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512)
# Mixture-of-experts families (tests/test_moe.py checks their routed neurons by hand): 4 experts of width 16, top-2.
EXPERT_WIDTH, N_EXPERTS, TOP_K = 16, 4, 2
MOE_TEXT = dict(moe_intermediate_size=EXPERT_WIDTH, num_experts_per_tok=TOP_K)



def write_video_config(out_dir, video_processor_type, **settings):
    """video_preprocessor_config.json as the hub checkpoint of a family that also takes video ships it: its
    presence sends AutoProcessor to the torchvision video processor (models.load_processor loads image-only)."""
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(
        dict(video_processor_type=video_processor_type, **settings)))


def qwen_style_video_config(out_dir, video_processor_type, processor_class, patch, smallest, largest):
    """The video settings of Qwen-VL-style processors (Qwen3-VL, GLM-4.5V): patches merged 2x2, 2 frames a patch."""
    write_video_config(out_dir, video_processor_type, processor_class=processor_class,
                       size={"shortest_edge": smallest, "longest_edge": largest}, patch_size=patch, merge_size=2,
                       temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def chat_template(image, turn="{role}: ", end="\n", assistant="assistant: "):
    """A chat template in a family's format: `image` is what the real template writes for an image part."""
    return ("{% for message in messages %}" + turn.format(role="{{ message['role'] }}")
            + "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image
            + "{% else %}{{ part['text'] }}{% endif %}{% endfor %}" + end
            + "{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}")


def token_ids(tokenizer, config_kwargs):
    """The special-token ids every text config wants, from the in-code tokenizer."""
    return dict(config_kwargs, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def image_processor_config_as_on_the_hub(out_dir, image_processor_type):
    """transformers 5 saves the image processor inside processor_config.json; checkpoints on the hub saved before
    it (Mistral-Small-3.1, SmolVLM2) have it in their own preprocessor_config.json, under the name of the
    torchvision class, which AutoImageProcessor replaces by its PIL twin when torchvision is absent."""
    saved = json.loads((out_dir / "processor_config.json").read_text())
    image_config = dict(saved.pop("image_processor"), image_processor_type=image_processor_type,
                        processor_class=saved["processor_class"])
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_config))
    (out_dir / "processor_config.json").write_text(json.dumps(saved))


def build_llava(out_dir):
    models.build_tiny(out_dir, chat_template=chat_template("<image>\n", "USER: ", " ", "ASSISTANT:"))


def build_llava_next(out_dir):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    tokenizer = tiny_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    # AnyRes: the image is tiled on the best of these grids (28 px tiles) plus one downscaled overview tile.
    pinpoints = [[28, 28], [28, 56], [56, 28]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_template("<image>\n", "[INST] ", " [/INST]", ""))
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
        text_config=LlamaConfig(**token_ids(tokenizer, TEXT)), image_grid_pinpoints=pinpoints,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    torch.manual_seed(0)
    models.save_checkpoint(LlavaNextForConditionalGeneration(config), processor, out_dir)


QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = chat_template("<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>{role}\n", "<|im_end|>\n",
                              "<|im_start|>assistant\n")


def build_qwen(out_dir, version):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = tiny_tokenizer(QWEN_TOKENS, extra_special_tokens={"image_token": "<|image_pad|>",
                                                                  "video_token": "<|video_pad|>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_TOKENS}
    # 14 px patches merged 2x2: an image of at most 56x56 px gives 1-4 image tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    prefix = "Qwen2VL" if version == "qwen2_vl" else "Qwen2_5_VL"
    processor_class = models.image_only_processor(getattr(transformers, f"{prefix}Processor"))
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    vision = dict(depth=1, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if version == "qwen2_vl":
        vision.update(embed_dim=32, mlp_ratio=2)
    else:  # Qwen2.5-VL's vision blocks are gated MLPs with their own `mlp.down_proj`, never neuron sites
        vision.update(intermediate_size=64, out_hidden_size=HIDDEN, fullatt_block_indexes=[0], window_size=56)
    # M-RoPE splits each head's rotary frequencies over (time, height, width): 2 + 3 + 3 = head_dim / 2.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=token_ids(tokenizer, dict(TEXT, rope_parameters=rope)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    models.save_checkpoint(getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor, out_dir)


IDEFICS3_TOKENS = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]


def build_idefics3(out_dir, version="idefics3"):
    """Idefics3 and the first SmolVLM checkpoints (model type idefics3, Idefics3Processor), or with
    version="smolvlm" SmolVLM2 (HuggingFaceTB/SmolVLM2-*, model type smolvlm): the same architecture, whose
    SmolVLMProcessor also takes video and needs num2words (requirements.txt). Laid out as that hub checkpoint is:
    processor_config.json naming SmolVLMProcessor, preprocessor_config.json the torchvision SmolVLMImageProcessor;
    a video processor config beside them too (the image-only load must not depend on its absence)."""
    import transformers
    prefix = "Idefics3" if version == "idefics3" else "SmolVLM"
    image_processor_class = getattr(importlib.import_module(
        f"transformers.models.{version}.image_processing_pil_{version}"), f"{prefix}ImageProcessorPil")
    tokenizer = tiny_tokenizer(IDEFICS3_TOKENS)
    # 56 px images, 14 px patches, pixel shuffle by 2: (56 / 14)^2 / 2^2 = 4 tokens; no splitting into tiles.
    image_processor = image_processor_class(size={"longest_edge": 56}, max_image_size={"longest_edge": 56},
                                            do_image_splitting=False)
    processor_class = getattr(transformers, f"{prefix}Processor")
    if version == "smolvlm":
        processor_class = models.image_only_processor(processor_class)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                chat_template=chat_template("<image>", "<|im_start|>{role}:", "<end_of_utterance>\n",
                                                            "Assistant:"))
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        text_config=transformers.LlamaConfig(**token_ids(tokenizer, TEXT)), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    models.save_checkpoint(getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor, out_dir)
    if version == "smolvlm":
        image_processor_config_as_on_the_hub(out_dir, "SmolVLMImageProcessor")
        write_video_config(out_dir, "SmolVLMVideoProcessor", processor_class="SmolVLMProcessor",
                           size={"longest_edge": 56}, max_image_size={"longest_edge": 56}, do_image_splitting=False)


def build_paligemma(out_dir):
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    tokenizer = tiny_tokenizer(["<image>"], extra_special_tokens={"image_token": "<image>"})
    # 28 px images, 14 px patches: 4 image tokens. No chat template, as in the real checkpoints.
    image_processor = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    image_processor.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc>/<seg> tokens
    config = PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
                           projection_dim=HIDDEN),
        text_config=GemmaConfig(**token_ids(tokenizer, dict(TEXT, head_dim=16))), projection_dim=HIDDEN,
        hidden_size=HIDDEN, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    config.text_config.vocab_size = config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    models.save_checkpoint(PaliGemmaForConditionalGeneration(config), processor, out_dir)


GEMMA3_TOKENS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]


def build_gemma3(out_dir):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    tokenizer = tiny_tokenizer(GEMMA3_TOKENS, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GEMMA3_TOKENS}
    # 28 px images, 14 px patches: 2x2 patches pooled to 4 soft tokens per image.
    image_processor = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                chat_template=chat_template("<start_of_image>", "<start_of_turn>{role}\n",
                                                            "<end_of_turn>\n", "<start_of_turn>model\n"))
    config = Gemma3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        text_config=token_ids(tokenizer, dict(TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)),
        mm_tokens_per_image=4, boi_token_id=ids["<start_of_image>"], eoi_token_id=ids["<end_of_image>"],
        image_token_id=ids["<image_soft_token>"])
    torch.manual_seed(0)
    models.save_checkpoint(Gemma3ForConditionalGeneration(config), processor, out_dir)


MLLAMA_TOKENS = ["<|image|>", "<|python_tag|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def build_mllama(out_dir):
    """Llama-3.2-Vision: the image reaches the language model only through cross-attention layers interleaved
    with the self-attention layers (here layer 1 of 2); the prompt keeps one <|image|> token."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    tokenizer = tiny_tokenizer(MLLAMA_TOKENS, extra_special_tokens={"image_token": "<|image|>"})
    # 28 px images in one 28 px tile, 14 px patches: 4 patches (+ CLS) that the cross-attention layers read.
    image_processor = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template(
        "<|image|>", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n"))
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, max_num_tiles=1,
                           intermediate_layers_indices=[0], vision_output_dim=64, supported_aspect_ratios=[[1, 1]]),
        text_config=token_ids(tokenizer, dict(TEXT, cross_attention_layers=[1])),
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    # The cross-attention layer's gates start at tanh(0) = 0 (no image, no MLP): open them, as training does.
    for layer in model.model.language_model.layers:
        for gate in (getattr(layer, "cross_attn_attn_gate", None), getattr(layer, "cross_attn_mlp_gate", None)):
            if gate is not None:
                torch.nn.init.constant_(gate, 1.0)
    models.save_checkpoint(model, processor, out_dir)


INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"]


def build_internvl(out_dir):
    """The Hugging Face-native InternVL3 (OpenGVLab/InternVL3-*-hf): InternViT + Qwen2, laid out as the hub
    checkpoint is, its video processor config included (the processor loads image-only without torchvision)."""
    import transformers
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    tokenizer = tiny_tokenizer(INTERNVL_TOKENS, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    # 56 px images (no tiling into patches), 14 px patches, pixel shuffle by 0.5: 16 / 4 = 4 image tokens.
    image_processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
    processor = models.image_only_processor(transformers.InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
        chat_template=chat_template("<IMG_CONTEXT>\n", "<|im_start|>{role}\n", "<|im_end|>\n",
                                    "<|im_start|>assistant\n"))
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        text_config=dict(token_ids(tokenizer, TEXT), model_type="qwen2"), image_seq_length=4,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
    torch.manual_seed(0)
    models.save_checkpoint(InternVLForConditionalGeneration(config), processor, out_dir)
    write_video_config(out_dir, "InternVLVideoProcessor", size={"height": 56, "width": 56})


def build_qwen3_vl(out_dir, moe=False):
    """Qwen3-VL: Qwen2-VL's processor and M-RoPE (interleaved), 16 px patches, and DeepStack (vision features
    also added to the first decoder layers' inputs); laid out as the hub checkpoint is, its video processor
    config included (the processor loads image-only without torchvision). moe: Qwen3-VL-MoE (Qwen3-VL-30B-A3B's
    family), the same with a sparse block of routed experts in every decoder layer."""
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig,
                              Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = tiny_tokenizer(QWEN_TOKENS, extra_special_tokens={"image_token": "<|image_pad|>",
                                                                  "video_token": "<|video_pad|>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_TOKENS}
    # 16 px patches merged 2x2: an image of at most 64x64 px gives 1-4 image tokens.
    pixels = {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
    image_processor = Qwen2VLImageProcessorPil(size=pixels, patch_size=16, merge_size=2, temporal_patch_size=2,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = models.image_only_processor(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                              chat_template=QWEN_TEMPLATE)
    # One vision block, whose output is also the one DeepStack level (added to decoder layer 0's input); its MLP
    # is `linear_fc1/linear_fc2`, never a neuron site.
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=HIDDEN, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = dict(TEXT, head_dim=16, rope_parameters=rope)
    if moe:
        text.update(MOE_TEXT, num_experts=N_EXPERTS, decoder_sparse_step=1, mlp_only_layers=[])
    config = (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(
        vision_config=vision, text_config=token_ids(tokenizer, text),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = (Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration)(config)
    if moe:
        with torch.no_grad():  # the router's weight is zeros at init: make tokens choose different experts
            for layer in model.model.language_model.layers:
                layer.mlp.gate.weight.normal_(0, 0.5)
    models.save_checkpoint(model, processor, out_dir)
    qwen_style_video_config(out_dir, "Qwen3VLVideoProcessor", "Qwen3VLProcessor", 16, 32 * 32, 64 * 64 * 2)


def build_llava_onevision(out_dir):
    """LLaVA-OneVision (llava-hf/llava-onevision-qwen2-*-hf): SigLIP + Qwen2, AnyRes tiles, whole SigLIP features
    ("full"); laid out as the hub checkpoint is, its video processor config included. Its processor needs
    `num_image_tokens` from processor_config.json (models.image_only_processor keeps it on reload)."""

    import transformers
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    tokenizer = tiny_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"],
                               extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    # 28 px tiles on the best of these grids plus one overview tile, 14 px patches: 4 tokens per tile, and a
    # newline token per row of the unpadded grid.
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                      image_grid_pinpoints=pinpoints)
    processor = models.image_only_processor(transformers.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=4,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=chat_template("<image>\n", "<|im_start|>{role} ", "<|im_end|>\n", "<|im_start|>assistant\n"))
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14),
        text_config=Qwen2Config(**token_ids(tokenizer, TEXT)), image_grid_pinpoints=pinpoints,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(0)
    models.save_checkpoint(LlavaOnevisionForConditionalGeneration(config), processor, out_dir)
    write_video_config(out_dir, "LlavaOnevisionVideoProcessor", processor_class="LlavaOnevisionProcessor",
                       size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


MISTRAL3_TOKENS = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]


def build_mistral3(out_dir):
    """Mistral-Small-3.1 (mistralai/Mistral-Small-3.1-24B-Instruct-2503): a Pixtral vision tower whose 2x2 patch
    merger feeds a Mistral decoder. Laid out as the hub checkpoint is: processor_config.json naming
    PixtralProcessor (which transformers refuses without torchvision: models.pixtral_processor_class) and
    preprocessor_config.json naming the torchvision PixtralImageProcessor (loaded as its PIL twin); the chat
    template in Mistral's format, with the image as [IMG] inside [INST] ... [/INST]."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
    tokenizer = tiny_tokenizer(MISTRAL3_TOKENS)
    # Images resized to at most 56 px on a side in multiples of 28 (14 px patches, merged 2x2): a 64x64 image is
    # 56x56, 2x2 image tokens, written [IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END].
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size={"height": 14, "width": 14})
    processor = models.pixtral_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, spatial_merge_size=2,
        chat_template="{{ bos_token }}" + chat_template("[IMG]", "[INST]", "[/INST]", ""))
    config = Mistral3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        text_config=MistralConfig(**token_ids(tokenizer, TEXT)), spatial_merge_size=2, vision_feature_layer=-1,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)
    torch.manual_seed(0)
    models.save_checkpoint(Mistral3ForConditionalGeneration(config), processor, out_dir)
    image_processor_config_as_on_the_hub(out_dir, "PixtralImageProcessor")




GLM_TOKENS = ["<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|video|>",
              "<|end_of_video|>", "<|user|>", "<|assistant|>", "[gMASK]", "<sop>"]


def build_glm4v_moe(out_dir):
    """GLM-4.5V's family: the first decoder layer is a dense MLP (first_k_dense_replace), the others have routed
    experts plus a shared expert that sees every token."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, Glm4vProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    tokenizer = tiny_tokenizer(GLM_TOKENS, extra_special_tokens={"image_token": "<|image|>",
                                                                 "video_token": "<|video|>"})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GLM_TOKENS}
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}, patch_size=14,
                                             merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                             image_std=[0.5] * 3)
    template = "[gMASK]<sop>" + chat_template("<|begin_of_image|><|image|><|end_of_image|>", "<|{role}|>\n", "",
                                              "<|assistant|>\n")
    processor = models.image_only_processor(Glm4vProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                            chat_template=template)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=HIDDEN, image_size=56)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
    text = token_ids(tokenizer, dict(TEXT, **MOE_TEXT, num_hidden_layers=3, head_dim=16, rope_parameters=rope,
                                     n_routed_experts=N_EXPERTS, n_shared_experts=1, first_k_dense_replace=1))
    config = Glm4vMoeConfig(
        vision_config=vision, text_config=text, image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    torch.manual_seed(0)
    model = Glm4vMoeForConditionalGeneration(config)
    with torch.no_grad():  # the router's weight and bias are zeros at init: make tokens choose different experts
        for layer in model.model.language_model.layers[1:]:
            layer.mlp.gate.weight.normal_(0, 0.5)
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    models.save_checkpoint(model, processor, out_dir)
    qwen_style_video_config(out_dir, "Glm4vVideoProcessor", "Glm4vProcessor", 14, 28 * 28, 56 * 56 * 2)


BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "qwen2_vl": lambda out_dir: build_qwen(out_dir, "qwen2_vl"),
    "qwen2_5_vl": lambda out_dir: build_qwen(out_dir, "qwen2_5_vl"),
    "qwen3_vl": build_qwen3_vl,
    "llava_onevision": build_llava_onevision,
    "idefics3": build_idefics3,   # also SmolVLM (v1) checkpoints
    "smolvlm": lambda out_dir: build_idefics3(out_dir, "smolvlm"),  # SmolVLM2
    "paligemma": build_paligemma,
    "gemma3": build_gemma3,
    "mllama": build_mllama,
    "internvl": build_internvl,
    "mistral3": build_mistral3,
    "qwen3_vl_moe": lambda out_dir: build_qwen3_vl(out_dir, moe=True),  # routed experts in every layer
    "glm4v_moe": build_glm4v_moe,        # a dense first layer, then routed + shared experts
}
MOE_FAMILIES = ("qwen3_vl_moe", "glm4v_moe")


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """(family name, checkpoint folder), built once per test session."""
    out_dir = tmp_path_factory.mktemp(request.param) / "checkpoint"
    BUILDERS[request.param](out_dir)
    return request.param, out_dir


ITEMS = [dict(id=str(i), text=t, task=task, image_path=None) for i, (t, task) in enumerate(
    [("the cat", "continue"), ("what is the weather like today", "answer"), ("a small red house", "continue")])]


def n_neurons(sites):
    return sum(site.in_features for _, site in sites)


def language_model_modules(model):
    return set(model.get_decoder().modules())


def test_sites_are_every_decoder_layer_and_never_the_vision_tower(family):
    name, path = family
    model, _, sites, meta = load_model(str(path))
    layers = model.get_decoder().layers
    assert sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in sites}) == list(range(len(layers)))
    assert [n for n, _ in sites] == sorted(n for n, _ in sites)  # in layer order
    if name in MOE_FAMILIES:  # routed and shared experts: tests/test_moe.py
        return
    assert [size for _, size in meta["sites"]] == [INTERMEDIATE] * LAYERS
    assert all(module in language_model_modules(model) for _, module in sites)
    # Qwen2.5-VL's vision blocks have `mlp.down_proj` too: the check above must have something to exclude.
    every_down_proj = [n for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    assert len(every_down_proj) > LAYERS if name == "qwen2_5_vl" else len(every_down_proj) == LAYERS
    if name == "mllama":  # a cross-attention layer's MLP is a neuron site too: post-fusion (neurons.neuron_sites)
        assert model.config.get_text_config().cross_attention_layers == [1]
        assert type(layers[1]).__name__ == "MllamaCrossAttentionDecoderLayer" and sites[1][1] is layers[1].mlp.down_proj


def test_fallback_prompt_places_the_image(family):
    """Without a chat template each family's fallback prompt expands to the same image tokens as the
    chat-template prompt, and the model runs on it."""
    _, path = family
    model, processor, _, _ = load_model(str(path))
    image_token = model.config.image_token_id
    counts = []
    for template in (processor.chat_template, None):
        processor.chat_template = template
        batch = encode(processor, ITEMS, "cpu")
        counts.append((batch["input_ids"] == image_token).sum(1))
        with torch.no_grad():
            assert torch.isfinite(model(**batch).logits).all()
    assert counts[0].min() > 0 and torch.equal(counts[0], counts[1])


# The image markers each family's processor writes around its placeholders (as the tokenizer spells them); a
# family missing here writes none. --positions text must pool none of them.
QWEN_MARKERS = {"<|vision_start|>", "<|vision_end|>"}
IMAGE_MARKERS = {"qwen2_vl": QWEN_MARKERS, "qwen2_5_vl": QWEN_MARKERS, "qwen3_vl": QWEN_MARKERS,
                 "qwen3_vl_moe": QWEN_MARKERS, "gemma3": {"<start_of_image>", "<end_of_image>"}}


def test_text_positions_hold_no_image_token_or_marker(family):
    """common.prompt_positions("text") on each family's real processor output: no placeholder and no marker of
    the image (common.image_token_ids) is a text position, every other real token is; `image` is the
    placeholders only. The markers checked are named per family (IMAGE_MARKERS) and must be in the prompt."""
    name, path = family
    model, processor, _, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    image_ids = common.image_token_ids(model, processor)
    placeholder = model.config.image_token_id
    text = common.prompt_positions(batch, "text", image_ids, placeholder)
    real, ids = batch["attention_mask"].bool(), batch["input_ids"]
    is_image_token = torch.isin(ids, torch.tensor(image_ids))
    assert torch.equal(text, real & ~is_image_token) and text.any(1).all()
    present = set(processor.tokenizer.convert_ids_to_tokens(ids[real & is_image_token].unique().tolist()))
    present.discard(processor.tokenizer.convert_ids_to_tokens(placeholder))
    assert IMAGE_MARKERS.get(name, set()) <= present, f"{name}: markers {IMAGE_MARKERS.get(name)} not found"
    assert torch.equal(common.prompt_positions(batch, "image", image_ids, placeholder), real & (ids == placeholder))
    assert torch.equal(common.prompt_positions(batch, "all", image_ids, placeholder), real)


def test_hooked_logits_equal_folded_weights(family):
    _, path = family
    model, processor, sites, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    alpha = torch.rand(n_neurons(sites), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(**batch).logits
        with suppress_neurons(sites, alpha):
            hooked = model(**batch).logits
        fold_alpha(sites, alpha)
        folded = model(**batch).logits
    assert not torch.allclose(base, hooked)
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-5)


def test_teacher_forced_continuation_equals_generation(family):
    """common.append_tokens: one forward pass over prompt + continuation gives the logits generate() had at
    each step, so per-token fields (Qwen's mm_token_type_ids, PaliGemma's and Gemma 3's token_type_ids)
    are extended the way the model's own generation extends them."""
    _, path = family
    model, processor, _, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, top_p=None, top_k=None, temperature=None)
        new = out.sequences[:, batch["input_ids"].shape[1]:]
        forced = model(**common.append_tokens(processor, batch, new, torch.ones_like(new))).logits
    torch.testing.assert_close(forced[:, -5:-1], torch.stack(out.logits, 1), rtol=1e-4, atol=1e-4)


def test_writer_pass_in_micro_batches_equals_the_whole_batch(family, capsys):
    """models.writer_pass cuts a processor batch by rows (per-row tensors; Qwen-VL's and GLM-4V's patches by
    image_grid_thw): one row at a time gives the whole batch's objective, writes and pooled activations. A
    family whose inputs it cannot cut runs whole and says so (none of these: all must be cut)."""
    _, path = family
    model, processor, sites, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    positions = batch["attention_mask"].bool()
    toxic_ids = torch.tensor([5, 17, 42])
    results = []
    for rows_per_pass in (len(ITEMS), 1):
        with record_neurons(sites) as recorder, neurons.record_writes(model, sites) as writes, torch.enable_grad():
            recorder.mask = positions
            objective, written = models.writer_pass(model, batch, positions[:, -4:], writes, "toxic-odds",
                                                    toxic_ids, activations=recorder, rows_per_pass=rows_per_pass)
            results.append((objective, written, recorder.pop()))
    assert "cannot cut" not in capsys.readouterr().out
    (objective, written, pooled), (objective_1, written_1, pooled_1) = results
    assert np.abs(written).max() > 0
    np.testing.assert_allclose(objective_1, objective, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written_1, written, rtol=1e-4, atol=1e-5 * np.abs(written).max())
    np.testing.assert_allclose(pooled_1, pooled, rtol=1e-4, atol=1e-5 * np.abs(pooled).max())


def test_bfloat16_hooks_run(family):
    _, path = family
    model, processor, sites, _ = load_model(str(path), dtype="bfloat16")
    batch = encode(processor, ITEMS, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), suppress_neurons(sites, torch.full((n_neurons(sites),), 0.5)):
        logits = model(**batch).logits
    with torch.no_grad(), record_neurons(sites) as recorder:
        recorder.mask = batch["attention_mask"].bool()
        model(**batch)
        pooled = recorder.pop()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert pooled.shape == (len(ITEMS), n_neurons(sites)) and np.isfinite(pooled).all()
    # nothing left behind: hooks removed, and fused experts (damped in place) restored bit for bit
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stages_and_export(family, tmp_path, monkeypatch):
    """01 (prompts) -> 02 -> 03 --export -> 04 on the checkpoint folder, as a user would run them; the
    exported checkpoint loads with plain transformers and gives the hooked model's logits."""
    from transformers import AutoModelForImageTextToText
    _, path = family
    data = write_items(tmp_path / "items.jsonl", n_per_label=3)
    export = tmp_path / "export"
    run_stage("01_collect.py", "--model", path, "--run", "r", "--data", data, "--mode", "prompts", cwd=tmp_path)
    run_stage("02_score.py", "--run", "r", cwd=tmp_path)
    run_stage("03_suppress.py", "--run", "r", "--export", export, cwd=tmp_path)
    # Alternating verdicts as the judge, so that selectivity and responses mode see both classes even when a
    # random model says the same thing to every prompt.
    monkeypatch.setattr(judges, "judge_toxicity", lambda texts: np.arange(len(texts)) % 2.0)
    run_stage("04_evaluate.py", "--model", path, "--run", "r", "--data", data, "--max-new-tokens", "4", cwd=tmp_path)
    # responses mode too: prompt + continuation in one forward (Qwen's mm_token_type_ids must grow with it)
    run_stage("01_collect.py", "--model", path, "--run", "resp", "--data", data, "--max-new-tokens", "3",
              cwd=tmp_path)
    _, activations_meta = load_npz(tmp_path / "runs/r/activations.npz", "")
    assert activations_meta["sites"] == load_model(str(path))[3]["sites"]
    assert (tmp_path / "runs/r/results.json").exists()

    tensors, suppression_meta = load_pt(tmp_path / "runs/r/suppression.pt", "")
    assert suppression_meta["n_changed"] > 0
    note = (export / "SGM_EXPORT.md").read_text()
    assert suppression_meta["fingerprint"] in note and f"{suppression_meta['n_changed']} of" in note
    model, processor, sites, _ = load_model(str(path))
    batch = encode(processor, ITEMS, "cpu")
    # The exported processor encodes as the checkpoint's (InternVL's image_seq_length survives the export).
    assert torch.equal(encode(models.load_processor(str(export)), ITEMS, "cpu")["input_ids"], batch["input_ids"])
    exported = AutoModelForImageTextToText.from_pretrained(export, dtype=torch.float32)
    assert not any(m._forward_pre_hooks for m in exported.modules())
    with torch.no_grad():
        with suppress_neurons(sites, tensors["alpha"]):
            hooked = model(**batch).logits
        torch.testing.assert_close(exported(**batch).logits, hooked, rtol=1e-5, atol=1e-5)


def test_video_processor_config_in_the_folder_loads_image_only(family):
    """A folder laid out as the hub checkpoint (video_preprocessor_config.json beside the image processor's):
    without torchvision AutoProcessor refuses it; models.load_processor gives the same processor class without
    its video processor, with the checkpoint's own processor settings (LLaVA-OneVision's num_image_tokens)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available
    _, path = family
    if not (path / "video_preprocessor_config.json").exists() or is_torchvision_available():
        return
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(path)
    processor = models.load_processor(str(path))
    assert not hasattr(processor, "video_processor") and processor.image_processor is not None
    saved = json.loads((path / "processor_config.json").read_text())
    assert all(getattr(processor, key) == value for key, value in saved.items() if key == "num_image_tokens")

def test_model_without_down_proj_is_refused_saying_how_to_add_it():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, bos_token_id=0,
                                       eos_token_id=0))
    with pytest.raises(common.UserError, match=r"in GPT2LMHeadModel: neurons.neuron_sites .*; add a rule"):
        neurons.neuron_sites(model)


def test_export_replaces_an_earlier_export_and_refuses_any_other_folder(tmp_path):
    data = write_items(tmp_path / "items.jsonl", n_per_label=3)
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=tmp_path)
    run_stage("02_score.py", "--run", "tiny", cwd=tmp_path)
    for _ in range(2):
        run_stage("03_suppress.py", "--run", "tiny", "--export", "export", cwd=tmp_path)
    # no temp folders left; the export's lock file stays (03 locks its target: sgm/artifacts.lock_folder)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".export.lock"]
    assert "SGM export of tiny" in (tmp_path / "export/SGM_EXPORT.md").read_text()
    (tmp_path / "mine").mkdir()
    with pytest.raises(common.UserError, match="is not an SGM export"):
        run_stage("03_suppress.py", "--run", "tiny", "--export", "mine", cwd=tmp_path)


def test_pixtral_processor_loads_without_torchvision(family, tmp_path):
    """Mistral-Small-3.1's folder names PixtralProcessor, which AutoProcessor refuses without torchvision;
    models.load_processor gives transformers' own class with the PIL image processor and the checkpoint's
    settings, and transformers' torchvision image processor module stays unimportable (nothing left in its place)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available
    name, path = family
    if name != "mistral3" or is_torchvision_available():
        return
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(path)
    processor = models.load_processor(str(path))
    assert type(processor).__module__ == "transformers.models.pixtral.processing_pixtral"
    assert type(processor.image_processor).__name__ == "PixtralImageProcessorPil"
    assert (processor.patch_size, processor.spatial_merge_size) == (14, 2)
    with pytest.raises(ImportError, match="torchvision"):
        importlib.import_module("transformers.models.pixtral.image_processing_pixtral")
    # The 64 px test image becomes 56 px: 2 rows of 2 image tokens, each row closed by a break, the last by the end.
    processor.chat_template = None
    ids = encode(processor, ITEMS[:1], "cpu")["input_ids"][0]
    assert processor.tokenizer.decode(ids).startswith("[IMG][IMG][IMG_BREAK][IMG][IMG][IMG_END]\n")
    # Images keep their aspect ratio: a wide and a tall one in one batch are 1x2 and 2x1 token grids.
    from PIL import Image
    items = []
    for i, size in enumerate([(64, 32), (30, 64)]):
        Image.new("RGB", size, (200, 30 * i, 30)).save(tmp_path / f"{i}.png")
        items.append(dict(ITEMS[i], image_path=str(tmp_path / f"{i}.png")))
    model, processor, _, _ = load_model(str(path))
    batch = encode(processor, items, "cpu")
    assert batch["image_sizes"].tolist() == [[28, 56], [56, 28]]
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [2, 2]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_missing_package_is_named_with_its_fix(family, monkeypatch):
    """SmolVLM2's processor refuses to construct without num2words (it spells out video frame counts); load_model
    names the package and `make venv` (requirements.txt pins it), not a damaged checkpoint."""
    name, path = family
    if name != "smolvlm":
        return
    monkeypatch.setattr("transformers.models.smolvlm.processing_smolvlm.num2words", None)
    with pytest.raises(common.UserError, match=r"num2words.*make venv"):
        load_model(str(path))


def test_llama4_is_refused_naming_torchvision(tmp_path):
    """Llama 4 is not supported (docs/MODELS.md): transformers has only a torchvision image processor for it. A folder laid
    out as the hub's (processor files naming Llama4Processor and Llama4ImageProcessor) gets one line saying so."""
    from transformers import Llama4Config
    from transformers.utils import is_torchvision_available
    if is_torchvision_available():
        pytest.skip("torchvision is installed: Llama 4's image processor loads")
    tokenizer = tiny_tokenizer(["<|image|>", "<|image_start|>", "<|image_end|>"])
    tokenizer.save_pretrained(tmp_path)
    Llama4Config(text_config=token_ids(tokenizer, dict(TEXT, head_dim=16, num_local_experts=2)),
                 vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor"}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "Llama4Processor"}))
    with pytest.raises(common.UserError, match="needs torchvision, which is not installed on purpose"):
        load_model(str(tmp_path))
