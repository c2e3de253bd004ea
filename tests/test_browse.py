"""tools/browse.py, the expert browser: the page of a tiny run (01-04 in-process, then the real command), checked
against values computed here from the artifacts and the weights, then opened in a real headless Chromium (Debian's
`chromium`, driven by its command line: --dump-dom for the page after its script ran, --screenshot, console
messages and page errors on stderr with --enable-logging, every network request in --log-net-log). Outside CI a
machine without Chromium skips the browser test with one line saying how to install it; under CI (env CI set) it
fails instead."""
import copy
import json
import os
import re
import runpy
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import REPO, command, write_items
from test_pipeline import run_stage

from common import encode, image_token_ids, load_items
from sgm.artifacts import load_npz, load_pt
from sgm.models import load_model

K = 40
HOSTILE = "</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """A tiny run through the four stages and `python -m tools.browse`: (folder, html text, embedded data)."""
    folder = tmp_path_factory.mktemp("browse")
    data = write_items(folder / "items.jsonl")
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=folder)
    run_stage("02_score.py", "--run", "tiny", cwd=folder)
    run_stage("03_suppress.py", "--run", "tiny", cwd=folder)
    run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--max-new-tokens", "6", "--conditions",
              "standard", "--methods", "base,sgm", "--perplexity-items", "2", "--selectivity", "false", cwd=folder)
    done = subprocess.run(command("tools/browse.py", "--run", "tiny", "--experts", K), cwd=folder,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    html = (folder / "runs" / "tiny" / "experts.html").read_text(encoding="utf-8")
    return folder, html, embedded(html)


def embedded(html):
    found = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, flags=re.S)
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def truth(page, tiny):
    """What the page must show, computed here: the artifacts, the top-K order, and per expert the numpy top-15
    of W_U (g * down_proj column) from the weights."""
    folder = page[0]
    run = folder / "runs" / "tiny"
    expertise, _ = load_npz(run / "expertise.npz", "")
    alpha = load_pt(run / "suppression.pt", "")[0]["alpha"].numpy()
    activations, _ = load_npz(run / "activations.npz", "")
    model = tiny[0]
    layers = model.model.language_model.layers
    width = layers[0].mlp.down_proj.in_features
    top = np.argsort(-expertise["auroc"], kind="stable")[:K]
    unembedding = model.lm_head.weight.numpy().astype(np.float64)
    gain = model.model.language_model.norm.weight.numpy().astype(np.float64)
    promoted = []
    for flat in top:
        column = layers[flat // width].mlp.down_proj.weight[:, flat % width].numpy().astype(np.float64)
        promoted.append(np.argsort(-(unembedding @ (gain * column)))[:15].tolist())
    names = [f"L{flat // width}.N{flat % width}" for flat in top]
    return dict(expertise=expertise, alpha=alpha, activations=activations, top=top, names=names, promoted=promoted,
                width=width)


def test_the_page_holds_the_artifacts_values(page, truth):
    _, html, data = page
    experts = data["experts"]
    assert [e["name"] for e in experts] == truth["names"]
    for e, flat in zip(experts, truth["top"]):
        assert e["f"]["auroc"] == f"{truth['expertise']['auroc'][flat]:.4f}"
        assert e["f"]["q"] == f"{truth['expertise']['q_value'][flat]:.3g}"
        assert e["f"]["alpha"] == f"{truth['alpha'][flat]:.4f}"
        assert e["damped"] == bool(truth["alpha"][flat] < 1)
    assert [[i for i, _ in e["writes"]["up"]] for e in experts] == truth["promoted"]
    # the histogram counts every calibration row once; the co-firing partner is the most correlated one
    labels, pooled = truth["activations"]["labels"], truth["activations"]["activations"][:, truth["top"]]
    assert sum(experts[0]["hist"]["toxic"]) == labels.sum() and sum(experts[0]["hist"]["clean"]) == (1 - labels).sum()
    r = np.corrcoef(pooled.T)[0]
    partner = int(np.argmax(np.where(np.arange(K) == 0, -np.inf, r)))
    assert experts[0]["cofire"][0] == [partner, f"{r[partner]:+.2f}"]
    # the rerun of the chosen rows, pooled again, is 01's pooled value
    assert data["rerun"]["gap"] <= 1e-5 * max(data["rerun"]["largest"], 1e-3) and not data["rerun"]["retokenized"]
    assert len(html.encode()) / K * 100 < 2e6  # ~2 MB at K = 100
    # answers: every test item, base vs sgm
    assert data["answers"]["damped"] == "sgm" and len(data["answers"]["rows"]) == 12


def test_no_text_in_the_data_can_leave_its_element(page):
    from tools.browse import render_page
    data = copy.deepcopy(page[2])
    first = str(data["experts"][0]["reads"][0]["ids"][0])
    data["tokens"][first] = [HOSTILE, HOSTILE]
    html = render_page(data)
    assert HOSTILE not in html and "<img" not in html.split('<script id="data"')[1]
    assert embedded(html)["tokens"][first][0] == HOSTILE


# ---- in a real browser ---------------------------------------------------------------------------------------

def chromium():
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI needs the browser test: .ci/run installs it "
                        "(apt-get install -y chromium)")
        pytest.skip("no chromium: install it (Debian/Ubuntu: `apt-get install chromium`) to run the browser test")
    return path


def open_page(path, fragment, tmp_path, screenshot=None):
    """Open file://path#fragment in headless Chromium: (DOM after its script, console lines, URLs the page asked
    for). Console messages include page errors (uncaught exceptions) and Content-Security-Policy refusals."""
    profile, net_log = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}", tmp_path / "net.json"
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
            "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}", "--window-size=1280,900"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    done = subprocess.run(args + [f"file://{path}" + (f"#{fragment}" if fragment else "")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    log = json.loads(net_log.read_text())
    kinds = {value: name for name, value in log["constants"]["logEventTypes"].items()}
    # the page's own requests: those made for the file:// page (the browser's background ones have no origin)
    requested = [event["params"]["url"] for event in log["events"] if kinds[event["type"]] == "URL_REQUEST_START_JOB"
                 and "file://" in event["params"].get("network_isolation_key", "")]
    return Node.parse(done.stdout), console, requested


class Node:
    """A parsed element: tag, attrs, children (elements and strings)."""

    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.children = tag, dict(attrs), []

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, test):
        found = [self] if test(self) else []
        for child in self.children:
            if isinstance(child, Node):
                found += child.find(test)
        return found

    def by_id(self, name):
        found = self.find(lambda n: n.attrs.get("id") == name)
        return found[0] if found else None

    def by_class(self, name):
        return self.find(lambda n: name in (n.attrs.get("class") or "").split())

    @staticmethod
    def parse(html):
        root, stack = Node("root", {}), []
        void = {"meta", "img", "br", "hr", "input", "link", "area", "base", "col", "embed", "source", "wbr"}

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                node = Node(tag, attrs)
                (stack[-1] if stack else root).children.append(node)
                if tag not in void:
                    stack.append(node)

            def handle_endtag(self, tag):
                while stack and stack.pop().tag != tag:
                    pass

            def handle_data(self, text):
                (stack[-1] if stack else root).children.append(text)
        Parser(convert_charrefs=True).feed(html)
        return root


def activation_argmax(model, processor, sites_width, item, flat):
    """The text position where neuron `flat` is largest on `item`'s prompt, by a forward pre-hook of our own on
    that layer's down_proj: (input ids, position)."""
    layer, neuron = divmod(int(flat), sites_width)
    seen = []
    down = model.model.language_model.layers[layer].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda module, args: seen.append(args[0][0, :, neuron].clone()))
    try:
        batch = encode(processor, [item], "cpu")
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    ids = batch["input_ids"][0]
    text = ~torch.isin(ids, torch.tensor(image_token_ids(model, processor)))
    values = seen[0].masked_fill(~text, -torch.inf)
    return ids.tolist(), int(values.argmax()), float(values.max())


