"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions wire format, for teacher tests.

Each page image (identified by the SHA-256 of the bytes in its data URL) can be given a script: what to do on
its 1st, 2nd, ... request. Actions: ok | 500 | 429 (Retry-After: 1) | 429date (Retry-After as an HTTP date,
about 2 s ahead) | 429later (an HTTP date an hour ahead) | slow (answer after `slow_seconds`) |
drop (close the connection without a reply) | badjson (200, body not JSON) | nochoices (200, no choices) |
loop (a looping answer) | length (finish_reason=length) | 401 (a gateway that echoes the key it refused) |
parts (content as a list of parts) | refusal (content null, refusal set) | think (<think> before the answer) |
fence (a preamble line, then the answer in a ```markdown fence) | filter (finish_reason=content_filter) |
quota (429 insufficient_quota) | 400long (a 400 whose long message ends with the key) | trickle (the
answer 16 bytes at a time, 0.3 s apart: every read is quick, the whole takes ~7 s).
After the script, requests are answered `ok`. `bodies` keeps every request's JSON body; `answered` counts the
complete answers (200 with a completion) per image. `stop_after=K`: the server dies after its K-th answer,
as a killed process does: it stops listening (new connections are refused) and drops the requests already on
their way without a reply.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def image_id(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


ANSWER = "<|ref|>title<|/ref|><|det|>[[10, 10, 200, 40]]<|/det|>\n# Page {n}\n\nText of page {n}."


class ScriptedOpenAI:
    def __init__(self, scripts: dict[str, list[str]] | None = None, delay: float = 0.0, slow_seconds: float = 3.0,
                 stop_after: int | None = None):
        self.scripts = scripts or {}
        self.delay, self.slow_seconds, self.stop_after = delay, slow_seconds, stop_after
        self.requests: Counter = Counter()  # image id -> requests received
        self.answered: Counter = Counter()  # image id -> complete answers sent
        self.dead = False
        self.times: dict[str, list[float]] = defaultdict(list)
        self.auth: set[str] = set()
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # clients that time out or die hang up on us
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _answering(self, key: str) -> bool:
        """Whether this answer goes out (the server is not dead); the K-th of stop_after kills it after."""
        with self.lock:
            if self.dead:
                return False
            self.answered[key] += 1
            if self.stop_after is not None and sum(self.answered.values()) >= self.stop_after:
                self.dead = True
                threading.Thread(target=self.__exit__, daemon=True).start()  # shutdown() waits for the loop
            return True

    def _handler(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def drop(self):
                self.close_connection = True
                self.connection.shutdown(2)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if owner.dead:  # a kept-alive connection to a server that died
                    return self.drop()
                if self.path != "/v1/chat/completions":
                    return self.reply(404, b'{"error": {"message": "not found"}}')
                user = body["messages"][-1]["content"]
                url = next(part["image_url"]["url"] for part in user if part["type"] == "image_url")
                assert url.startswith("data:image/")
                key = hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest()
                with owner.lock:
                    attempt = owner.requests[key]
                    owner.requests[key] += 1
                    owner.times[key].append(time.monotonic())
                    owner.auth.add(self.headers.get("Authorization", ""))
                    owner.bodies.append({k: v for k, v in body.items() if k != "messages"})
                script = owner.scripts.get(key, [])
                action = script[attempt] if attempt < len(script) else "ok"
                time.sleep(owner.delay)
                if action == "500":
                    return self.reply(500, b'{"error": {"message": "internal error", "type": "server_error"}}')
                if action == "429":
                    return self.reply(429, b'{"error": {"message": "rate limited"}}', {"Retry-After": "1"})
                if action in ("429date", "429later"):  # RFC 9110's other form; whole seconds, so 1-2 s ahead
                    ahead = 2 if action == "429date" else 3600
                    return self.reply(429, b'{"error": {"message": "rate limited"}}',
                                      {"Retry-After": formatdate(time.time() + ahead, usegmt=True)})
                if action == "drop":
                    return self.drop()
                if action == "401":
                    error = {"error": {"message": f"Incorrect API key: {self.headers.get('Authorization')}",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}}
                    return self.reply(401, json.dumps(error).encode())
                if action == "quota":
                    error = {"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                                       "code": "insufficient_quota"}}
                    return self.reply(429, json.dumps(error).encode())
                if action == "400long":  # a long message that ends by echoing the key
                    error = {"error": {"message": "x" * 262 + self.headers.get("Authorization", "")}}
                    return self.reply(400, json.dumps(error).encode())
                if action == "badjson":
                    return self.reply(200, b"<html>gateway says hello</html>")
                if action == "slow":
                    time.sleep(owner.slow_seconds)
                text = ANSWER.format(n=key[:8])  # stable per image
                finish = "stop"
                if action == "loop":
                    text = "The same line again. " * 200
                if action == "length":
                    finish = "length"
                message = {"role": "assistant", "content": text}
                if action == "parts":
                    message["content"] = [{"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
                                          {"type": "text", "text": text}]
                if action == "refusal":
                    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
                if action == "think":
                    message["content"] = "<think>Let me look at the page first.</think>\n" + text
                if action == "fence":
                    message["content"] = "Here is the Markdown:\n```markdown\n" + text + "```"
                if action == "filter":
                    finish = "content_filter"
                completion = {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [] if action == "nochoices" else [
                                  {"index": 0, "message": message, "finish_reason": finish}],
                              "usage": {"prompt_tokens": 100, "completion_tokens": 20,
                                        "total_tokens": 120}}
                data = json.dumps(completion).encode()
                if action != "nochoices" and not owner._answering(key):
                    return self.drop()
                if action == "trickle":  # the whole reply, 16 bytes every 0.3 s: no read waits a second
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    for i in range(0, len(data), 16):
                        self.wfile.write(data[i:i + 16])
                        self.wfile.flush()
                        time.sleep(0.3)
                    return None
                return self.reply(200, data)

        return Handler
