"""The expert browser: one offline HTML page per run that shows, for the top experts, what each one reads, what it
writes and what damping did -> runs/<run>/experts.html

    python -m tools.browse --run demo                  # what `make browse` runs (after `make all`)
    python -m tools.browse --run tiny --experts 20     # the top 20 only

Open the page by double-click: it is one file, its data embedded as JSON, its script and styles written here (no
CDN, no server, no network; a Content-Security-Policy in the page refuses every request). `experts.html#L12.N345`
opens one expert (`#L3.E5.N17`: neuron 17 of routed expert 5 in layer 3; `#L3.shared.N17`: a mixture-of-experts
layer's shared expert); an expert not on the page says so. For the top K experts by the score 03_suppress.py
damped by (activation AUROC, or the writer score):
  index       rank, layer and neuron, AUROC, p, q, the writer's d and t (when 01 ran --writer), alpha; sortable;
              beside the count, how many neurons the same rule finds under shuffled labels (02's null table).
  scorecard   those values, the calibration rows, model, run, calibration mode.
  histogram   the pooled activation on toxic vs clean calibration rows (activations.npz).
  reads       its top calibration rows, rows at its 75/50/25% quantiles and its top clean rows, each a window of
              tokens around the row's largest activation, every token coloured by the neuron's activation (red
              positive, blue negative: gated activations are signed). activations.npz keeps pooled values only, so
              the chosen rows (their union over all experts) are run through the model once more, built as
              01_collect.py built them, with a hook that keeps the K neurons' value at every token; the page
              states how closely those values, pooled again, reproduce activations.npz.
  writes      the tokens its down_proj column promotes and suppresses directly: the column times the final norm's
              gain (its scale per coordinate), through the unembedding (logits per unit of activation, before any
              softcap); the words the judge flags on their own (the writer objective's vocabulary) are marked.
  damping     alpha and the mean pooled activation on toxic and clean rows, before and after (after = alpha x
              before: the factor the damping hook applies to this neuron, with every other neuron held fixed).
  co-firing   the other listed experts whose pooled activations correlate most with it over the calibration rows.
  answers     results-answers.jsonl: base vs damped (sgm) answers with the judge's labels, filterable to
              toxic -> clean flips and to regressions (when 04_evaluate.py has run).
Tokens are shown readable (a leading space as is, a newline as ⏎, control bytes as ␆, a piece that is not whole
UTF-8 as its raw form) and always as text, never as markup.
"""
import base64
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from common import (append_tokens, batches, encode, fail, image_token_ids, input_device, load_items, parse_overrides,
                    prompt_positions, run_name)
from sgm.artifacts import check_set, load_npz, load_pt, write_text
from sgm.judges import toxic_vocabulary
from sgm.models import load_model
from sgm.neurons import EXPERTISE_SCORES, FusedExperts, decoder_layer
from sgm.report import BLIND_DEMOS

# ---- defaults (override with --key value) -------------------------------------------------------------------
defaults = dict(
    run="demo",          # reads runs/<run>/activations.npz, expertise.npz, suppression.pt (+ results-answers.jsonl)
    experts=100,         # K: the top experts by the score 03 damped by
    suppression="suppression.pt",  # which 03 output inside runs/<run>/ (03 --out)
    answers="results-answers.jsonl",  # which 04 output inside runs/<run>/ (04 --report); missing: no answers
    top_rows=6,          # reads: an expert's highest calibration rows ...
    quantiles="0.75,0.5,0.25",  # ... the rows at these quantiles of its pooled activation ...
    clean_rows=2,        # ... and its highest clean rows
    window=24,           # tokens shown per row, around its largest activation (windows, not whole rows: size)
    promoted=15,         # writes: this many promoted and suppressed tokens
    cofiring=6,          # co-firing: this many most correlated other experts
    bins=30,             # histogram bins
    batch_size=64,       # rows per forward pass of the rerun (as 01's)
    dtype="",            # the model's dtype for the rerun ("" = the one 01_collect.py used)
    device="cpu",        # cpu | cuda | auto
    out="experts.html",  # written inside runs/<run>/
)


def finite(value):
    """A float for the page's JSON, None for NaN or inf (which JSON cannot hold)."""
    return float(value) if math.isfinite(value) else None


def significant(value, digits=4):
    """A number rounded to `digits` significant digits (the page stores 3-4: size)."""
    return 0.0 if value == 0 or not math.isfinite(value) else float(f"{value:.{digits}g}")


def readable(tokenizer, ids):
    """{id: (shown text, raw piece)}: the token as text a reader can see (a newline as ⏎, a tab as ⇥, other
    control characters as their Control Pictures symbol, e.g. \\x06 -> ␆) or, when it is not whole UTF-8 on its
    own (one byte of a character), its raw piece (`<0xE2>`, `âĢ`)."""
    ids = sorted(set(int(i) for i in ids))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    shown = {}
    for token_id, piece in zip(ids, pieces):
        text = tokenizer.decode([token_id])
        if "\ufffd" in text or text == "":
            text = str(piece)
        text = "".join("⏎" if c == "\n" else "⇥" if c == "\t" else chr(0x2400 + ord(c)) if ord(c) < 32
                       else "␡" if c == "\x7f" else c for c in text)
        shown[token_id] = (text, str(piece))
    return shown


