"""Generation and prompt log-probabilities from served models: 04_evaluate.py --endpoint, for models that do not
fit one machine (vLLM or TGI serving an SGM export tensor-parallel, or any OpenAI-compatible chat server).

    vllm serve exports/llava15-sgm --tensor-parallel-size 4 --port 8001 --chat-template ...   (docs/MODELS.md)
    python 04_evaluate.py --model llava-hf/llava-1.5-7b-hf --run llava15 \
        --endpoint base=http://gpu1:8000/v1,sgm=http://gpu1:8001/v1,random=http://gpu1:8002/v1

What goes over the wire: each item as one chat turn (the image as a base64 PNG data URL, then the same text the
in-process prompt has after its image), greedy (temperature 0), the same max_new_tokens. The server applies the
checkpoint's chat template; for a checkpoint without one (base models such as tiny and demo) 03_suppress.py
--export writes sgm_chat_template.jinja (fallback_chat_template below), which renders exactly the in-process
fallback prompt: serve with `--chat-template <export>/sgm_chat_template.jinja`.

Settings, from the environment only (a name is the --endpoint key upper-cased, other characters as _: sgm@0.5
-> SGM_0_5; the per-name variable wins over the shared one):
  SGM_ENDPOINT_URL_<NAME>                               the URL of a name given bare (--endpoint base,sgm,random)
  SGM_ENDPOINT_MODEL_<NAME> or SGM_ENDPOINT_MODEL      the served model name (default: the one model the
                                                        server lists at /v1/models)
  SGM_ENDPOINT_API_KEY_<NAME> or SGM_ENDPOINT_API_KEY  sent as `Authorization: Bearer`; never printed, never
                                                        written, never part of a cache key
Requests run concurrently (--endpoint-workers), each with a timeout, retried with exponential backoff on
429, 5xx, timeouts and dropped connections (--endpoint-retries); a reply that is not the API's is one line at
once. Every answer and log-probability reply is appended to a JSONL cache (--endpoint-cache) as it arrives,
keyed by sha256 of (kind, endpoint URL, served model, item id, prompt text, image bytes, settings), so an
interrupted run resumes where it stopped and a rerun asks nothing again.

Log-probabilities: vLLM's `prompt_logprobs` request field returns, per prompt token, its id and log-probability.
Servers without it (TGI, most hosted APIs) answer without that field: then text perplexity, answer perplexity
and selectivity are reported as "not available from this endpoint", never silently dropped.
"""
import base64
import hashlib
import http.client
import io
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common import fail, fallback_image, fallback_parts, load_image, user_text

NOT_AVAILABLE = "not available from this endpoint"
TEMPLATE_FILE = "sgm_chat_template.jinja"  # written by 03_suppress.py --export for template-less checkpoints
BACKOFF_S = 1.0  # first retry waits this long, then 2x, 4x, ... (capped at 60 s; a Retry-After header wins)
# What a request can raise: no connection, HTTP errors, a timeout, a dropped connection, a reply not the API's.
REQUEST_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, LookupError, TypeError, ValueError)


def short(error):
    """An exception as one short line (type and first line of its message)."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:120] if lines else ''}"


# ---- HTTP: one JSON request, with retries -------------------------------------------------------------------

class Malformed(ValueError):
    """The server answered 200 with something that is not the API's JSON: a bug, not worth retrying."""


REFUSED_FIX = "check the URL, the served model name (SGM_ENDPOINT_MODEL...) and the key (SGM_ENDPOINT_API_KEY...)"
SILENT_FIX = ("start it or fix the URL; raise --endpoint-timeout or --endpoint-retries for a slow server; answers so "
              "far are cached, a rerun resumes")


