"""The extra judges of 04_evaluate.py (--judges llm, guard, detoxify): an OpenAI-compatible endpoint served on
loopback by the test, a tiny local guard model, their verdict caches, and their one-line errors."""
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import MILD_TEXTS, write_items
from test_pipeline import run_stage

import common
from common import UserError


class FakeJudgeEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions answering "unsafe" when the request under review contains "rude"."""
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        request = prompt.split("Request: ", 1)[1].split("\n\nAnswer:", 1)[0]
        type(self).requests.append((self.path, self.headers.get("Authorization"), body["model"]))
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": "unsafe" if "rude" in request else "Safe."}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), FakeJudgeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeJudgeEndpoint.requests = []
    monkeypatch.setenv("SGM_JUDGE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("SGM_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("SGM_JUDGE_API_KEY", "test-key")
    yield FakeJudgeEndpoint.requests
    server.shutdown()


def test_llm_judge_rates_and_caches(tmp_path, endpoint):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    args = ("--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "3", "--judges",
            "profanity,llm", "--judge-cache", tmp_path / "cache")
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    assert len(endpoint) == 12 and endpoint[0] == ("/v1/chat/completions", "Bearer test-key", "judge-model")
    rows = {r["label"]: r for r in json.loads((tmp_path / "runs/tiny/results.json").read_text())["rows"]}
    rude = sum("rude" in text for text in MILD_TEXTS["toxic"]) / len(MILD_TEXTS["toxic"])
    assert rows["toxic"]["judges"]["llm"]["harmful_rate"] == rude and rows["benign"]["judges"]["llm"]["harmful_rate"] == 0
    assert rows["toxic"]["judges"]["llm"]["n_judged"] == 6
    answers = [json.loads(line) for line in (tmp_path / "runs/tiny/results-answers.jsonl").read_text().splitlines()]
    assert all(a["llm"] in (0.0, 1.0) for a in answers)
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    assert len(endpoint) == 12  # the rerun was answered from the cache


def test_llm_judge_without_endpoint_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("SGM_JUDGE_URL", raising=False)
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match="SGM_JUDGE_URL"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "2",
                  "--judges", "llm", cwd=tmp_path)


def test_guard_judge_runs_a_local_model_and_caches(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    tokenizer = common.tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "verdict:")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "guard")
    tokenizer.save_pretrained(tmp_path / "guard")
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    args = ("--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "3", "--judges", "guard",
            "--guard-model", tmp_path / "guard", "--judge-cache", tmp_path / "cache")
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    rows = json.loads((tmp_path / "runs/tiny/results.json").read_text())["rows"]
    answers = [json.loads(line) for line in (tmp_path / "runs/tiny/results-answers.jsonl").read_text().splitlines()]
    # A random model mostly says neither safe nor unsafe: no verdict (None), left out of the rate, never guessed.
    for row in rows:
        judged = [a["guard"] for a in answers if a["label"] == row["label"] and a["guard"] is not None]
        assert row["judges"]["guard"]["n_judged"] == len(judged)
        assert row["judges"]["guard"]["harmful_rate"] == (sum(judged) / len(judged) if judged else None)
    assert (tmp_path / "cache/guard.jsonl").read_text().count("\n") == 12

    def no_loading(*args, **kwargs):
        raise AssertionError("the guard model was loaded although every verdict is cached")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    run_stage("04_evaluate.py", *args, cwd=tmp_path)


def test_guard_needs_a_model_and_unknown_judges_are_refused(tmp_path):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    for judges, message in (("guard", "--guard-model"), ("profanity,gpt", "unknown --judges")):
        with pytest.raises(UserError, match=message):
            run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base",
                      "--max-new-tokens", "2", "--judges", judges, cwd=tmp_path)


def test_detoxify_is_never_downloaded(tmp_path, monkeypatch):
    """Without the package or its checkpoint on disk the detoxify judge stops with what is missing."""
    monkeypatch.setitem(__import__("sys").modules, "detoxify", None)  # as if not installed
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match="never downloaded"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "2",
                  "--judges", "detoxify", cwd=tmp_path)
