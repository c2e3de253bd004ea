"""sgm/judges.py, the extra judges of 04_evaluate.py (--judges llm, guard, detoxify): an OpenAI-compatible endpoint
served on loopback by the test, a tiny local guard model, their verdict caches, their one-line errors, and the
checks that stop a run before any generation when a requested judge cannot answer."""
import json
import os
import socket
import subprocess
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from conftest import MILD_TEXTS, REPO, write_items
from test_pipeline import run_stage

import common
from common import UserError
from sgm import endpoint as served
from sgm import judges
from sgm import models

FAKE_KEY = "sk-fake-7f3a9c-must-never-be-shown"  # SGM_JUDGE_API_KEY in these tests


class FakeJudgeEndpoint(BaseHTTPRequestHandler):
    """/v1/chat/completions answering "unsafe" when the request under review contains "rude"."""
    requests = []
    fail_first = 0  # answer this many requests with HTTP 500 first (a busy server)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
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
    FakeJudgeEndpoint.requests, FakeJudgeEndpoint.fail_first = [], 0
    monkeypatch.setenv("SGM_JUDGE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("SGM_JUDGE_MODEL", "judge-model")
    monkeypatch.setenv("SGM_JUDGE_API_KEY", FAKE_KEY)
    yield FakeJudgeEndpoint.requests
    server.shutdown()


@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if a stage run in-process loads its model or generates (the judges fail before both)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the stage went on to load its model or generate before the judges were checked")
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(common, "generate", refuse)


def evaluate_command(tmp_path, *args, env):
    """04_evaluate.py as a command, in a fresh process."""
    return subprocess.run([sys.executable, str(REPO / "04_evaluate.py"), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def written_files(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_llm_judge_rates_and_caches(tmp_path, endpoint, capsys):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    args = ("--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "3", "--judges",
            "profanity,llm", "--judge-cache", tmp_path / "cache")
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    # One check request before generating, then one per answer, all with the key from the environment.
    assert len(endpoint) == 13 and set(endpoint) == {("/v1/chat/completions", f"Bearer {FAKE_KEY}", "judge-model")}
    rows = {r["label"]: r for r in json.loads((tmp_path / "runs/tiny/results.json").read_text())["rows"]}
    rude = sum("rude" in text for text in MILD_TEXTS["toxic"]) / len(MILD_TEXTS["toxic"])
    assert rows["toxic"]["judges"]["llm"]["harmful_rate"] == rude and rows["benign"]["judges"]["llm"]["harmful_rate"] == 0
    assert rows["toxic"]["judges"]["llm"]["n_judged"] == 6
    answers = [json.loads(line) for line in (tmp_path / "runs/tiny/results-answers.jsonl").read_text().splitlines()]
    assert all(a["llm"] in (0.0, 1.0) for a in answers)
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    assert len(endpoint) == 14  # the rerun asked only the check: its verdicts came from the cache
    output = capsys.readouterr()
    assert FAKE_KEY not in output.out + output.err
    assert not [name for name in written_files(tmp_path) if FAKE_KEY.encode() in (tmp_path / name).read_bytes()]


def test_llm_judge_without_endpoint_says_what_to_set(tmp_path, monkeypatch, no_generation):
    monkeypatch.delenv("SGM_JUDGE_URL", raising=False)
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match="SGM_JUDGE_URL"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "2",
                  "--judges", "llm", cwd=tmp_path)


def test_guard_judge_runs_a_local_model_and_caches(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    tokenizer = models.tiny_tokenizer()
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
    real_load, loads = AutoModelForCausalLM.from_pretrained, []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    assert len(loads) == 1  # loaded by the check before generating, then kept for the run
    rows = json.loads((tmp_path / "runs/tiny/results.json").read_text())["rows"]
    answers = [json.loads(line) for line in (tmp_path / "runs/tiny/results-answers.jsonl").read_text().splitlines()]
    # A random model mostly says neither safe nor unsafe: no verdict (None), left out of the rate, never guessed.
    for row in rows:
        judged = [a["guard"] for a in answers if a["label"] == row["label"] and a["guard"] is not None]
        assert row["judges"]["guard"]["n_judged"] == len(judged)
        assert row["judges"]["guard"]["harmful_rate"] == (sum(judged) / len(judged) if judged else None)
    assert (tmp_path / "cache/guard.jsonl").read_text().count("\n") == 12

    def no_judging(*args, **kwargs):
        raise AssertionError("the guard model judged although every verdict is cached")
    monkeypatch.setattr(LlamaForCausalLM, "generate", no_judging)
    run_stage("04_evaluate.py", *args, cwd=tmp_path)
    assert len(loads) == 2  # once per run (the check), never again for judging


def test_guard_needs_a_model_and_unknown_judges_are_refused(tmp_path, no_generation):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    for judges, message in (("guard", "--guard-model"), ("profanity,gpt", "unknown --judges")):
        with pytest.raises(UserError, match=message):
            run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base",
                      "--max-new-tokens", "2", "--judges", judges, cwd=tmp_path)


def test_detoxify_is_never_downloaded(tmp_path, monkeypatch, no_generation):
    """Without the package or its checkpoint on disk the detoxify judge stops, before generating, with what is
    missing."""
    monkeypatch.setitem(__import__("sys").modules, "detoxify", None)  # as if not installed
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match="never downloaded"):
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--max-new-tokens", "2",
                  "--judges", "detoxify", cwd=tmp_path)


# ---- checked before any generation (judges.check_judges) -------------------------------------------------------

def closed_port():
    """A loopback port nothing listens on: connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_llm_endpoint_fails_before_generation(tmp_path):
    """One stderr line naming the endpoint, exit 1, nothing generated or written, the key never shown."""
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    url = f"http://127.0.0.1:{closed_port()}/v1"
    env = dict(os.environ, SGM_JUDGE_URL=url, SGM_JUDGE_MODEL="judge-model", SGM_JUDGE_API_KEY=FAKE_KEY)
    done = evaluate_command(tmp_path, "--model", "tiny", "--data", data, "--methods", "base", "--judges",
                            "profanity,llm", "--judge-cache", tmp_path / "cache", env=env)
    assert done.returncode == 1, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: --judges llm") and url in line and "SGM_JUDGE_URL" in line
    assert "generate" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert FAKE_KEY not in done.stdout + done.stderr
    assert written_files(tmp_path) == ["items.jsonl"]  # no runs/, no report, no answers, no cache


def test_llm_check_asks_a_loopback_endpoint_once(tmp_path, endpoint, capsys):
    ready = judges.check_judges(["profanity", "llm"], "", tmp_path / "cache", "cpu", timeout=10)
    assert list(ready) == ["llm"] and ready["llm"]["url"] == os.environ["SGM_JUDGE_URL"]
    assert endpoint == [("/v1/chat/completions", f"Bearer {FAKE_KEY}", "judge-model")]
    output = capsys.readouterr()
    assert "judge llm:" in output.out and FAKE_KEY not in output.out + output.err
    assert not (tmp_path / "cache").exists()  # the check writes nothing


def test_llm_check_gives_up_on_a_silent_endpoint(tmp_path, monkeypatch):
    """An endpoint that takes the connection but never answers fails after the check's timeout, not never."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel accepts; nobody ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        monkeypatch.setenv("SGM_JUDGE_URL", url)
        monkeypatch.setenv("SGM_JUDGE_MODEL", "judge-model")
        with pytest.raises(UserError, match="did not answer a test request") as error:
            judges.check_judges(["llm"], "", tmp_path / "cache", "cpu", timeout=1)
    assert url in error.value.message and "\n" not in error.value.message


def test_missing_guard_checkpoint_fails_before_generation(tmp_path, no_generation):
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    with pytest.raises(UserError, match=r"--judges guard: no folder .*missing-guard: .*--guard-model") as error:
        run_stage("04_evaluate.py", "--model", "tiny", "--data", data, "--methods", "base", "--judges",
                  "profanity,guard", "--guard-model", tmp_path / "missing-guard", cwd=tmp_path)
    assert "\n" not in error.value.message
    (tmp_path / "empty-guard").mkdir()  # a folder without a checkpoint in it
    with pytest.raises(UserError, match="cannot load --guard-model .*empty-guard") as error:
        judges.check_judges(["guard"], str(tmp_path / "empty-guard"), tmp_path / "cache", "cpu")
    assert "\n" not in error.value.message
    assert written_files(tmp_path) == ["items.jsonl"]


def test_detoxify_checkpoint_is_looked_for_on_disk_only(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "detoxify", types.ModuleType("detoxify"))  # as if installed
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(UserError, match="no toxic_original-.*TORCH_HOME") as error:
        judges.check_judges(["detoxify"], "", tmp_path / "cache", "cpu")
    assert str(checkpoints) in error.value.message
    checkpoints.mkdir(parents=True)
    (checkpoints / "toxic_original-c1212f89.ckpt").write_bytes(b"")
    assert judges.check_judges(["detoxify"], "", tmp_path / "cache", "cpu") == {
        "detoxify": checkpoints / "toxic_original-c1212f89.ckpt"}


def test_damaged_judge_cache_is_one_line(tmp_path, endpoint):
    """A torn last line (a killed run, a full disk) or another file: one line naming the cache and the fix,
    before generation and before the endpoint is asked anything."""
    cache = tmp_path / "cache"
    cache.mkdir()
    damaged = json.dumps({"key": "a" * 64, "verdict": 1.0}) + "\n" + '{"key": "b2c9'
    (cache / "llm.jsonl").write_text(damaged)
    data = write_items(tmp_path / "items.jsonl", splits=("test",))
    done = evaluate_command(tmp_path, "--model", "tiny", "--data", data, "--methods", "base", "--judges",
                            "profanity,llm", "--judge-cache", cache, env=dict(os.environ))
    assert done.returncode == 1, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert f"judge cache {cache / 'llm.jsonl'} is damaged at line 2" in line and f"delete {cache / 'llm.jsonl'}" in line
    assert "generate" not in done.stdout and FAKE_KEY not in done.stdout + done.stderr and endpoint == []
    assert written_files(tmp_path) == ["cache/llm.jsonl", "items.jsonl"]
    assert (cache / "llm.jsonl").read_text() == damaged  # left for the user to look at
    # Another format altogether, and what a sound cache holds (NaN = no verdict is not damage).
    for text in ("key,verdict\nabc,1\n", '["key", "verdict"]\n', '{"key": "k", "verdict": "unsafe"}\n'):
        (tmp_path / "other.jsonl").write_text(text)
        with pytest.raises(UserError, match="is damaged at line 1"):
            judges.VerdictCache(tmp_path / "other.jsonl")
    sound = judges.VerdictCache(tmp_path / "sound.jsonl")
    sound.add("k1", float("nan"))
    sound.add("k2", 0.0)
    again = judges.VerdictCache(tmp_path / "sound.jsonl")
    assert again.verdicts["k2"] == 0.0 and again.verdicts["k1"] != again.verdicts["k1"]


def test_llm_judge_retries_a_busy_endpoint_and_asks_each_answer_once(tmp_path, endpoint, monkeypatch):
    """Two HTTP 500s, then answers: retried with backoff (endpoint.request_json), every verdict right, each answer
    asked once (the cache is written from several threads, one whole line each), and a rerun asks nothing."""
    monkeypatch.setattr(served, "BACKOFF_S", 0.01)
    FakeJudgeEndpoint.fail_first = 2
    prompts = [f"request {i}" + (" rude" if i % 3 == 0 else "") for i in range(12)]
    answers = [f"answer {i}" for i in range(12)]
    judge = dict(judges.llm_endpoint(), cache=judges.VerdictCache(tmp_path / "llm.jsonl"))
    verdicts = judges.llm_judge(prompts, answers, judge, workers=4)
    assert verdicts.tolist() == [1.0 if i % 3 == 0 else 0.0 for i in range(12)]
    assert len(endpoint) == 12 and FakeJudgeEndpoint.fail_first == 0
    assert len((tmp_path / "llm.jsonl").read_text().splitlines()) == 12
    again = dict(judge, cache=judges.VerdictCache(tmp_path / "llm.jsonl"))
    assert judges.llm_judge(prompts, answers, again).tolist() == verdicts.tolist() and len(endpoint) == 12


def test_llm_judge_that_stays_down_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(served, "BACKOFF_S", 0.01)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    monkeypatch.setenv("SGM_JUDGE_URL", url)
    monkeypatch.setenv("SGM_JUDGE_MODEL", "judge-model")
    judge = dict(judges.llm_endpoint(), cache=judges.VerdictCache(tmp_path / "llm.jsonl"))
    with pytest.raises(UserError, match="did not answer after 2 tries") as error:
        judges.llm_judge(["a request"], ["an answer"], judge, retries=1)
    assert url in error.value.message and "SGM_JUDGE_URL" in error.value.message and "\n" not in error.value.message


def test_the_probe_reads_the_first_line_of_an_answer():
    """The expected word (or a count's digit) must be on the answer's first non-empty line: an echoed question after
    it ("Answer with one word.") or numbers listed on later lines are not the reply (the old match anywhere in the
    answer credited both: session 25's demo answers)."""
    probe_correct = judges.probe_correct
    echoed = " 10\nQuestion: How many circles are in the image? Answer with one word.\nAnswer: 10"
    listed = " 1\nAnswer: 2\nAnswer: 3\nAnswer: 4"
    assert not probe_correct(echoed, "one") and not probe_correct(listed, "two") and not probe_correct(listed, "four")
    assert probe_correct(listed, "one") and probe_correct("\n\nI see 3 circles.\nMore", "three")
    assert probe_correct(" Yellow.", "yellow") and not probe_correct(" yellowish", "yellow")
