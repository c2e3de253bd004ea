"""Generated text never contains an image token (common.image_token_ids, common.generate). A Qwen2-VL
checkpoint once wrote its <|image_pad|> into a continuation, and 01's responses mode then fed prompt +
continuation back with one image placeholder more than it had images ("Image features and image tokens do not
match"). Here the LM head is pushed towards the image tokens, so an unguarded generate() writes them."""
import numpy as np
import pytest
from conftest import write_items
from test_families import BUILDERS, ITEMS
from test_pipeline import run_stage

import common
from common import generate, image_token_ids
from sgm import artifacts
from sgm import judges
from sgm import models
from sgm.models import load_model


@pytest.fixture(scope="module", params=["qwen2_vl", "llava"])
def checkpoint(request, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param) / "checkpoint"
    BUILDERS[request.param](out_dir)
    return request.param, out_dir


def push_towards(model, token_ids):
    """A forward hook on the LM head that makes `token_ids` the likeliest next tokens everywhere."""
    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., token_ids] += 1e4
        return logits
    return model.get_output_embeddings().register_forward_hook(hook)


def test_image_token_ids_are_the_placeholders_and_markers_only(checkpoint):
    name, path = checkpoint
    model, processor, _, _ = load_model(str(path))
    tokens = processor.tokenizer.convert_ids_to_tokens(image_token_ids(model, processor))
    expected = {"qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                "llava": ["<image>"]}[name]
    assert tokens == expected


def test_generation_never_writes_an_image_token(checkpoint):
    _, path = checkpoint
    model, processor, _, _ = load_model(str(path))
    never = image_token_ids(model, processor)
    push_towards(model, never)
    batch = common.encode(processor, ITEMS, "cpu")
    unguarded = model.generate(**batch, max_new_tokens=4, do_sample=False, top_p=None, top_k=None,
                               temperature=None, pad_token_id=processor.tokenizer.pad_token_id)
    assert np.isin(unguarded[:, batch["input_ids"].shape[1]:].numpy(), never).all()  # the push works
    _, tokens = generate(model, processor, ITEMS, max_new_tokens=4, batch_size=2, desc=None)
    _, sampled = generate(model, processor, ITEMS, max_new_tokens=4, batch_size=2, desc=None, top_k=5)
    assert all(ids and not set(ids) & set(never) for ids in tokens + sampled)


def test_responses_mode_runs_when_the_model_prefers_image_tokens(checkpoint, tmp_path, monkeypatch):
    """01 --mode responses on a model pushed towards its image tokens: before the fix, Qwen2-VL's forward of
    prompt + continuation failed with one image placeholder too many."""
    _, path = checkpoint

    def load_pushed(*args, **kwargs):
        model, processor, sites, meta = load_model(*args, **kwargs)
        push_towards(model, image_token_ids(model, processor))
        return model, processor, sites, meta
    monkeypatch.setattr(models, "load_model", load_pushed)
    monkeypatch.setattr(judges, "judge_toxicity", lambda texts: np.arange(len(texts)) % 2.0)
    data = write_items(tmp_path / "items.jsonl", n_per_label=2)
    run_stage("01_collect.py", "--model", path, "--run", "r", "--data", data, "--max-new-tokens", "3", cwd=tmp_path)
    arrays, _ = artifacts.load_npz(tmp_path / "runs/r/activations.npz", "")
    assert len(arrays["continuations"]) == 4


def test_a_chat_template_that_writes_the_bos_gets_no_second_one(tmp_path):
    """A tokenizer that adds BOS itself, with a chat template that also writes it (Gemma 3, Mistral): one BOS,
    as transformers' apply_chat_template(tokenize=True) gives; without a BOS in the template, the tokenizer's."""
    from tokenizers.processors import TemplateProcessing
    for template, expected in [("{{ bos_token }}", 1), ("", 1)]:
        models.build_tiny(tmp_path / f"t{len(template)}", chat_template=template + "{% for m in messages %}USER: "
                          "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}"
                          "{% endif %}{% endfor %}{% endfor %} ASSISTANT:")
        _, processor, _, _ = load_model(str(tmp_path / f"t{len(template)}"))
        tokenizer = processor.tokenizer
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)])
        ids = common.encode(processor, ITEMS[:1], "cpu")["input_ids"][0].tolist()
        assert ids.count(tokenizer.bos_token_id) == expected and ids[0] == tokenizer.bos_token_id