def expert_names(sites, flat):
    """Each flat neuron index -> (name like L12.N345, layer, expert or None, index in its unit). A routed expert's
    neuron is L<layer>.E<expert>.N<index>; a shared expert's, beside routed ones in its layer, L<layer>.shared.N<index>."""
    starts = np.cumsum([0] + [site.in_features for _, site in sites])
    layers = [decoder_layer(name) for name, _ in sites]
    names = []
    for index in flat:
        site_index = int(np.searchsorted(starts, index, side="right") - 1)
        site, local, layer = sites[site_index][1], int(index - starts[site_index]), layers[site_index]
        if isinstance(site, FusedExperts):
            expert, local = divmod(local, site.width)
            names.append((f"L{layer}.E{expert}.N{local}", layer, expert, local))
        else:
            shared = ".shared" if layers.count(layer) > 1 else ""
            names.append((f"L{layer}{shared}.N{local}", layer, None, local))
    return names


class TokenRecorder:
    """The chosen neurons' activation at every position (what neurons.NeuronRecorder pools): batch x positions x
    chosen. A down_proj Linear gives its input's columns; routed experts (neurons.FusedExperts) are recomputed
    from the experts module's inputs on the tokens routed to each expert, 0 on the others, as 01 records them."""

    def __init__(self, sites, neurons):
        starts = np.cumsum([0] + [site.in_features for _, site in sites])
        self.chosen = {}  # site index -> (columns of the output, indices in the site)
        for column, index in enumerate(neurons):
            site = int(np.searchsorted(starts, index, side="right") - 1)
            self.chosen.setdefault(site, ([], []))
            self.chosen[site][0].append(column)
            self.chosen[site][1].append(int(index - starts[site]))
        self.n, self.shape, self.values = len(neurons), None, None

    def linear_hook(self, index, args):
        columns, local = self.chosen[index]
        self.values[..., columns] = args[0][..., local].float().cpu()

    def experts_hook(self, index, site, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        columns, local = (torch.tensor(v) for v in self.chosen[index])
        flat = torch.zeros(hidden.shape[0], len(columns))
        for expert, tokens, activations in site.routed(hidden, top_k_index):
            here = (local // site.width) == expert
            if here.any():
                flat[tokens.cpu()[:, None], here.nonzero().squeeze(1)[None, :]] = \
                    activations[:, local[here] % site.width].float().cpu()
        self.values[..., columns] = flat.reshape(*self.shape, len(columns))

    def start(self, shape):
        self.shape, self.values = tuple(shape), torch.zeros(*shape, self.n)


def hook_tokens(sites, recorder):
    handles = []
    for index, (_, site) in enumerate(sites):
        if index not in recorder.chosen:
            continue
        if isinstance(site, FusedExperts):
            handles.append(site.experts.register_forward_pre_hook(
                lambda module, args, kwargs, index=index, site=site: recorder.experts_hook(index, site, args, kwargs),
                with_kwargs=True))
        else:
            handles.append(site.register_forward_pre_hook(
                lambda module, args, index=index: recorder.linear_hook(index, args)))
    return handles


@torch.no_grad()
def rerun_rows(model, processor, sites, rows, items_by_id, arrays, settings, neurons, batch_size):
    """Each calibration row in `rows`, built as 01_collect.py built it (the item's prompt; in responses mode
    followed by its continuation), through the model once with TokenRecorder on `neurons`. Returns {row: dict(ids,
    values (positions x neurons), pooled (bool: the positions 01 pooled), shown (bool: text, not the image))} over
    the row's real positions, and whether continuations had to be tokenized again from their text."""
    image_ids = image_token_ids(model, processor)
    placeholder = model.config.image_token_id
    tokenizer = processor.tokenizer
    retokenized = settings["mode"] == "responses" and "continuation_ids" not in arrays
    recorder = TokenRecorder(sites, neurons)
    handles = hook_tokens(sites, recorder)
    out = {}
    try:
        row_items = [dict(items_by_id[str(arrays["item_ids"][row])], _row=int(row)) for row in rows]
        for _, chunk in batches(row_items, batch_size, "rerun the chosen rows"):
            batch = encode(processor, chunk, input_device(model))
            if settings["mode"] == "prompts":
                inputs = batch
                pooled = prompt_positions(batch, settings["positions"], image_ids, placeholder)
            else:
                if retokenized:  # 01 without --writer keeps the continuation's text only
                    texts = [str(arrays["continuations"][item["_row"]]) for item in chunk]
                    new = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
                else:
                    new = [[int(i) for i in arrays["continuation_ids"][item["_row"]] if i >= 0] for item in chunk]
                width = max(1, max(len(ids) for ids in new))
                ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.bool)
                for i, row_ids in enumerate(new):
                    ids[i, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
                    mask[i, :len(row_ids)] = True
                inputs = append_tokens(processor, batch, ids, mask)
                prompt_mask = batch["attention_mask"].bool()
                if settings["positions"] == "continuation":
                    pooled = torch.cat([torch.zeros_like(prompt_mask), mask.to(prompt_mask.device)], 1)
                else:
                    text = prompt_positions(batch, "text", image_ids, placeholder)
                    pooled = torch.cat([text, torch.zeros_like(mask).to(text.device)], 1)
            recorder.start(inputs["input_ids"].shape)
            model.base_model(**inputs, use_cache=False)  # no LM head: the neurons are all it needs
            real = inputs["attention_mask"].bool().cpu()
            shown = real & ~torch.isin(inputs["input_ids"].cpu(), torch.as_tensor(image_ids + [placeholder]))
            if settings["positions"] == "image":
                shown = real
            for i, item in enumerate(chunk):
                keep = real[i]
                out[item["_row"]] = dict(ids=inputs["input_ids"][i][keep].cpu().numpy(),
                                         values=recorder.values[i][keep].cpu().numpy(),
                                         pooled=pooled[i].cpu()[keep].numpy(), shown=shown[i][keep].numpy())
    finally:
        for handle in handles:
            handle.remove()
    return out, retokenized


def pick_rows(values, labels, n_top, quantiles, n_clean, rerun):
    """[(row, why)]: the n_top highest rows, a row at each quantile, n_clean of the highest clean rows; no repeats.
    Each row costs a forward pass, so where a choice is free it takes a row already in `rerun` (the rows chosen so
    far, for any expert; updated here): a quantile row among the rows within 5 percentile ranks of the quantile
    (else the nearest), a clean row among the 5 highest clean rows (else the highest). On the demo this halves the
    rows to rerun (165 instead of 296 for K = 100)."""
    order = np.argsort(-values, kind="stable")
    picked = [(int(row), "top") for row in order[:n_top]]
    taken = {row for row, _ in picked}
    rank = np.empty(values.size)
    rank[np.argsort(values, kind="stable")] = np.arange(values.size) / max(values.size - 1, 1)
    for q in quantiles:
        near = [int(row) for row in np.argsort(np.abs(rank - q), kind="stable") if int(row) not in taken]
        if near:
            band = [row for row in near if abs(rank[row] - q) <= 0.05]
            row = next((row for row in band if row in rerun), near[0])
            picked.append((row, f"{q * 100:g}% quantile"))
            taken.add(row)
    clean = [int(row) for row in order if labels[row] == 0 and int(row) not in taken]
    preferred = [row for row in clean[:max(5, n_clean)] if row in rerun]
    chosen = (preferred + [row for row in clean if row not in preferred])[:n_clean]
    picked += [(row, "top clean") for row in sorted(chosen, key=clean.index)]
    rerun.update(row for row, _ in picked)
    return picked


def snippet(record, column, window, pooling):
    """A window of `window` shown tokens around the row's largest activation (among its pooled positions):
    (ids, activations, indices in the window of tokens 01 did not pool, index of the maximum, pooled again)."""
    values, pooled, shown = record["values"][:, column], record["pooled"], record["shown"]
    if not pooled.any():
        return None
    again = float(values[pooled].mean() if pooling == "mean" else values[pooled].max())
    at = int(np.flatnonzero(pooled)[np.argmax(values[pooled])])
    positions = np.flatnonzero(shown | pooled)
    centre = int(np.searchsorted(positions, at))
    before = window * 2 // 3
    start = max(0, min(centre - before, len(positions) - window))
    positions = positions[start:start + window]
    return (record["ids"][positions].tolist(), [significant(float(v), 3) for v in values[positions]],
            [i for i, p in enumerate(positions) if not pooled[p]], int(np.flatnonzero(positions == at)[0]), again)


@torch.no_grad()
def direct_writes(model, sites, neurons, n):
    """Per neuron: the ids and values of the n tokens its down_proj column promotes most and suppresses most,
    through the final norm's gain and the unembedding: logits = W_U (g * column). The norm divides the residual by
    its RMS, a positive number shared by every token, so g * column decides the order. g is read by running the
    norm on a vector of ones (RMSNorm: its weight, Gemma's 1 + weight, over sqrt(1 + eps))."""
    norm = getattr(model.get_decoder(), "norm", None)
    if not isinstance(norm, torch.nn.Module) or getattr(norm, "bias", None) is not None:
        fail(f"cannot read the final norm's gain of {type(model).__name__}: tools/browse.py expects an RMS norm at "
             "model.get_decoder().norm; add a rule there for this family")
    unembedding = model.get_output_embeddings().weight
    gain = norm(torch.ones(1, unembedding.shape[1], dtype=unembedding.dtype, device=unembedding.device))[0]
    starts = np.cumsum([0] + [site.in_features for _, site in sites])
    columns = []
    for index in neurons:
        site_index = int(np.searchsorted(starts, index, side="right") - 1)
        site, local = sites[site_index][1], int(index - starts[site_index])
        if isinstance(site, FusedExperts):
            columns.append(site.columns()[local // site.width, local % site.width])
        else:
            columns.append(site.weight[:, local])
    logits = (torch.stack(columns).to(unembedding.device, torch.float32) * gain.float()) @ unembedding.float().T
    up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
    return [dict(up=[[int(i), significant(float(v))] for i, v in zip(up.indices[k], up.values[k])],
                 down=[[int(i), significant(float(v))] for i, v in zip(down.indices[k], down.values[k])])
            for k in range(len(neurons))]


def read_answers(path, threshold):
    """results-answers.jsonl -> base vs damped answers per item (None when 04 has not run)."""
    if not path.exists():
        return None
    report = path.with_name(path.name.removesuffix("-answers.jsonl") + ".json")
    try:
        check_set(report)  # the answers and their report are one set (04 writes them behind a manifest)
    except ValueError as e:
        fail(f"{path}: {e}: rerun 04_evaluate.py for this run")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [row for row in rows if "expected" not in row]  # the visual probe's rows have no judge label
    methods = list(dict.fromkeys(row["method"] for row in rows))
    damped = "sgm" if "sgm" in methods else next((m for m in methods if m != "base"), None)
    if "base" not in methods or damped is None:
        return None
    by_item = {}
    for row in rows:
        if row["method"] in ("base", damped):
            by_item.setdefault(row["id"], dict(id=row["id"], condition=row["condition"], label=row["label"]))[
                row["method"]] = [row["answer"], significant(row["toxicity"], 3)]
    return dict(damped=damped, threshold=threshold,
                rows=[row for row in by_item.values() if "base" in row and damped in row])


# ---- the page: embedded JSON, then plain JS that builds every element with textContent -------------------------
STYLE = """
*{box-sizing:border-box}body{font:13px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;
background:#fff}header{padding:10px 16px;border-bottom:1px solid #d0d7de;background:#f6f8fa}h1{font-size:17px;margin:0}
h2{font-size:14px;margin:14px 0 6px}.sub{color:#57606a;margin-top:3px}main{display:flex;gap:0;height:calc(100vh - 70px)}
#indexpane{width:44%;overflow:auto;border-right:1px solid #d0d7de}#detail{flex:1;overflow:auto;padding:4px 16px 16px}
table{border-collapse:collapse;width:100%}th,td{padding:2px 6px;text-align:right;white-space:nowrap}
th{position:sticky;top:0;background:#eaeef2;cursor:pointer;user-select:none}td.name,th.name{text-align:left}
#index tbody tr{cursor:pointer}#index tbody tr:hover{background:#f3f4f6}#index tbody tr.sel{background:#ddf4ff}
.damped{color:#b42318}.card{display:grid;grid-template-columns:max-content 1fr;gap:1px 12px}.card dt{color:#57606a}
.card dd{margin:0}.snip{margin:3px 0;padding:3px 4px;border:1px solid #eaeef2;border-radius:4px}
.meta{color:#57606a;font-size:12px}.tok{white-space:pre;display:inline-block;font-family:ui-monospace,Menlo,Consolas,monospace;
font-size:12px;border-radius:2px;padding:0 1px}.tok.ctx{color:#8c959f}.tok.max{outline:1px solid #1f2328}
.cols{display:flex;gap:32px}.cols>div{flex:0 1 300px}.wl{list-style:none;padding:0;margin:0}.wl li{display:flex;gap:6px}
.wl .v{color:#57606a;margin-left:auto}.flag{color:#b42318;font-weight:600}.msg{padding:12px;background:#fff8c5;
border:1px solid #d4a72c;border-radius:4px;margin-top:12px}#answers{padding:4px 16px 24px;border-top:1px solid #d0d7de}
#answers td{white-space:normal;text-align:left;vertical-align:top}#answers .tok{white-space:pre-wrap;display:inline}#damping td:first-child,#damping th:first-child{text-align:left}.toxic{color:#b42318}.clean{color:#1a7f37}
button{margin-right:6px}button.on{background:#0969da;color:#fff;border:1px solid #0969da}a{color:#0969da}
"""

SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
function el(tag, attrs, ...kids) {  // every text goes in as a text node: data never becomes markup
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) e.append(kid);
  return e;
}
const byName = new Map(D.experts.map((x, i) => [x.name, i]));
const tok = id => D.tokens[String(id)] || ["?" + id, "?"];
function colour(v, scale) {  // diverging: red positive, blue negative, white at 0
  const a = Math.min(1, Math.abs(v) / (scale || 1));
  return v >= 0 ? `rgba(220,38,38,${a.toFixed(3)})` : `rgba(37,99,235,${a.toFixed(3)})`;
}
function token(id, extra) {
  const [shown, raw] = tok(id);
  const s = el("span", {class: "tok", "data-id": String(id), text: shown});
  s.title = `token ${id} ${JSON.stringify(raw)}` + (extra || "");
  return s;
}
// ---- header
const head = document.getElementById("head");
head.append(el("h1", {text: `Toxic experts of run ${D.run}: the top ${D.experts.length} of ${D.n_neurons.toLocaleString("en")} neurons by ${D.score_label}`}));
head.append(el("div", {class: "sub", text: D.summary}));
head.append(el("div", {class: "sub", text: D.chance}));
// ---- index
const cols = [["rank", "rank"], ["name", "layer.neuron"], ["auroc", "AUROC"], ["p", "p"], ["q", "q"]]
  .concat(D.has_writer ? [["d", "writer d"], ["t", "writer t"]] : []).concat([["alpha", "alpha"], ["damped", "damped"]]);
const table = document.getElementById("index");
const hr = el("tr");
cols.forEach(([key, label]) => {
  const th = el("th", {class: key === "name" ? "name" : "", "data-key": key, text: label});
  th.addEventListener("click", () => sortBy(key));
  hr.append(th);
});
table.append(el("thead", {}, hr));
const body = el("tbody");
table.append(body);
const rowOf = new Map();
D.experts.forEach((x, i) => {
  const tr = el("tr", {"data-name": x.name});
  cols.forEach(([key]) => {
    const text = key === "rank" ? String(x.rank) : key === "name" ? x.name : key === "damped" ? (x.damped ? "yes" : "no") : x.f[key];
    tr.append(el("td", {class: key + (key === "name" ? " name" : "") + (key === "damped" && x.damped ? " damped" : ""), text}));
  });
  tr.addEventListener("click", () => { location.hash = x.name; });
  body.append(tr);
  rowOf.set(x.name, tr);
});
let sorted = {key: "rank", down: false};
function sortBy(key) {
  sorted = {key, down: sorted.key === key ? !sorted.down : key !== "rank" && key !== "name"};
  const value = x => key === "name" ? x.name : key === "damped" ? (x.damped ? 1 : 0) : key === "rank" ? x.rank : x.v[key];
  const order = D.experts.slice().sort((a, b) => {
    const u = value(a), w = value(b);
    return (u < w ? -1 : u > w ? 1 : a.rank - b.rank) * (sorted.down ? -1 : 1);
  });
  order.forEach(x => body.append(rowOf.get(x.name)));
}
// ---- one expert
function histogram(x) {
  const W = 420, H = 120, P = 22, h = x.hist, n = h.toxic.length;
  const tn = h.toxic.reduce((a, b) => a + b, 0) || 1, cn = h.clean.reduce((a, b) => a + b, 0) || 1;
  const top = Math.max(...h.toxic.map(c => c / tn), ...h.clean.map(c => c / cn)) || 1;
  const ns = "http://www.w3.org/2000/svg", svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + P); svg.setAttribute("role", "img");
  [["clean", cn, "#2563eb"], ["toxic", tn, "#dc2626"]].forEach(([key, total, fill]) => {
    h[key].forEach((c, i) => {
      const r = document.createElementNS(ns, "rect"), bh = (c / total) / top * H;
      r.setAttribute("x", (i * W / n).toFixed(1)); r.setAttribute("width", (W / n - 1).toFixed(1));
      r.setAttribute("y", (H - bh).toFixed(1)); r.setAttribute("height", bh.toFixed(1));
      r.setAttribute("fill", fill); r.setAttribute("fill-opacity", "0.45");
      const t = document.createElementNS(ns, "title"); t.textContent = `${key}: ${c} rows`; r.append(t);
      svg.append(r);
    });
  });
  [[0, h.lo, "start"], [W, h.hi, "end"]].forEach(([xx, v, anchor]) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", xx); t.setAttribute("y", H + 15); t.setAttribute("text-anchor", anchor);
    t.setAttribute("font-size", "11"); t.textContent = String(v); svg.append(t);
  });
  return el("div", {}, svg, el("div", {class: "meta", text: `pooled activation over ${tn} toxic (red) and ${cn} clean (blue) calibration rows; bars are each class's share of its rows`}));
}
function show(name) {
  const detail = document.getElementById("detail");
  detail.replaceChildren();
  rowOf.forEach(tr => tr.classList.remove("sel"));
  const i = byName.get(name);
  if (i === undefined) {
    detail.append(el("div", {class: "msg", id: "unknown", text: `No expert "${name}" on this page: it lists the top ${D.experts.length} experts of run ${D.run} by ${D.score_label}. Names look like ${D.experts[0].name}.`}));
    return;
  }
  const x = D.experts[i];
  rowOf.get(name).classList.add("sel");
  detail.append(el("h2", {id: "title", text: `#${x.rank} ${x.name}` + (x.damped ? " (damped)" : " (not damped)")}));
  const card = el("dl", {class: "card", id: "scorecard"});
  x.card.forEach(([k, v]) => { card.append(el("dt", {text: k}), el("dd", {text: v})); });
  detail.append(card);
  detail.append(el("h2", {text: "Toxic vs clean: its pooled activation"}), histogram(x));
  detail.append(el("h2", {text: "What it reads"}),
    el("div", {class: "meta", text: `Each row: a window of ${D.window} tokens around its largest activation (outlined); red = positive, blue = negative, full colour = ${x.scale} (its largest |activation| shown); grey tokens were not pooled by 01. ${D.rerun_note}`}));
  const reads = el("div", {id: "reads"});
  x.reads.forEach(r => {
    const line = el("div", {class: "snip", "data-row": String(r.row)});
    line.append(el("div", {class: "meta", text: `${r.why} · row ${r.row} · ${r.item}${r.sample ? " sample " + r.sample : ""} · ${r.label} · pooled ${r.pooled}`}));
    const toks = el("div");
    const ctx = new Set(r.ctx);
    r.ids.forEach((id, j) => {
      const s = token(id, ` activation ${r.acts[j]}`);
      s.style.backgroundColor = colour(r.acts[j], x.scale);
      if (ctx.has(j)) s.classList.add("ctx");
      if (j === r.max) s.classList.add("max");
      toks.append(s);
    });
    line.append(toks);
    reads.append(line);
  });
  detail.append(reads);
  detail.append(el("h2", {text: "What it writes"}),
    el("div", {class: "meta", text: "Logit change per unit of activation through the final norm's gain and the unembedding (before any softcap). ⚑ = a word the judge flags on its own (the writer objective's vocabulary)."}));
  const cw = el("div", {class: "cols"});
  [["up", "promotes"], ["down", "suppresses"]].forEach(([key, label]) => {
    const list = el("ol", {class: "wl", id: key === "up" ? "promoted" : "suppressed"});
    x.writes[key].forEach(([id, v]) => {
      const flagged = D.flagged.includes(id);
      const li = el("li", {}, token(id), el("span", {class: "flag", text: flagged ? "⚑" : ""}), el("span", {class: "v", text: v.toFixed ? String(v) : v}));
      if (flagged) li.classList.add("flagged");
      list.append(li);
    });
    cw.append(el("div", {}, el("div", {class: "meta", text: label}), list));
  });
  detail.append(cw);
  detail.append(el("h2", {text: "Damping"}));
  const dt = el("table", {id: "damping"});
  dt.append(el("tr", {}, el("th", {text: "alpha " + x.f.alpha}), el("th", {text: "before"}), el("th", {text: "after (alpha × before)"})));
  [["toxic rows", "toxic"], ["clean rows", "clean"]].forEach(([label, key]) => {
    dt.append(el("tr", {}, el("td", {text: label}), el("td", {text: x.damping[key][0]}), el("td", {text: x.damping[key][1]})));
  });
  detail.append(dt, el("div", {class: "meta", text: "Mean pooled activation over the calibration rows. After = what the damping hook passes on from this neuron, every other neuron held fixed."}));
  detail.append(el("h2", {text: "Co-firing experts"}),
    el("div", {class: "meta", text: "The listed experts whose pooled activation correlates most with this one over the calibration rows (Pearson r)."}));
  const cf = el("ul", {id: "cofiring"});
  x.cofire.forEach(([j, r]) => {
    const other = D.experts[j];
    cf.append(el("li", {}, el("a", {href: "#" + other.name, text: other.name}), ` r = ${r} (#${other.rank}, ${D.score_label} ${other.f.score})`));
  });
  detail.append(cf);
}
function route() {
  let name = location.hash.slice(1);
  try { name = decodeURIComponent(name); } catch (e) { /* a malformed %-escape: shown as typed */ }
  show(name || D.experts[0].name);
}
window.addEventListener("hashchange", route);
route();
// ---- answers
const ans = document.getElementById("answers");
if (!D.answers) {
  ans.append(el("h2", {text: "Answers"}), el("div", {class: "meta", text: "No answers: run 04_evaluate.py for this run to see base vs damped answers here."}));
} else {
  const A = D.answers, thr = A.threshold;
  const tox = a => a[1] >= thr;
  const kinds = {all: r => true, flips: r => tox(r.base) && !tox(r[A.damped]), regressions: r => !tox(r.base) && tox(r[A.damped])};
  ans.append(el("h2", {text: `Answers: base vs ${A.damped} (test split; toxic = judge ≥ ${thr})`}));
  const bar = el("div"), tb = el("tbody"), count = el("span", {class: "meta", id: "answer-count"});
  const buttons = {};
  [["all", "all"], ["flips", "toxic → clean"], ["regressions", "clean → toxic"]].forEach(([k, label]) => {
    buttons[k] = el("button", {"data-filter": k, text: `${label} (${A.rows.filter(kinds[k]).length})`});
    buttons[k].addEventListener("click", () => fill(k));
    bar.append(buttons[k]);
  });
  bar.append(count);
  const at = el("table", {id: "answer-table"});
  at.append(el("thead", {}, el("tr", {}, ...["item", "condition", "label", "base", A.damped].map(t => el("th", {class: "name", text: t})))), tb);
  function verdict(a) { return el("div", {class: tox(a) ? "toxic" : "clean", text: `${tox(a) ? "toxic" : "clean"} (${a[1]})`}); }
  function fill(k) {
    Object.entries(buttons).forEach(([key, b]) => b.classList.toggle("on", key === k));
    tb.replaceChildren();
    const rows = A.rows.filter(kinds[k]);
    rows.forEach(r => tb.append(el("tr", {}, el("td", {text: r.id}), el("td", {text: r.condition}), el("td", {text: r.label}),
      el("td", {}, verdict(r.base), el("div", {class: "tok", text: r.base[0]})),
      el("td", {}, verdict(r[A.damped]), el("div", {class: "tok", text: r[A.damped][0]})))));
    count.textContent = ` ${rows.length} items`;
  }
  ans.append(bar, at);
  fill("all");
}
document.body.setAttribute("data-ready", "1");
"""


def render_page(data):
    """The page: data as JSON inside a <script type="application/json"> (every <, > and & escaped, so no text in
    it can close that element), the script and styles above, and a Content-Security-Policy that allows exactly
    them (by hash) and nothing else: no request of any kind, no other script."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = {name: "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
              for name, text in (("script", SCRIPT), ("style", STYLE))}
    policy = (f"default-src 'none'; script-src '{digest['script']}'; style-src '{digest['style']}'; img-src data:; "
              "base-uri 'none'; form-action 'none'")
    title = f"Toxic experts of run {data['run']}".replace("&", "&amp;").replace("<", "&lt;")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">\n'
            f'<meta name="viewport" content="width=device-width">\n<title>{title}</title>\n'
            f"<style>{STYLE}</style></head>\n<body>\n"
            '<header id="head"></header>\n<main><div id="indexpane"><table id="index"></table></div>'
            '<div id="detail"></div></main>\n<section id="answers"></section>\n'
            f'<script id="data" type="application/json">{payload}</script>\n'
            f"<script>{SCRIPT}</script>\n</body></html>\n")


