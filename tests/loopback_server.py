"""An OpenAI-compatible chat server on 127.0.0.1 that serves a checkpoint (the tiny model or its exports) for real,
as `vllm serve DIR --chat-template FILE` would: the chat template renders the messages, the data-URL image is
decoded back to a PIL image, the processor encodes both, and the model generates greedily, so its answers must be
exactly the in-process ones. vLLM's extras are honoured: `prompt_logprobs` (the log-probability of every prompt
token, first entry null), `continue_final_message` and `return_token_ids`. Faults for the client's tests:

  fail_first=N        the first N generation requests get HTTP 500
  sleep_s=S           generation requests sleep S seconds before answering (past the client's timeout)
  drop_after=N        after N answered generations, every generation request has its connection closed unanswered
  malformed=True      generation requests get 200 with a body that is not JSON
  prompt_logprobs=False   ignore `prompt_logprobs` (as servers without it do)

Faults touch generation requests (max_tokens > 1) only, so the client's probe (/models and one log-probability
request) passes. `stats` counts requests, generations and the most requests in flight at once.
"""
import base64
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from sgm import models
from sgm.endpoint import TEMPLATE_FILE


class LoopbackServer:
    def __init__(self, checkpoint, chat_template=None, served_name="served-model", **faults):
        self.model, self.processor, _, _ = models.load_model(str(checkpoint))
        template_file = Path(checkpoint) / TEMPLATE_FILE
        self.chat_template = chat_template or (template_file.read_text() if template_file.exists() else None)
        self.served_name, self.faults = served_name, dict(dict(prompt_logprobs=True), **faults)
        self.lock = threading.RLock()  # the stats and the model; re-entered when a fault replies under it
        self.stats = dict(requests=0, generations=0, admitted=0, in_flight=0, max_in_flight=0, authorization=set(),
                          generated_ids=[])
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def done(self):
                """This request stops counting as in flight (before its reply goes out: the client may send
                the next one as soon as it has read it)."""
                if getattr(self, "counted", False):
                    self.counted = False
                    with server.lock:
                        server.stats["in_flight"] -= 1

            def reply(self, code, payload):
                self.done()
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.stats["authorization"].add(self.headers.get("Authorization"))
                if self.path != "/v1/models":
                    return self.reply(404, {"error": "not found"})
                self.reply(200, {"object": "list", "data": [{"id": server.served_name, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.stats["requests"] += 1
                    server.stats["in_flight"] += 1
                    server.stats["max_in_flight"] = max(server.stats["max_in_flight"], server.stats["in_flight"])
                    server.stats["authorization"].add(self.headers.get("Authorization"))
                self.counted = True
                try:
                    self.answer(body)
                finally:
                    self.done()

            def answer(self, body):
                faults = server.faults
                generating = body.get("max_tokens", 16) > 1
                if self.path != "/v1/chat/completions" or body.get("model") != server.served_name:
                    return self.reply(404, {"error": f"no model {body.get('model')!r} at {self.path}"})
                if generating:
                    with server.lock:
                        if faults.get("fail_first", 0) > 0:
                            faults["fail_first"] -= 1
                            return self.reply(500, {"error": "busy"})
                        # counted when admitted, under the lock: two requests in flight cannot both take the last slot
                        if "drop_after" in faults and server.stats["admitted"] >= faults["drop_after"]:
                            self.close_connection = True
                            return  # the connection closes with no reply
                        server.stats["admitted"] += 1
                    if faults.get("malformed"):
                        return self.reply(200, b"{\"choices\": [")
                    if faults.get("sleep_s"):
                        threading.Event().wait(faults["sleep_s"])
                try:
                    self.reply(200, server.complete(body))
                except ValueError as e:
                    self.reply(400, {"error": str(e)})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.no_grad()
    def complete(self, body):
        """One chat completion: render, encode, then generate greedily or score the prompt."""
        template = self.chat_template or getattr(self.processor, "chat_template", None)
        if not template:
            raise ValueError("the model has no chat template; pass --chat-template")
        messages, images = [], []
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part["type"] == "image_url":
                        data = re.sub(r"^data:image/\w+;base64,", "", part["image_url"]["url"])
                        images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append(part)
                content = parts
            messages.append(dict(message, content=content))
        continuing = bool(body.get("continue_final_message"))
        prompt = self.processor.apply_chat_template(
            messages, chat_template=template, tokenize=False, continue_final_message=continuing,
            add_generation_prompt=body.get("add_generation_prompt", True) and not continuing)
        batch = self.processor(text=[prompt], images=[images], return_tensors="pt", padding=True)
        batch.pop("labels", None)
        with self.lock:  # one forward at a time on the shared model
            if body.get("prompt_logprobs") is not None and self.faults["prompt_logprobs"]:
                logits = self.model(**batch).logits[0].float().log_softmax(-1)
                ids = batch["input_ids"][0]
                entries = [None] + [{str(int(t)): {"logprob": float(logits[j, t]), "rank": 1}}
                                    for j, t in enumerate(ids[1:].tolist())]
                return {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}],
                        "prompt_logprobs": entries}
            if body.get("max_tokens", 16) <= 1:
                return {"choices": [{"index": 0, "message": {"role": "assistant", "content": ""}}]}
            sequences = self.model.generate(**batch, max_new_tokens=body["max_tokens"], do_sample=False,
                                            pad_token_id=self.processor.tokenizer.pad_token_id, top_p=None,
                                            top_k=None, temperature=None)
            self.stats["generations"] += 1
        new = sequences[0, batch["input_ids"].shape[1]:].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        ids = new[:next((i for i, t in enumerate(new) if t in eos), len(new))]
        self.stats["generated_ids"].append(ids)
        choice = {"index": 0, "message": {"role": "assistant",
                                          "content": self.processor.tokenizer.decode(ids, skip_special_tokens=True)},
                  "finish_reason": "length"}
        if body.get("return_token_ids"):
            choice["token_ids"] = ids
        return {"id": "cmpl-loopback", "object": "chat.completion", "model": self.served_name, "choices": [choice],
                "usage": {"prompt_tokens": int(batch["input_ids"].shape[1]), "completion_tokens": len(ids)}}