def request_json(url, body=None, headers=None, timeout=60.0, retries=0, name="endpoint", refused_fix=REFUSED_FIX,
                 silent_fix=SILENT_FIX):
    """POST `body` (or GET without one) to `url`; the parsed JSON reply. Retries 429, 5xx, timeouts and dropped
    connections `retries` times with exponential backoff; then, or at once on any other failure, one line
    naming the URL (never the key, which lives only in `headers`) and the fix (refused_fix for a 4xx,
    silent_fix when it never answered: the caller's settings, e.g. the judge's)."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data, dict(headers or {}, **{"Content-Type": "application/json"}))
        wait_s = min(60.0, BACKOFF_S * 2 ** attempt)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
            try:
                reply = json.loads(raw)
            except ValueError:
                raise Malformed(f"not JSON: {raw[:60]!r}") from None
            if not isinstance(reply, dict):
                raise Malformed(f"JSON {type(reply).__name__}, not an object")
            return reply
        except Malformed as e:
            fail(f"{name} {url} answered with a reply that is not the OpenAI API's ({short(e)}): check that it "
                 "is an OpenAI-compatible server (vLLM, TGI, ...); answers so far are cached")
        except urllib.error.HTTPError as e:
            transient = e.code == 429 or e.code >= 500
            detail = e.read()[:200].decode(errors="replace").replace("\n", " ")
            retry_after = e.headers.get("Retry-After", "") if e.headers else ""
            if retry_after.isdigit():
                wait_s = min(60.0, float(retry_after))
            error = f"HTTP {e.code} {detail}".strip()
            if not transient:
                fail(f"{name} {url} refused the request ({error[:160]}): {refused_fix}")
        except REQUEST_ERRORS as e:  # refused, timed out, dropped
            error = short(e)
        if attempt < retries:
            time.sleep(wait_s)
    fail(f"{name} {url} did not answer after {retries + 1} tries ({error[:160]}): {silent_fix}")


# ---- settings -------------------------------------------------------------------------------------------------

def parse_endpoints(spec, needed):
    """--endpoint "base=URL,sgm=URL" -> {name: URL} (a bare name, "base,sgm": its URL from SGM_ENDPOINT_URL_<NAME>);
    every name in `needed` (the neurons each generating method runs with) must have one, no other may appear."""
    endpoints = {}
    for part in filter(None, spec.split(",")):
        name, given, url = part.partition("=")
        if not given and name:
            url = os.environ.get(f"SGM_ENDPOINT_URL_{env_name(name)}", "")
            if not url:
                fail(f"--endpoint {name}: set SGM_ENDPOINT_URL_{env_name(name)} (e.g. http://host:8000/v1) or "
                     f"write {name}=URL")
        parsed = urllib.parse.urlsplit(url)
        if not name or parsed.scheme not in ("http", "https") or not parsed.netloc:
            fail(f"--endpoint must look like base=http://host:8000/v1,sgm=http://host:8001/v1; got {part!r}")
        if parsed.username or parsed.password or parsed.query:
            fail(f"--endpoint {name}: give the URL without credentials or query; a key goes in SGM_ENDPOINT_API_KEY")
        endpoints[name] = url.rstrip("/")
    missing, extra = sorted(set(needed) - set(endpoints)), sorted(set(endpoints) - set(needed))
    if missing:
        fail(f"--endpoint has no URL for {', '.join(missing)}: with --endpoint every generating method comes from "
             "a server (serve its export: 03_suppress.py --export, --random-control for random) or drop it from "
             "--methods")
    if extra:
        fail(f"--endpoint names {', '.join(extra)}, which no method in --methods runs with; drop it, or add the "
             "method (prompt and sgm+prompt use base's and sgm's endpoint)")
    return endpoints


def env_name(name):
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def load_served_processor(name):
    """The processor of the model the servers serve (its tokenizer, image token and chat template): the prompt
    text is built with it, as in process. No weights are loaded."""
    from sgm.models import load_processor, resolve_model_path
    try:
        return load_processor(resolve_model_path(name))
    except Exception as e:  # not found offline, damaged
        fail(f"cannot load the processor of --model {name!r} ({short(e)}): with --endpoint, --model names the "
             "served checkpoint (a local folder or a cached hub id) for its tokenizer and chat template")


def connect(urls, model, cache_dir, workers, timeout, retries, probe_item):
    """04_evaluate.py --endpoint: the processor of --model and one Endpoint per neurons -> URL, each probed with
    `probe_item` (it answers; its model name; whether it gives log-probabilities). Answers are cached in
    <cache_dir>/answers.jsonl."""
    processor = load_served_processor(model)
    cache = AnswerCache(Path(cache_dir) / "answers.jsonl")
    served = {}
    for neurons, url in urls.items():
        served[neurons] = Endpoint(neurons, url, processor, cache, workers, timeout, retries)
        served[neurons].probe(probe_item)
    return processor, served


def run_jobs(jobs, workers, desc):
    """Run `jobs` (callables) on up to `workers` threads, results in order. The first failure (or Ctrl-C)
    cancels the jobs not yet started, lets those in flight finish (their replies are cached) and is raised."""
    results = [None] * len(jobs)
    pool = ThreadPoolExecutor(workers)
    bar = tqdm(total=len(jobs), desc=desc, file=sys.stdout, disable=desc is None)
    try:
        futures = {pool.submit(job): i for i, job in enumerate(jobs)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                results[futures[future]] = future.result()  # raises the job's error, if any
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return results


class Endpoint:
    """One served model: settings from the environment, a shared answer cache, concurrent requests."""

    def __init__(self, name, url, processor, cache, workers=8, timeout=120.0, retries=4):
        self.name, self.url, self.processor, self.cache = name, url, processor, cache
        self.workers, self.timeout, self.retries = workers, timeout, retries
        key = os.environ.get(f"SGM_ENDPOINT_API_KEY_{env_name(name)}") or os.environ.get("SGM_ENDPOINT_API_KEY")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = os.environ.get(f"SGM_ENDPOINT_MODEL_{env_name(name)}") or os.environ.get("SGM_ENDPOINT_MODEL")
        self.prompt_logprobs = None  # known after probe()
        # Image placeholders are left out of text perplexity, as sgm/models.py's text_nll leaves out the model's
        # config.image_token_id (the processor's image token in every family here).
        image_token = getattr(processor, "image_token", None)
        self.image_token_id = getattr(processor, "image_token_id", None) or (
            processor.tokenizer.convert_tokens_to_ids(image_token) if image_token else None)

    def _post(self, path, body):
        return request_json(f"{self.url}{path}", body, self._headers, self.timeout, self.retries,
                            f"--endpoint {self.name}")

    def probe(self, item):
        """Before any generation: the server answers (/models), the served model name is known, and whether it
        returns prompt log-probabilities (one tiny request on `item`)."""
        listed = request_json(f"{self.url}/models", None, self._headers, self.timeout, self.retries,
                              f"--endpoint {self.name}")
        ids = [m.get("id") for m in listed.get("data", []) if isinstance(m, dict)]
        if not self.model:
            if len(ids) != 1:
                fail(f"--endpoint {self.name} {self.url} serves {len(ids)} models ({', '.join(map(str, ids[:4]))}): "
                     f"name one in SGM_ENDPOINT_MODEL_{env_name(self.name)} or SGM_ENDPOINT_MODEL")
            self.model = ids[0]
        self.prompt_logprobs = self.token_logprobs([item], [""], desc=None)[0] is not None
        print(f"endpoint {self.name}: {self.url} ({self.model}) answers; prompt log-probabilities: "
              + ("yes" if self.prompt_logprobs else f"no, so fluency and selectivity are {NOT_AVAILABLE}"))

    # ---- requests, cached ----

    def messages(self, item, continuation=None):
        """One user turn, its image and text in the in-process prompt's order (parts), and for teacher forcing the
        answer as the start of the assistant's turn."""
        png = io.BytesIO()
        load_image(item).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        turns = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}} if part is None
                                              else {"type": "text", "text": part} for part in self.parts(item)]}]
        if continuation is not None:
            turns.append({"role": "assistant", "content": continuation})
        return turns, hashlib.sha256(png.getvalue()).hexdigest()

    def _key(self, kind, item, image_hash, *settings):
        return hashlib.sha256(json.dumps([kind, self.url, self.model, item["id"], self.parts(item),
                                          image_hash, *settings]).encode()).hexdigest()

    def parts(self, item):
        """The user turn's content in order, None where the image goes, as common.prompt_text puts it: the image
        then the item's text for a checkpoint with a chat template, else common.fallback_parts."""
        if getattr(self.processor, "chat_template", None):
            return [None, user_text(self.processor, item)]
        return fallback_parts(self.processor, item)

    def generate(self, items, max_new_tokens, desc):
        """Greedy answers (texts) and their token ids (None where the server does not return them)."""
        def ask(item):
            messages, image_hash = self.messages(item)
            key = self._key("chat", item, image_hash, max_new_tokens, 0)
            if key not in self.cache.values:
                reply = self._post("/chat/completions", {
                    "model": self.model, "messages": messages, "temperature": 0, "max_tokens": max_new_tokens,
                    "return_token_ids": True})  # vLLM >= 0.10.2: choices[0].token_ids; others ignore it
                try:
                    choice = reply["choices"][0]
                    text, ids = choice["message"]["content"] or "", choice.get("token_ids")
                    if not isinstance(text, str) or not (ids is None or all(isinstance(i, int) for i in ids)):
                        raise TypeError("content or token_ids of another type")
                except (LookupError, TypeError, AttributeError) as e:
                    fail(f"--endpoint {self.name} {self.url} answered without choices[0].message.content "
                         f"({short(e)}): is it an OpenAI-compatible chat server?")
                self.cache.add(key, dict(answer=text, token_ids=ids))
            value = self.cache.values[key]
            return value["answer"], value["token_ids"]
        answers = run_jobs([lambda item=item: ask(item) for item in items], self.workers, desc)
        return [a for a, _ in answers], [ids for _, ids in answers]

    def token_logprobs(self, items, continuations, desc):
        """Per item, [(token id, log-probability)] of every prompt token after the first (the prompt followed by
        `continuation` when it is not empty, the assistant's turn continued), or None where the server returns
        no prompt log-probabilities."""
        def ask(item, continuation):
            messages, image_hash = self.messages(item, continuation or None)
            key = self._key("prompt_logprobs", item, image_hash, continuation)
            if key not in self.cache.values:
                body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 1,
                        "prompt_logprobs": 0}  # vLLM: the log-probability of each prompt token
                if continuation:
                    body.update(add_generation_prompt=False, continue_final_message=True)
                reply = self._post("/chat/completions", body)
                entries = reply.get("prompt_logprobs")
                pairs = None
                if entries is not None:
                    try:
                        pairs = [None if e is None else
                                 next((int(t), float(v["logprob"])) for t, v in e.items()) for e in entries][1:]
                    except (AttributeError, LookupError, TypeError, ValueError, StopIteration) as e:
                        fail(f"--endpoint {self.name} {self.url} returned prompt_logprobs in an unknown form "
                             f"({short(e)}): expected vLLM's [null, {{token_id: {{logprob: ...}}}}, ...]")
                if pairs is None:  # not offered: asked again next run (the server may be upgraded), not cached
                    return None
                self.cache.add(key, dict(logprobs=pairs))
            return self.cache.values[key]["logprobs"]
        return run_jobs([lambda i=i, c=c: ask(i, c) for i, c in zip(items, continuations)], self.workers, desc)

    def text_nll(self, items, desc):
        """Per item, the mean NLL of its prompt's tokens except image placeholders (as sgm/models.py's text_nll), or
        None for all when the server returns no prompt log-probabilities."""
        if not self.prompt_logprobs:
            return None
        rows = self.token_logprobs(items, [""] * len(items), desc)
        return np.array([-np.mean([lp for t, lp in row if t != self.image_token_id]) for row in rows])

    def continuation_nll(self, items, answers, desc):
        """Per item, the mean NLL (nats/token) of the answer text after the item's prompt, as the server
        tokenizes it (0 for an empty answer, as models.token_nll gives a row with nothing counted), or None when
        the server returns no prompt log-probabilities."""
        if not self.prompt_logprobs:
            return None
        prompt = self.token_logprobs(items, [""] * len(items), desc and f"{desc} (prompts)")
        full = self.token_logprobs(items, list(answers), desc)
        return np.array([0.0 if not answer or len(f) <= len(p) else -np.mean([lp for _, lp in f[len(p):]])
                         for answer, p, f in zip(answers, prompt, full)])


