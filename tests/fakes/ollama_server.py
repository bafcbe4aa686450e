"""A small Ollama stand-in on loopback: real HTTP, the part of the API the `ollama` client uses.

Speaks `POST /api/chat` (non-streamed JSON, or streamed NDJSON chunks that carry `message.content` and
`message.thinking` pieces), `POST /api/show` and `GET /api/tags`, with switchable behaviours:

- `reply`: the answer; a string, a (content, thinking) pair, a `Shape`, or a callable(request_json) -> any
  of these. A `Shape` also sets `done_reason`, sends `"thinking": null` explicitly, or breaks the stream
  off with an error line: the reply shapes real servers produce (see `SHAPES`, each with where it is
  documented).
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
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable


@dataclass(frozen=True)
class Shape:
    """One reply as a server sends it.

    content/thinking: `message.content` / `message.thinking` (thinking None: the field is left out, or sent
    as null when `thinking_null`). done_reason: the final chunk's reason ("stop"; "length" when
    `num_predict` or the context cut the answer). error_after: streamed, send this many content chunks
    and then an `{"error": ...}` line instead of the final chunk.
    """

    content: str
    thinking: str | None = None
    done_reason: str = "stop"
    thinking_null: bool = False
    error_after: int | None = None


Reply = str | tuple[str, str | None] | Shape | Callable[[dict[str, Any]], "str | tuple[str, str | None] | Shape"]

DEFAULT_REPLY = json.dumps({"coherence": 80, "following": 70, "reason": "clear and on task"})
_VERDICT = json.dumps({"coherence": 60, "following": 40, "reason": "partly right"})

# Reply shapes thinking models and Ollama are documented to produce, each with where it is documented.
SHAPES: dict[str, Shape] = {
    # Ollama >= 0.9 splits the reasoning into `message.thinking` (streamed before the content):
    # https://ollama.com/blog/thinking and https://github.com/ollama/ollama/blob/main/docs/api.md (chat, `think`).
    "thinking_field": Shape(_VERDICT, thinking='Weighing it... {"coherence": 1, "following": 1}'),
    # A model or server that does not split reasoning off sends `thinking: null` and keeps the reasoning in
    # `<think>` tags inside `content` (think unset): https://github.com/run-llama/llama_index/issues/19138;
    # with think=false too: https://github.com/ollama/ollama-python/issues/529.
    "think_tags_in_content": Shape('<think>\nThe response is weak: {"coherence": 2, "following": 2}\n</think>\n\n'
                                   + _VERDICT, thinking_null=True),
    # deepseek-r1 answering with an empty think block first: https://github.com/ollama/ollama/issues/8837.
    "empty_think_block": Shape("<think>\n\n</think>\n\n" + _VERDICT, thinking_null=True),
    # The chat template opened `<think>` itself, so only the closing tag shows in content (DeepSeek-R1's
    # template; the `content.split("</think>")[-1]` workaround in https://github.com/deepseek-ai/DeepSeek-R1/issues/23).
    "closing_tag_only": Shape('It seems fine. {"coherence": 3, "following": 3}</think>' + _VERDICT,
                              thinking_null=True),
    # Structured output with a thinking model: thinking None and a doubled opening brace in content:
    # https://github.com/ollama/ollama-python/issues/523.
    "double_brace": Shape('{\n\n{\n\n"coherence": 60, "following": 40, "reason": "partly right"\n}\n\n  ',
                          thinking_null=True),
    # `format` ignored (think=false on some thinking models): prose instead of JSON:
    # https://github.com/ollama/ollama/issues/14645, https://github.com/ollama/ollama/issues/15260.
    "format_ignored_prose": Shape("**Coherence:** 60/100\n**Instruction following:** 40/100\nPartly right."),
    "format_ignored_unreadable": Shape("The assistant answered the question, mostly."),
    # The answer cut off at `num_predict`/the context: JSON ends mid-object, `done_reason` "length"
    # (https://docs.ollama.com/api/chat: done_reason; truncated JSON: https://github.com/r-spade/ormah/issues/12,
    # https://github.com/BerriAI/litellm/issues/25825).
    "json_cut_off": Shape('{"cohere', done_reason="length"),
    "json_cut_after_one_scale": Shape('{"coherence": 60, "following": ', done_reason="length"),
    # Thinking used up every token: reasoning, no content, done_reason "length" (same sources).
    "thinking_ran_out": Shape("", thinking="Let me consider the response in detail. First,", done_reason="length"),
    # An error after the stream started: the status stays 200 and an `{"error": ...}` line ends the stream
    # (https://docs.ollama.com/api/errors, "Errors that occur while streaming").
    "stream_error": Shape(_VERDICT, error_after=2),
}


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

    def _answer(self, body: dict[str, Any]) -> Shape:
        r = self.reply(body) if callable(self.reply) else self.reply
        if isinstance(r, Shape):
            return r
        return Shape(r) if isinstance(r, str) else Shape(r[0], r[1])

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
                shape = fake._answer(body)
                content, thinking = shape.content, shape.thinking
                base = {"model": model, "created_at": "2025-01-01T00:00:00Z"}

                def message(text: str, think: str | None) -> dict[str, Any]:
                    msg: dict[str, Any] = {"role": "assistant", "content": text}
                    if think is not None:
                        msg["thinking"] = think
                    elif shape.thinking_null:
                        msg["thinking"] = None
                    return msg

                if not body.get("stream", True):
                    return self._json(200, {**base, "message": message(content, thinking), "done": True,
                                            "done_reason": shape.done_reason, "total_duration": 1000,
                                            "eval_count": 10})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                # Thinking arrives first, in pieces, then the content in pieces, then the final chunk.
                pieces = [message("", thinking[i:i + 7]) for i in range(0, len(thinking or ""), 7)]
                pieces += [message(content[i:i + 5], None) for i in range(0, len(content), 5)]
                for k, msg in enumerate(pieces):
                    if shape.error_after is not None and k == shape.error_after:
                        self.wfile.write(b'{"error":"an error was encountered while running the model"}\n')
                        self.wfile.flush()
                        return
                    self.wfile.write((json.dumps({**base, "message": msg, "done": False}) + "\n").encode())
                    self.wfile.flush()
                final = {**base, "message": message("", None), "done": True,
                         "done_reason": shape.done_reason, "total_duration": 1000, "eval_count": 10}
                self.wfile.write((json.dumps(final) + "\n").encode())
                self.wfile.flush()

        return Handler
