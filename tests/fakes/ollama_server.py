"""A small Ollama stand-in on loopback: real HTTP, the part of the API the `ollama` client uses.

Speaks `POST /api/chat` (non-streamed JSON, or streamed NDJSON chunks that carry `message.content` and
`message.thinking` pieces), `POST /api/show` and `GET /api/tags`, with switchable behaviours:

- `reply`: the answer; a string, a (content, thinking) pair, or a callable(request_json) -> either.
- `delay_s`: sleep before answering a chat (beyond the client's timeout: the client times out).
- `fail_first`: answer the first N chats with 500, then succeed.
- models absent from `models`: chat and show answer 404 "model not found, try pulling it first";
  models in `unlisted` are served but left out of /api/tags (as a remote or aliased model would be).
- `stop()`: close the listening socket (the client then gets connection refused).

It counts chats, concurrent chats (`max_concurrent`) and keeps every chat request body (`requests`).

    with FakeOllama(models={"deepseek-r1:8b": "sha256:abc"}) as fake:
        client = ollama.Client(host=fake.url)
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Reply = str | tuple[str, str | None] | Callable[[dict[str, Any]], "str | tuple[str, str | None]"]

DEFAULT_REPLY = json.dumps({"coherence": 80, "following": 70, "reason": "clear and on task"})


class FakeOllama:
    def __init__(self, *, models: dict[str, str] | None = None, reply: Reply = DEFAULT_REPLY,
                 delay_s: float = 0.0, fail_first: int = 0) -> None:
        self.models = dict(models if models is not None else {"deepseek-r1:8b": "sha256:" + "ab" * 32})
        self.unlisted: set[str] = set()
        self.reply = reply
        self.delay_s = delay_s
        self.fail_first = fail_first
        self.requests: list[dict[str, Any]] = []
        self.chats = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self.running = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeOllama":
        self._thread.start()
        self.running = True
        return self

    def stop(self) -> None:
        """Stop listening: later connections are refused."""
        if self.running:
            self._server.shutdown()
            self._server.server_close()
            self.running = False

    def __enter__(self) -> "FakeOllama":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------

    def _answer(self, body: dict[str, Any]) -> tuple[str, str | None]:
        r = self.reply(body) if callable(self.reply) else self.reply
        return (r, None) if isinstance(r, str) else (r[0], r[1])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self, model: str) -> None:
                self._json(404, {"error": f'model "{model}" not found, try pulling it first'})

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/api/tags":
                    self._json(200, {"models": [
                        {"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z", "size": 4_900_000_000,
                         "digest": d, "details": {"format": "gguf", "family": "qwen2", "parameter_size": "8B",
                                                  "quantization_level": "Q4_K_M"}}
                        for m, d in fake.models.items() if m not in fake.unlisted]})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/show":
                    model = body.get("model", "")
                    if model not in fake.models:
                        return self._not_found(model)
                    return self._json(200, {"modelfile": f"FROM {model}", "parameters": "temperature 0.6",
                                            "template": "{{ .Prompt }}", "details": {"format": "gguf"},
                                            "model_info": {"general.architecture": "qwen2"},
                                            "capabilities": ["completion", "thinking"],
                                            "modified_at": "2025-01-01T00:00:00Z"})
                if self.path != "/api/chat":
                    return self._json(404, {"error": "not found"})
                with fake.lock:
                    fake.chats += 1
                    n = fake.chats
                    fake.requests.append(body)
                    fake.concurrent += 1
                    fake.max_concurrent = max(fake.max_concurrent, fake.concurrent)
                try:
                    self._chat(body, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    with fake.lock:
                        fake.concurrent -= 1

            def _chat(self, body: dict[str, Any], n: int) -> None:
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                model = body.get("model", "")
                if model not in fake.models:
                    return self._not_found(model)
                if n <= fake.fail_first:
                    return self._json(500, {"error": "llama runner process has terminated"})
                content, thinking = fake._answer(body)
                base = {"model": model, "created_at": "2025-01-01T00:00:00Z"}
                if not body.get("stream", True):
                    msg = {"role": "assistant", "content": content}
                    if thinking is not None:
                        msg["thinking"] = thinking
                    return self._json(200, {**base, "message": msg, "done": True, "done_reason": "stop",
                                            "total_duration": 1000, "eval_count": 10})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                # Thinking arrives first, in pieces, then the content in pieces, then the final chunk.
                pieces = [({"thinking": thinking[i:i + 7]}) for i in range(0, len(thinking or ""), 7)]
                pieces += [({"content": content[i:i + 5]}) for i in range(0, len(content), 5)]
                for p in pieces:
                    msg = {"role": "assistant", "content": p.get("content", "")}
                    if "thinking" in p:
                        msg["thinking"] = p["thinking"]
                    self.wfile.write((json.dumps({**base, "message": msg, "done": False}) + "\n").encode())
                    self.wfile.flush()
                final = {**base, "message": {"role": "assistant", "content": ""}, "done": True,
                         "done_reason": "stop", "total_duration": 1000, "eval_count": 10}
                self.wfile.write((json.dumps(final) + "\n").encode())
                self.wfile.flush()

        return Handler