def fallback_chat_template(processor):
    """A Jinja chat template that renders a chat request as common.prompt_text's fallback renders the item: its
    parts in order (common.fallback_parts), the image as the fallback image prefix less its closing newline (the
    text after it carries that), nothing else (no roles, no markers), and an assistant message's text right after
    it (teacher forcing). For serving a checkpoint that has no chat template of its own."""
    prefix = json.dumps(fallback_image(processor))  # a JSON string is a valid Jinja string literal
    return ("{%- for message in messages -%}"
            "{%- if message['content'] is string -%}{{ message['content'] }}"
            "{%- else -%}{%- for part in message['content'] -%}"
            "{%- if part['type'] in ('image', 'image_url') -%}{{ " + prefix + " }}"
            "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}{%- endfor -%}")


# ---- the answer cache -----------------------------------------------------------------------------------------

class JsonlCache:
    """A JSONL file of {"key", <field>} lines, read once and appended one line per value as it arrives (threads
    take a lock), so a killed run loses at most what was in flight. A line that is not such JSON stops the run
    with one line naming the file and the fix (deleting it only means asking again); with drop_torn_end, a last
    line without its newline (a run killed mid-write) is dropped with a note and asked again instead.
    04's answer cache (AnswerCache) and judges.VerdictCache are this with their own field."""

    def __init__(self, path, field, valid, what, drop_torn_end=False):
        self.path, self.field, self.values, self.lock = Path(path), field, {}, threading.Lock()
        if not self.path.exists():
            return
        fix = f"delete {self.path} (what it holds is asked again on the next run)"
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the {what} {self.path} ({short(e)}): {fix}")
        lines = text.split("\n")
        if lines[-1] and drop_torn_end:  # no newline at the end: the write of the last line was cut off
            print(f"note: {self.path} ends in a torn line (a killed run); it is asked again")
            with open(self.path, "r+b") as f:
                f.truncate(len(text.encode()) - len(lines[-1].encode()))
            lines[-1] = ""
        for number, line in enumerate(lines if lines[-1] else lines[:-1], 1):
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and isinstance(row.get("key"), str) and valid(row.get(field))
            except ValueError:
                ok = False
            if not ok:
                fail(f"the {what} {self.path} is damaged at line {number} (not a {{\"key\", \"{field}\"}} JSON "
                     f"line; a torn write or another file): {fix}")
            self.values[row["key"]] = row[field]

    def add(self, key, value):
        line = json.dumps({"key": key, self.field: value}, ensure_ascii=False) + "\n"
        with self.lock:
            self.values[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)


class AnswerCache(JsonlCache):
    """Served answers and log-probabilities ({"key", "value"}); a torn last line is dropped and asked again."""

    def __init__(self, path):
        super().__init__(path, "value", lambda value: isinstance(value, dict), "endpoint cache", drop_torn_end=True)