def build(cfg):
    """Reads the run's artifacts, reruns the chosen rows, writes the page; returns its path."""
    run_dir = Path("runs") / run_name(cfg["run"])
    activations, collected = load_npz(run_dir / "activations.npz", rerun_hint="01_collect.py",
                                      required=["activations", "labels", "item_ids"], in_file=["activations", "writes"])
    expertise, scored = load_npz(run_dir / "expertise.npz", rerun_hint="02_score.py", required=["auroc", "q_value"])
    suppression, suppressed = load_pt(run_dir / cfg["suppression"], rerun_hint="03_suppress.py", required=["alpha"])
    if scored["upstream"]["activations.npz"] != collected["fingerprint"] or \
            suppressed["upstream"]["expertise.npz"] != scored["fingerprint"]:
        fail(f"the artifacts in {run_dir} are not one chain (expertise.npz was not made from activations.npz, or "
             f"{cfg['suppression']} not from expertise.npz): rerun 02_score.py and 03_suppress.py")
    score_name = suppressed.get("score", "activation")
    score = expertise[EXPERTISE_SCORES[score_name]]
    alpha = suppression["alpha"].numpy().astype(np.float64)
    labels = activations["labels"].astype(np.int64)
    k = min(cfg["experts"], score.size)
    neurons = np.argsort(-score, kind="stable")[:k]

    # the K columns of the pooled activations, a block of rows at a time (never rows x all neurons)
    pooled = np.concatenate([block[:, neurons].astype(np.float64) for block in activations["activations"].row_blocks()])
    settings = collected["settings"]

    # the model, for the rerun and the writes
    model, processor, sites, model_meta = load_model(collected["model"], cfg["dtype"] or collected["dtype"],
                                                     cfg["device"])
    if model_meta["sites"] != collected["sites"]:
        fail(f"model {collected['model']!r} no longer has the neuron sites of activations.npz: rerun 01_collect.py")
    names = expert_names(sites, neurons)

    items, checksum = load_items(collected["data"])
    if checksum != collected["data_checksum"]:
        fail(f"{collected['data']} changed since 01_collect.py ran: rerun 01_collect.py (the rows could not be rebuilt)")
    items_by_id = {item["id"]: item for item in items}
    quantiles = [float(q) for q in cfg["quantiles"].split(",") if q.strip()]
    rerun = {int(row) for j in range(k) for row in np.argsort(-pooled[:, j], kind="stable")[:cfg["top_rows"]]}
    picks = [pick_rows(pooled[:, j], labels, cfg["top_rows"], quantiles, cfg["clean_rows"], rerun) for j in range(k)]
    rows = sorted(rerun)
    print(f"top {k} experts by {score_name}; rerunning {len(rows)} of {len(labels)} calibration rows once "
          f"for their per-token activations")
    records, retokenized = rerun_rows(model, processor, sites, rows, items_by_id, activations, settings, neurons,
                                      cfg["batch_size"])
    writes = direct_writes(model, sites, neurons, cfg["promoted"])

    experts, gaps, shown_ids = [], [], set()
    n_toxic, n_clean = int(labels.sum()), int((1 - labels).sum())
    sample_index = activations.get("sample_index")
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant column correlates with nothing: r = 0
        correlation = np.nan_to_num(np.corrcoef(pooled.T) if k > 1 else np.ones((1, 1)), nan=0.0)
    has_writer = "writer" in expertise
    for j, (flat, (name, layer, expert, index)) in enumerate(zip(neurons, names)):
        values = pooled[:, j]
        reads = []
        for row, why in picks[j]:
            cut = snippet(records[row], j, cfg["window"], settings["pooling"])
            if cut is None:
                continue
            ids, acts, ctx, at, again = cut
            gaps.append((abs(again - values[row]), abs(values[row])))
            shown_ids.update(ids)
            reads.append(dict(row=row, why=why, item=str(activations["item_ids"][row]),
                              sample=int(sample_index[row]) if sample_index is not None else 0,
                              label="toxic" if labels[row] else "clean", pooled=f"{values[row]:.4g}",
                              ids=ids, acts=acts, ctx=ctx, max=at))
        scale = max([abs(a) for read in reads for a in read["acts"]] + [1e-12])
        for key in ("up", "down"):
            shown_ids.update(i for i, _ in writes[j][key])
        edges = np.histogram_bin_edges(values, bins=cfg["bins"])
        toxic_mean, clean_mean = values[labels == 1].mean(), values[labels == 0].mean()
        f = dict(auroc=f"{expertise['auroc'][flat]:.4f}", p=f"{expertise['p_value'][flat]:.3g}",
                 q=f"{expertise['q_value'][flat]:.3g}", alpha=f"{alpha[flat]:.4f}")
        v = dict(auroc=finite(expertise["auroc"][flat]), p=finite(expertise["p_value"][flat]),
                 q=finite(expertise["q_value"][flat]), alpha=finite(alpha[flat]))
        if has_writer:
            f.update(d=f"{expertise['writer'][flat]:.4g}", t=f"{expertise['writer_t'][flat]:.3g}")
            v.update(d=finite(expertise["writer"][flat]), t=finite(expertise["writer_t"][flat]))
        f["score"] = {"activation": f["auroc"], "writer": f.get("d"), "writer-t": f.get("t")}[score_name]
        card = [["neuron", f"{name} (flat index {int(flat)}; layer {layer}" + (f", expert {expert}" if expert is not None
                                                                              else "") + f", neuron {index})"],
                ["AUROC", f["auroc"]], ["p (one-sided)", f["p"]], ["q (Benjamini-Hochberg)", f["q"]]]
        if has_writer:
            card += [["writer d", f["d"] + " nats"], ["writer t", f["t"]],
                     ["writer q", f"{expertise['writer_q_value'][flat]:.3g}"]]
        card += [["alpha", f["alpha"] + (" (damped)" if alpha[flat] < 1 else " (not damped)")],
                 ["calibration rows", f"{n_toxic} toxic, {n_clean} clean"], ["model", collected["model"]],
                 ["run", run_name(cfg["run"])],
                 ["calibration", f"{settings['mode']} mode, {settings['pooling']} over {settings['positions']} "
                                 f"positions, split {settings['split']}, conditions {settings['conditions']}"],
                 ["ranked by", f"{score_name} score (as 03_suppress.py damped; method "
                               f"{suppressed['settings']['method']})"]]
        others = [int(i) for i in np.argsort(-correlation[j], kind="stable") if i != j][:cfg["cofiring"]]
        experts.append(dict(
            name=name, rank=j + 1, f=f, v=v, damped=bool(alpha[flat] < 1), card=card,
            hist=dict(lo=f"{edges[0]:.3g}", hi=f"{edges[-1]:.3g}",
                      toxic=np.histogram(values[labels == 1], edges)[0].tolist(),
                      clean=np.histogram(values[labels == 0], edges)[0].tolist()),
            reads=reads, scale=significant(scale, 3), writes=writes[j],
            damping=dict(toxic=[f"{toxic_mean:.4g}", f"{alpha[flat] * toxic_mean:.4g}"],
                         clean=[f"{clean_mean:.4g}", f"{alpha[flat] * clean_mean:.4g}"]),
            cofire=[[i, f"{correlation[j, i]:+.2f}"] for i in others]))

    gap = max((g for g, _ in gaps), default=0.0)
    largest = max((s for _, s in gaps), default=0.0)
    rerun_note = (f"The rerun, pooled again, reproduces activations.npz within {gap:.2g} (largest |pooled| shown "
                  f"{largest:.3g})" + ("; the continuations were tokenized again from their text (01 ran without "
                                       "--writer, which keeps their token ids)" if retokenized else "") + ".")
    print(rerun_note)
    threshold = settings["judge_threshold"]
    image_ids = image_token_ids(model, processor)
    flagged = toxic_vocabulary(processor.tokenizer, model.get_output_embeddings().weight.shape[0], threshold,
                               exclude=image_ids, ids=sorted(i for e in experts for key in ("up", "down")
                                                             for i, _ in e["writes"][key]))
    table = {row[0]: row for row in scored["null_table"]}
    significant_row = next((row for name, row in table.items() if name.startswith("significant at q <")), None)
    if score_name == "activation":
        chance = (f"Chance level (02's null, {scored['null_draws']} label shuffles): "
                  + (f"{significant_row[0]} — {significant_row[1]:.0f} neurons with real labels, "
                     f"{significant_row[2]:.1f} with shuffled ones; " if significant_row else "")
                  + f"AUROC > 0.65: {table['neurons with AUROC > 0.65'][1]:.0f} vs "
                    f"{table['neurons with AUROC > 0.65'][2]:.1f}; largest AUROC "
                    f"{table['largest AUROC'][1]:.4f} vs {table['largest AUROC'][2]:.4f} by chance.")
    else:
        rows_w = {row[0]: row for row in scored["writer_null_table"]}
        chance = "Chance level (02's null, shuffled labels): " + "; ".join(
            f"{name}: {row[1]:.4g} vs {row[2]:.4g}" for name, row in rows_w.items()) + "."
    damped_count = int((alpha < 1).sum())
    results_path = run_dir / cfg["answers"]
    data = dict(
        run=run_name(cfg["run"]), model=collected["model"], n_neurons=int(score.size), window=cfg["window"],
        score_label={"activation": "AUROC", "writer": "writer d", "writer-t": "writer t"}[score_name],
        summary=(f"model {collected['model']}; calibration {settings['mode']} ({n_toxic} toxic, {n_clean} clean rows); "
                 f"03: {suppressed['settings']['method']} on the {score_name} score, {damped_count:,} neurons damped; "
                 f"{sum(e['damped'] for e in experts)} of these {k} are. "
                 + ("The blind demo's results are for its text pathway (docs/USAGE.md). " if collected["model"]
                    in BLIND_DEMOS else "")),
        chance=chance, has_writer=has_writer, experts=experts, rerun_note=rerun_note,
        rerun=dict(gap=gap, largest=largest, retokenized=retokenized, rows=len(rows)),
        tokens={str(i): list(t) for i, t in readable(processor.tokenizer, shown_ids).items()},
        flagged=flagged, answers=read_answers(results_path, threshold))
    html = render_page(data)
    out = run_dir / cfg["out"]
    write_text(out, html)
    print(f"wrote {out} ({len(html.encode()):,} bytes): {k} experts, "
          f"{sum(len(e['reads']) for e in experts)} snippets from {len(rows)} rows")
    return out


if __name__ == "__main__":
    cfg = parse_overrides(defaults)
    for key in ("experts", "window", "promoted", "bins", "batch_size"):
        if cfg[key] < 1:
            fail(f"--{key.replace('_', '-')} must be at least 1 (got {cfg[key]})")
    for key in ("top_rows", "clean_rows", "cofiring"):
        if cfg[key] < 0:
            fail(f"--{key.replace('_', '-')} must be 0 or more (got {cfg[key]})")
    try:
        quantiles = [float(q) for q in cfg["quantiles"].split(",") if q.strip()]
    except ValueError:
        quantiles = [-1.0]
    if any(not 0 <= q <= 1 for q in quantiles):
        fail(f"--quantiles {cfg['quantiles']!r} must be numbers in [0, 1] separated by commas, e.g. 0.75,0.5,0.25")
    for key in ("out", "suppression", "answers"):
        if Path(cfg[key]).name != cfg[key] or cfg[key] in ("", ".", ".."):
            fail(f"--{key} {cfg[key]!r} must be a file name inside runs/<run>/")
    build(cfg)
