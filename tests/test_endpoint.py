"""04_evaluate.py --endpoint (sgm/endpoint.py): the tiny model and its exports served for real on 127.0.0.1
(tests/loopback_server.py) must give exactly the in-process answers, verdicts and table; then the faults
(500s, a timeout, a dropped server, malformed JSON, no prompt log-probabilities), the resumable cache, and the
key, which is never written or printed. Traffic goes to 127.0.0.1 only, a few dozen requests per test."""
import json
import os

import pytest
import torch
from PIL import Image
from conftest import write_items
from loopback_server import LoopbackServer
from test_pipeline import run_stage

import common
from common import UserError
from sgm import artifacts
from sgm import endpoint
from sgm import models
from sgm import neurons

FAKE_KEY = "sk-fake-endpoint-4d1e-must-never-be-shown"
METHODS = "base,sgm,random"
ARGS = ("--model", "tiny", "--max-new-tokens", "6", "--batch-size", "4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """01 -> 02 -> 03 (+ --export of sgm and of the random control) on the tiny model, and the in-process
    reference report of base, sgm and random."""
    folder = tmp_path_factory.mktemp("served")
    data = write_items(folder / "items.jsonl")
    run_stage("01_collect.py", "--model", "tiny", "--data", data, "--mode", "prompts", cwd=folder)
    run_stage("02_score.py", "--run", "tiny", cwd=folder)
    run_stage("03_suppress.py", "--run", "tiny", "--export", folder / "export-sgm", cwd=folder)
    run_stage("03_suppress.py", "--run", "tiny", "--export", folder / "export-random", "--random-control", "true",
              cwd=folder)
    run_stage("04_evaluate.py", *ARGS, "--data", data, "--methods", METHODS, "--report", "inproc", cwd=folder)
    return folder, data


def report(folder, name):
    run = folder / "runs/tiny"
    results = json.loads((run / f"{name}.json").read_text())
    answers = [json.loads(line) for line in (run / f"{name}-answers.jsonl").read_text().splitlines()]
    return results, answers, (run / f"{name}.md").read_text()


def tiny_server(**faults):
    """The source checkpoint served as `vllm serve --chat-template sgm_chat_template.jinja` would serve it."""
    processor = models.load_processor(models.resolve_model_path("tiny"))
    return LoopbackServer(models.resolve_model_path("tiny"), endpoint.fallback_chat_template(processor), **faults)


@pytest.fixture
def fast(monkeypatch):
    """Short retry waits, the test key, and none of the caller's own SGM_ENDPOINT_* settings."""
    for name in [name for name in os.environ if name.startswith("SGM_ENDPOINT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(endpoint, "BACKOFF_S", 0.01)
    monkeypatch.setenv("SGM_ENDPOINT_API_KEY", FAKE_KEY)


def files_with_key(folder):
    return [str(p) for p in folder.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]


def test_served_models_give_the_in_process_report(setup, fast, monkeypatch, capsys):
    folder, data = setup
    servers = dict(base=tiny_server(), sgm=LoopbackServer(folder / "export-sgm", served_name="exports/sgm"),
                   random=LoopbackServer(folder / "export-random"))
    monkeypatch.setenv("SGM_ENDPOINT_MODEL_SGM", "exports/sgm")  # the others: the one model /v1/models lists
    monkeypatch.setenv("SGM_ENDPOINT_URL_RANDOM", servers["random"].url)  # a bare name: its URL from here
    spec = f"base={servers['base'].url},sgm={servers['sgm'].url},random"
    args = (*ARGS, "--data", data, "--methods", METHODS, "--endpoint", spec, "--endpoint-workers", "3",
            "--endpoint-cache", folder / "cache-main", "--report", "served")
    try:
        def no_model(*a, **k):
            raise AssertionError("04_evaluate.py --endpoint loaded the model in process")
        monkeypatch.setattr(models, "load_model", no_model)
        run_stage("04_evaluate.py", *args, cwd=folder)
        requests = {name: server.stats["requests"] for name, server in servers.items()}
        run_stage("04_evaluate.py", *args, cwd=folder)  # a rerun asks the servers nothing but /v1/models
        assert {name: server.stats["requests"] for name, server in servers.items()} == requests
        for server in servers.values():
            assert 1 <= server.stats["max_in_flight"] <= 3  # --endpoint-workers bounds the requests in flight
            assert server.stats["authorization"] == {f"Bearer {FAKE_KEY}"}
    finally:
        for server in servers.values():
            server.close()
    expected, expected_answers, expected_md = report(folder, "inproc")
    results, answers, md = report(folder, "served")
    # Answers, their token ids, toxicity, verdicts, rates, intervals, McNemar: identical.
    assert answers == expected_answers
    assert results["rows"] == expected["rows"] and results["probe"] == expected["probe"]
    # Text perplexity from the servers' prompt log-probabilities: the same up to float summation order.
    for got, want in zip(results["fluency"], expected["fluency"]):
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
        assert got["answer_perplexity"] is not None and got["answer_perplexity"] > 0  # on the served tokenization
    assert [s["selectivity"] is not None for s in results["selectivity"]] == [
        s["selectivity"] is not None for s in expected["selectivity"]]
    assert results["meta"]["endpoints"]["sgm"] == dict(url=servers["sgm"].url, model="exports/sgm",
                                                       prompt_logprobs=True, token_ids=True)
    tables = lambda text: text[text.index("## standard"):text.index("## Fluency")]  # noqa: E731
    assert tables(md) == tables(expected_md)  # the toxicity tables, to the character
    assert "Generated on servers" in md
    output = capsys.readouterr()
    assert FAKE_KEY not in output.out + output.err and not files_with_key(folder)


def test_random_control_export_is_04s_random(setup):
    """The baked random control is 04's `random` alpha (same seed), and its card says so."""
    folder, _ = setup
    tensors, meta = artifacts.load_pt(folder / "runs/tiny/suppression.pt", "")
    random = neurons.matched_random_control(tensors["alpha"], [size for _, size in meta["sites"]], 0)
    source, *_ = models.load_model("tiny")
    baked, _, sites, _ = models.load_model(str(folder / "export-random"))
    weights = dict(source.named_parameters())
    for (name, module), factor in zip(sites, torch.split(random, [s for _, s in meta["sites"]])):
        torch.testing.assert_close(module.weight, weights[f"{name}.weight"] * factor[None, :])
    assert not torch.equal(random, tensors["alpha"])  # a shuffle, not SGM itself
    card = (folder / "export-random/SGM_EXPORT.md").read_text()
    assert "RANDOM CONTROL" in card and "seed 0" in card and endpoint.TEMPLATE_FILE in card
    assert "RANDOM CONTROL" not in (folder / "export-sgm/SGM_EXPORT.md").read_text()


def test_a_typographic_item_puts_its_image_where_the_text_would_be(tiny):
    """Without a chat template a base LM cannot follow "Answer the question shown in the image.": the image takes
    the place its standard twin's text has, and to continue the image's text the image comes last."""
    _, processor, _, _ = tiny
    image = processor.image_token
    prompts = {(task, condition): common.prompt_text(processor, dict(text="what is the weather like", task=task,
                                                                      condition=condition))
               for task in ("answer", "continue") for condition in ("standard", "typographic")}
    assert prompts["answer", "standard"] == f"{image}\nQuestion: what is the weather like\nAnswer:"
    assert prompts["continue", "standard"] == f"{image}\nwhat is the weather like"
    assert prompts["answer", "typographic"] == f"Question: {image}\nAnswer:"
    assert prompts["continue", "typographic"] == image
    ids = processor(text=[prompts["continue", "typographic"]], images=[[Image.new("RGB", (32, 32))]],
                    return_tensors="pt")["input_ids"][0]
    assert ids[-1] == processor.tokenizer.convert_tokens_to_ids(image)  # the LM goes on right after the image


def test_fallback_chat_template_renders_the_in_process_prompt(tiny):
    _, processor, _, _ = tiny
    template = endpoint.fallback_chat_template(processor)
    for task, condition in [(t, c) for t in ("continue", "answer") for c in ("standard", "typographic")]:
        item = dict(id="x", text="what is the weather like", task=task, image_path=None, condition=condition)
        messages = [{"role": "user", "content": [{"type": "image"} if part is None else {"type": "text", "text": part}
                                                 for part in common.fallback_parts(processor, item)]}]
        rendered = processor.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        assert rendered == common.prompt_text(processor, item)
        messages.append({"role": "assistant", "content": " blue"})
        assert processor.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             continue_final_message=True) == rendered + " blue"


def test_500s_are_retried(setup, fast):
    folder, data = setup
    server = tiny_server(fail_first=2)
    try:
        run_stage("04_evaluate.py", *ARGS, "--data", data, "--methods", "base", "--endpoint", f"base={server.url}",
                  "--endpoint-retries", "2", "--endpoint-cache", folder / "cache-500", "--report", "r500", cwd=folder)
    finally:
        server.close()
    _, expected, _ = report(folder, "inproc")
    _, answers, _ = report(folder, "r500")
    assert answers == [a for a in expected if a["method"] == "base"]
    assert server.stats["generations"] == 12


def test_timeout_is_one_line_naming_the_endpoint(setup, fast):
    folder, data = setup
    server = tiny_server(sleep_s=1.5)
    try:
        with pytest.raises(UserError, match="did not answer after 2 tries") as error:
            run_stage("04_evaluate.py", *ARGS, "--data", data, "--methods", "base", "--endpoint",
                      f"base={server.url}", "--endpoint-timeout", "0.3", "--endpoint-retries", "1",
                      "--endpoint-workers", "2", "--endpoint-cache", folder / "cache-timeout", "--report", "rtime",
                      cwd=folder)
    finally:
        server.close()
    assert server.url in error.value.message and "\n" not in error.value.message
    assert FAKE_KEY not in error.value.message and not (folder / "runs/tiny/rtime.json").exists()


def test_dropped_server_resumes_from_the_cache(setup, fast):
    """A server that stops answering mid-run: one line; the rerun asks only for what is missing."""
    folder, data = setup
    server = tiny_server(drop_after=5)
    args = (*ARGS, "--data", data, "--methods", "base", "--endpoint", f"base={server.url}", "--endpoint-retries",
            "1", "--endpoint-workers", "2", "--endpoint-cache", folder / "cache-drop", "--report", "rdrop")
    try:
        with pytest.raises(UserError, match=f"--endpoint base {server.url}.*a rerun resumes"):
            run_stage("04_evaluate.py", *args, cwd=folder)
        assert server.stats["generations"] == 5 and not (folder / "runs/tiny/rdrop.json").exists()
        del server.faults["drop_after"]  # the server is back
        run_stage("04_evaluate.py", *args, cwd=folder)
    finally:
        server.close()
    assert server.stats["generations"] == 12  # nothing generated twice
    assert len({tuple(ids) for ids in server.stats["generated_ids"]}) <= 12
    _, expected, _ = report(folder, "inproc")
    assert report(folder, "rdrop")[1] == [a for a in expected if a["method"] == "base"]


def test_malformed_reply_is_one_line(setup, fast):
    folder, data = setup
    server = tiny_server(malformed=True)
    try:
        with pytest.raises(UserError, match="not the OpenAI API's") as error:
            run_stage("04_evaluate.py", *ARGS, "--data", data, "--methods", "base", "--endpoint",
                      f"base={server.url}", "--endpoint-cache", folder / "cache-bad", "--report", "rbad", cwd=folder)
    finally:
        server.close()
    assert server.url in error.value.message and "\n" not in error.value.message


def test_no_prompt_logprobs_is_marked_not_available(setup, fast):
    folder, data = setup
    server = tiny_server(prompt_logprobs=False)
    try:
        run_stage("04_evaluate.py", *ARGS, "--data", data, "--methods", "base,prompt", "--endpoint",
                  f"base={server.url}", "--endpoint-cache", folder / "cache-nolp", "--report", "rnolp", cwd=folder)
    finally:
        server.close()
    results, answers, md = report(folder, "rnolp")
    assert all(f["perplexity"] is None and f["answer_perplexity"] is None for f in results["fluency"])
    assert results["meta"]["endpoints"]["base"]["prompt_logprobs"] is False
    assert md.count(endpoint.NOT_AVAILABLE) >= 4  # the line naming the server, and the fluency cells
    _, expected, _ = report(folder, "inproc")
    assert [a for a in answers if a["method"] == "base"] == [a for a in expected if a["method"] == "base"]


@pytest.mark.parametrize("flags, message", [
    (("--methods", "base,sgm", "--endpoint", "base=http://127.0.0.1:9/v1"), "no URL for sgm"),
    (("--methods", "base", "--endpoint", "base=http://127.0.0.1:9/v1,det0=http://127.0.0.1:9/v1"), "names det0"),
    (("--methods", "base", "--endpoint", "base=127.0.0.1:9"), "must look like"),
    (("--methods", "base", "--endpoint", "base=http://u:secret@127.0.0.1:9/v1"), "without credentials"),
    (("--methods", "base", "--samples", "2", "--endpoint", "base=http://127.0.0.1:9/v1"), "in process only"),
    (("--methods", "base", "--strengths", "0.5", "--endpoint", "base=http://127.0.0.1:9/v1,sgm@0.5"),
     "SGM_ENDPOINT_URL_SGM_0_5"),
])
def test_bad_endpoint_options_fail_before_anything_runs(tmp_path, flags, message, monkeypatch, fast):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match=message):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, *flags, cwd=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_answer_cache_drops_a_torn_last_line_and_refuses_damage(tmp_path, capsys):
    path = tmp_path / "answers.jsonl"
    cache = endpoint.AnswerCache(path)
    cache.add("k1", dict(answer="a calm day", token_ids=None))
    path.write_text(path.read_text() + '{"key": "k2", "val')  # killed mid-write
    again = endpoint.AnswerCache(path)
    assert again.values == {"k1": dict(answer="a calm day", token_ids=None)} and "torn" in capsys.readouterr().out
    again.add("k2", dict(answer="", token_ids=[]))
    assert set(endpoint.AnswerCache(path).values) == {"k1", "k2"}
    path.write_text('not json\n{"key": "k", "value": {}}\n')
    with pytest.raises(UserError, match="damaged at line 1"):
        endpoint.AnswerCache(path)


def test_a_checkpoint_with_a_chat_template_is_served_as_in_process(tmp_path, fast):
    """With its own chat template the server renders the same prompt as common.prompt_text: same answers."""
    template = ("{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>\n{% else %}{{ p['text'] }}"
                "{% endif %}{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    models.build_tiny(tmp_path / "chat-tiny", chat_template=template)
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    args = ("--model", tmp_path / "chat-tiny", "--run", "chat", "--data", data, "--methods", "base",
            "--max-new-tokens", "5")
    run_stage("04_evaluate.py", *args, "--report", "inproc", cwd=tmp_path)
    server = LoopbackServer(tmp_path / "chat-tiny")
    try:
        run_stage("04_evaluate.py", *args, "--endpoint", f"base={server.url}", "--endpoint-cache", tmp_path / "cache",
                  "--report", "served", cwd=tmp_path)
    finally:
        server.close()
    assert not (tmp_path / "chat-tiny" / endpoint.TEMPLATE_FILE).exists()
    read = lambda name: (tmp_path / f"runs/chat/{name}-answers.jsonl").read_text()  # noqa: E731
    assert read("served") == read("inproc")