def red(node):
    """The red share (alpha) of a token's background, 0 when blue or none (alpha 1 serialises as rgb())."""
    found = re.search(r"rgba?\(220, 38, 38(?:, ([0-9.]+))?\)", node.attrs.get("style", ""))
    return 0.0 if not found else float(found.group(1) or 1)


def test_the_page_in_headless_chromium(page, truth, tiny, tmp_path):
    folder, html, data = page
    path = folder / "runs" / "tiny" / "experts.html"
    model, processor = tiny[0], tiny[1]

    dom, console, requested = open_page(path, "", tmp_path)
    assert console == [] and requested == []
    assert dom.find(lambda n: n.tag == "body")[0].attrs.get("data-ready") == "1"
    rows = dom.by_id("index").find(lambda n: n.tag == "tr" and "data-name" in n.attrs)
    assert [row.attrs["data-name"] for row in rows] == truth["names"]
    for row, flat in zip(rows, truth["top"]):
        cells = {cls: row.by_class(cls)[0].text() for cls in ("auroc", "q", "alpha")}
        assert cells == dict(auroc=f"{truth['expertise']['auroc'][flat]:.4f}",
                             q=f"{truth['expertise']['q_value'][flat]:.3g}", alpha=f"{truth['alpha'][flat]:.4f}")
    # no fragment: the first expert; its promoted tokens are numpy's top 15
    assert dom.by_id("title").text().startswith(f"#1 {truth['names'][0]}")
    promoted = [int(n.attrs["data-id"]) for n in dom.by_id("promoted").by_class("tok")]
    assert promoted == truth["promoted"][0]
    # every snippet's most highlighted token is the row's argmax, found by a hook of our own
    items = {item["id"]: item for item in load_items(folder / "items.jsonl")[0]}
    checked = 0
    for snip in dom.by_id("reads").by_class("snip"):
        row = int(snip.attrs["data-row"])
        ids, at, largest = activation_argmax(model, processor, truth["width"],
                                             items[str(truth["activations"]["item_ids"][row])], truth["top"][0])
        tokens = snip.by_class("tok")
        outlined = [j for j, t in enumerate(tokens) if "max" in t.attrs["class"].split()]
        shown = [int(t.attrs["data-id"]) for t in tokens]
        assert len(outlined) == 1 and shown == ids[at - outlined[0]:at - outlined[0] + len(shown)]
        if largest > 0:  # a positive maximum is the reddest token (or ties with one within the page's 3 digits)
            reddest = max(red(token) for token in tokens)
            assert red(tokens[outlined[0]]) == reddest > 0
            checked += 1
    assert checked >= 3
    # a fragment selects its expert; an unknown one says so
    dom, console, requested = open_page(path, truth["names"][2], tmp_path)
    assert console == [] and requested == []
    assert dom.by_id("title").text().startswith(f"#3 {truth['names'][2]}")
    assert [row.attrs["data-name"] for row in dom.by_id("index").by_class("sel")] == [truth["names"][2]]
    dom, console, _ = open_page(path, "L9.N999", tmp_path)
    assert console == [] and dom.by_id("title") is None and '"L9.N999"' in dom.by_id("unknown").text()
    # the answers: every test item, and the flip filters' counts are the judge's
    answers = data["answers"]
    assert len(dom.by_id("answer-table").find(lambda n: n.tag == "tr")) == 1 + len(answers["rows"])

    # a hostile token renders as its characters, runs nothing and asks for nothing
    from tools.browse import render_page
    hostile = copy.deepcopy(data)
    first = hostile["experts"][0]["reads"][0]["ids"][0]
    hostile["tokens"][str(first)] = [HOSTILE, HOSTILE]
    hostile["answers"]["rows"][0]["base"][0] = HOSTILE
    (tmp_path / "hostile.html").write_text(render_page(hostile), encoding="utf-8")
    dom, console, requested = open_page(tmp_path / "hostile.html", "", tmp_path)
    assert console == [] and requested == [] and dom.find(lambda n: n.tag == "img") == []
    assert dom.by_id("reads").by_class("tok")[0].text() == HOSTILE
    assert HOSTILE in [n.text() for n in dom.by_id("answer-table").by_class("tok")]
    # the checks above can fail: a page that asks for a remote image is caught (by the policy and the net log)
    leaky = html.replace('<section id="answers">', '<img src="http://example.invalid/x.png"><section id="answers">')
    (tmp_path / "leaky.html").write_text(leaky, encoding="utf-8")
    _, console, requested = open_page(tmp_path / "leaky.html", "", tmp_path)
    assert any("Content Security Policy" in line for line in console)
    unguarded = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", leaky)
    (tmp_path / "unguarded.html").write_text(unguarded, encoding="utf-8")
    _, _, requested = open_page(tmp_path / "unguarded.html", "", tmp_path)
    assert requested == ["http://example.invalid/x.png"]

    # the screenshot is not blank
    from PIL import Image
    open_page(path, truth["names"][0], tmp_path, screenshot=tmp_path / "shot.png")
    with Image.open(tmp_path / "shot.png") as shot:
        pixels = np.asarray(shot.convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # GLM's processor, numpy 2
def test_mixture_of_experts_neurons_are_read_token_by_token_and_named(tmp_path):
    """GLM-4.5V's layout (a dense first layer, then routed and shared experts): the per-token values of chosen
    neurons of every kind, pooled, are what 01's recorder pools; routed and shared neurons get their own names,
    and what a routed neuron writes is its expert's down projection row."""
    from test_families import BUILDERS, ITEMS

    from sgm.neurons import FusedExperts, record_neurons
    from tools.browse import TokenRecorder, direct_writes, expert_names, hook_tokens
    BUILDERS["glm4v_moe"](tmp_path / "glm")
    model, processor, sites, _ = load_model(str(tmp_path / "glm"))
    starts = np.cumsum([0] + [site.in_features for _, site in sites])
    kinds = ["dense" if not isinstance(site, FusedExperts) and ".shared_experts." not in name else
             "shared" if not isinstance(site, FusedExperts) else "routed" for name, site in sites]
    assert {"dense", "shared", "routed"} <= set(kinds)
    rng = np.random.default_rng(0)
    neurons = np.sort(np.concatenate([starts[i] + rng.choice(site.in_features, 3, replace=False)
                                      for i, (_, site) in enumerate(sites)]))
    batch = encode(processor, ITEMS, "cpu")
    mask = batch["attention_mask"].bool()
    recorder = TokenRecorder(sites, neurons)
    handles = hook_tokens(sites, recorder)
    try:
        with torch.no_grad(), record_neurons(sites, "mean") as pooled:
            pooled.mask = mask
            recorder.start(batch["input_ids"].shape)
            model(**batch)
            expected = pooled.pop()[:, neurons]
    finally:
        for handle in handles:
            handle.remove()
    values = recorder.values.numpy()
    again = (values * mask[..., None].numpy()).sum(1) / mask.sum(1, keepdim=True).numpy()
    np.testing.assert_allclose(again, expected, rtol=1e-5, atol=1e-6)
    assert (values == 0).any() and (values != 0).any()  # unrouted tokens are 0, routed ones are not
    names = expert_names(sites, neurons)
    assert len({name for name, *_ in names}) == len(neurons)
    assert {re.sub(r"\d+", "#", name) for name, *_ in names} == {"L#.N#", "L#.E#.N#", "L#.shared.N#"}
    routed = next(j for j, (name, *_) in enumerate(names) if ".E" in name)
    site_index = int(np.searchsorted(starts, neurons[routed], side="right") - 1)
    expert, index = names[routed][2], names[routed][3]
    column = sites[site_index][1].columns()[expert, index].numpy().astype(np.float64)
    gain = model.get_decoder().norm.weight.numpy().astype(np.float64)
    logits = model.get_output_embeddings().weight.numpy().astype(np.float64) @ (gain * column)
    assert [i for i, _ in direct_writes(model, sites, neurons[routed:routed + 1], 5)[0]["up"]] == \
        np.argsort(-logits)[:5].tolist()


def test_responses_rows_are_rebuilt_as_01_built_them(tmp_path, monkeypatch, tiny):
    """Responses calibration (a fake judge, so that a random model's continuations have both labels): the rerun
    appends each row's own continuation tokens (kept by --writer) and, pooled again over them, gives 01's values;
    without the ids the continuations are tokenized again from their text, and the page says so."""
    import hashlib

    from sgm import judges
    from tools import browse
    data = write_items(tmp_path / "items.jsonl")
    monkeypatch.setattr(judges, "judge_toxicity", lambda texts: np.array(
        [float(hashlib.sha256(t.encode()).digest()[0] % 2) for t in texts]))
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--max-new-tokens", "5", "--writer", "own-logprob",
              cwd=tmp_path)
    run_stage("02_score.py", "--run", "tiny", cwd=tmp_path)
    run_stage("03_suppress.py", "--run", "tiny", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    out = browse.build(dict(browse.defaults, run="tiny", experts=10))
    page = embedded(out.read_text(encoding="utf-8"))
    assert page["rerun"]["gap"] <= 1e-5 * max(page["rerun"]["largest"], 1e-3) and not page["rerun"]["retokenized"]
    assert page["answers"] is None  # 04 has not run: the page's script says so
    grey = [read for e in page["experts"] for read in e["reads"] if read["ctx"]]
    assert grey and all(max(read["ctx"]) < read["max"] for read in grey)  # the prompt, before the continuation
    # the same rows from the continuations' text
    arrays, meta = load_npz(tmp_path / "runs/tiny/activations.npz", "", in_file=["activations", "writes"])
    items = {item["id"]: item for item in load_items(data)[0]}
    without_ids = {key: value for key, value in arrays.items() if key != "continuation_ids"}
    rows = list(range(len(arrays["labels"])))
    model, processor, sites, _ = tiny
    again, retokenized = browse.rerun_rows(model, processor, sites, rows, items, without_ids, meta["settings"], [0],
                                           batch_size=4)
    exact, _ = browse.rerun_rows(model, processor, sites, rows, items, arrays, meta["settings"], [0], batch_size=4)
    assert retokenized and all(again[row]["values"].shape[1] == 1 for row in rows)
    stored = np.concatenate(list(arrays["activations"].row_blocks()))[:, 0]
    np.testing.assert_allclose([exact[row]["values"][exact[row]["pooled"], 0].mean() for row in rows], stored,
                               rtol=1e-5, atol=1e-7)


def test_bad_input_is_one_line(tmp_path):
    for args, message in ((["--experts", "0"], "--experts must be at least 1"),
                          (["--run", "nothing"], "runs/nothing/activations.npz not found: run 01_collect.py first"),
                          (["--quantiles", "0.5,2"], "--quantiles '0.5,2' must be numbers in [0, 1]")):
        done = subprocess.run(command("tools/browse.py", *args), cwd=tmp_path, capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), done.stderr


def test_half_written_answers_are_refused(tmp_path):
    """04 writes its report and answers behind a manifest; answers that are not the set's are refused in one line."""
    from sgm.artifacts import write_set
    browse = runpy.run_path(str(REPO / "tools" / "browse.py"))  # functions only: its main runs under __main__
    answers = [dict(id="a-standard", method=method, condition="standard", label="toxic", answer="mild words",
                    toxicity=0.1) for method in ("base", "sgm")]
    write_set({tmp_path / "results.json": b"{}", tmp_path / "results-answers.jsonl":
               "".join(json.dumps(row) + "\n" for row in answers).encode()})
    assert browse["read_answers"](tmp_path / "results-answers.jsonl", 0.5) is not None
    (tmp_path / "results-answers.jsonl").write_text(json.dumps(answers[0]) + "\n")  # another run's file
    with pytest.raises(SystemExit, match="half-written set"):
        browse["read_answers"](tmp_path / "results-answers.jsonl", 0.5)
