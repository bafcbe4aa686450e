"""Classification in llama.cpp itself (through `llama-cpp-python`), from a GGUF export.

Used two ways: an export job checks a GGUF the way its users will run it (the labels llama.cpp gives must
equal the adapter's), and `bench/peer_llamacpp.py` measures llama.cpp beside newslora on the same articles.

The method is llama.cpp's best for this job: newslora's own token ids (`PromptCodec`, so both engines see
the same tokens), the shared prompt prefix evaluated once and its KV cache kept (each article rewinds to
the end of the prefix and evaluates only its own tokens), and the label read from the logits: by default
each label's full log-likelihood (what newslora's score mode computes, so an export check compares like
with like), or, with `mode="first-token"`, the argmax over the labels' first tokens where those differ.
Both take one `llama_decode` an article: a multi-token label's tokens (AG News on SmolLM2: "Sci" "/"
"Tech") are decoded in the same batch right after the article, with logits asked for at the article's
last token and at those label tokens only (a second multi-token label rewinds to the article's end and
takes one more decode). `generate()` is the other way a user runs the export: greedy generation with the
Modelfile's stop strings, what `ollama run` does, through llama-cpp-python's own completion call (which
keeps the prefix's KV cache between calls too).

Threads: llama.cpp's threads wait for each other at every step of a decode by spinning, so on a CPU that
other work also uses, one descheduled thread stalls the rest: on a 2-core machine at load ~6, one thread
classified 5x faster than two (1.9 against 0.4 articles/s), where on an idle one every core is expected
to win. With `threads=None` the classifier chooses: every `RETUNE_EVERY` articles it times one article
at each candidate count (every core, half of them, one) and keeps the fastest, per token.

`llama-cpp-python` compiles llama.cpp from source (~6 min on 2 cores): `make install-llamacpp` builds the
wheel once per machine and caches it. Where it is not installed, `llamacpp_version()` is None and export
verification falls back to transformers' GGUF loader.
"""
from __future__ import annotations

import importlib.metadata
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from workers.modeling.codec import PromptCodec
from workers.modeling.registry import load_tokenizer

# Every verification article and the bench's fits (AG News: ~60-200 tokens a prompt); one decode takes a
# whole article (n_batch), which llama.cpp runs in micro-batches of 512 (n_ubatch).
CONTEXT_TOKENS = 2048
RETUNE_EVERY = 100  # articles between two choices of the thread count (threads=None)


def llamacpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


class LlamaCppClassifier:
    """A GGUF model in llama.cpp, classifying articles into fixed labels.

    Args:
        gguf_path: the GGUF file.
        tokenizer_ref: the Hugging Face tokenizer the model was trained with (the base model's folder or
            preset), so prompts are tokenized exactly as newslora tokenizes them.
        template, instruction, label_names: as stored in the adapter's newslora.json.
        threads: llama.cpp's threads, for an article's decode and for a generated token's; None: chosen
            by timing, again every RETUNE_EVERY articles (see the module docstring).
        mode: "full-label" (each label's whole log-likelihood, as newslora's score mode) or "first-token"
            (argmax over the labels' first tokens; full labels where first tokens collide).
    """

    def __init__(self, gguf_path: Path, tokenizer_ref: str | Path, *, template: str, instruction: str,
                 label_names: Sequence[str], threads: int | None = None, max_article_tokens: int = 1024,
                 mode: str = "full-label"):
        import llama_cpp  # lazy: an optional, compiled dependency (make install-llamacpp)

        self._llama_cpp = llama_cpp
        tokenizer = load_tokenizer(tokenizer_ref)
        self.codec = PromptCodec.build(tokenizer, template=template, instruction=instruction, label_names=label_names)
        self.codec.check_scorable()
        self.max_article_tokens = max_article_tokens
        cores = os.cpu_count() or 1
        self.auto_threads = threads is None
        self.threads = threads or cores  # the count in use
        self._candidates = sorted({cores, max(1, cores // 2), 1}, reverse=True)
        self.thread_choices: list[int] = []  # what each choice picked (threads=None)
        self._until_choice = 0  # articles until the next choice
        # llama-cpp-python sets a single token's decode to half the cores unless told: the same count both ways
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=CONTEXT_TOKENS, n_batch=CONTEXT_TOKENS,
                                   n_threads=self.threads, n_threads_batch=self.threads, logits_all=False,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.use_mode(mode)
        self.llm.reset()
        self.llm.eval(self.codec.prefix_ids)  # the shared prefix: evaluated once, its KV cache kept
        self.prefix_len = self.llm.n_tokens
        self._decode(self.prefix_len, self.codec.tail_ids, 0)  # warm-up: the first decode's set-up not timed

    def use_mode(self, mode: str) -> None:
        """Read labels as `mode` ("full-label" or "first-token") from now on; `self.mode` says what is used."""
        if mode not in ("full-label", "first-token"):
            raise ValueError(f"mode must be 'full-label' or 'first-token', not {mode!r}")
        firsts = [ids[0] for ids in self.codec.label_ids]
        # First tokens that collide cannot tell their labels apart: those need the full labels.
        self.mode = mode if len(set(firsts)) == len(firsts) else "full-label"
        # labels whose tokens after the first are scored too (full-label), each with its branch: the tokens
        # decoded after the article to read the label's later tokens' log-probabilities
        self._branches = [(i, ids[:-1]) for i, ids in enumerate(self.codec.label_ids)
                          if len(ids) > 1] if self.mode == "full-label" else []

    def _decode(self, n_past: int, ids: Sequence[int], logits_from: int) -> np.ndarray:
        """Decode `ids` after the first `n_past` cached tokens (the cache past them dropped), in one batch.

        Returns:
            (len(ids) - logits_from, vocab) float64: the logits after each of ids[logits_from:].
        """
        ids = list(ids)
        if n_past + len(ids) > CONTEXT_TOKENS:
            raise ValueError(f"{n_past + len(ids)} tokens do not fit llama.cpp's context of {CONTEXT_TOKENS}: "
                             f"lower max_article_tokens")
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(batch=ids, n_past=n_past, logits_all=False)
        for i in range(logits_from, len(ids)):
            llm._batch.batch.logits[i] = True
        llm._ctx.decode(llm._batch)
        # keep llama-cpp-python's own record of the cache, so its completion call's prefix matching holds
        llm.input_ids[n_past:n_past + len(ids)] = ids
        llm.n_tokens = n_past + len(ids)
        rows = [np.ctypeslib.as_array(self._llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(self.n_vocab,))
                for i in range(logits_from, len(ids))]
        return np.array(rows, dtype=np.float64)  # a copy: the next decode overwrites llama.cpp's buffer

    @staticmethod
    def _log_softmax(x: np.ndarray) -> np.ndarray:
        m = x.max(axis=-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))

    def scores(self, body_ids: Sequence[int]) -> list[float]:
        """Each label's score after one article (log-probabilities, first token or full label)."""
        body = list(body_ids)
        after_body = self.prefix_len + len(body)
        # the article, and in the same batch the first multi-token label's branch
        first_branch = list(self._branches[0][1]) if self._branches else []
        logp = self._log_softmax(self._decode(self.prefix_len, body + first_branch, len(body) - 1))
        out = [float(logp[0, ids[0]]) for ids in self.codec.label_ids]
        for k, (li, branch) in enumerate(self._branches):
            # row j: after the label's token j, predicting its token j + 1
            rows = logp[1:] if k == 0 else self._log_softmax(self._decode(after_body, branch, 0))
            ids = self.codec.label_ids[li]
            out[li] += float(sum(rows[j, ids[j + 1]] for j in range(len(ids) - 1)))
        return out

    def _bodies(self, items: Sequence[dict[str, Any]]):
        return self.codec.bodies([it["text"] for it in items], max_article_tokens=self.max_article_tokens)

    def _set_threads(self, n: int) -> None:
        self._llama_cpp.llama_set_n_threads(self.llm.ctx, n, n)
        self.threads = n

    def _each(self, bodies: Sequence[Any], work: Callable[[list[int]], Any]) -> list[Any]:
        """work(body ids) for each body, in order; with threads=None, the first article of each choice and
        the next ones, one per candidate thread count, are timed (results kept) and the fastest kept."""
        out: list[Any] = []
        i = 0
        while i < len(bodies):
            if self.auto_threads and self._until_choice <= 0:
                per_token: dict[int, float] = {}
                for n in self._candidates[:len(bodies) - i]:
                    self._set_threads(n)
                    t0 = time.perf_counter()
                    out.append(work(bodies[i].ids))
                    per_token[n] = (time.perf_counter() - t0) / len(bodies[i].ids)
                    i += 1
                best = min(per_token, key=per_token.__getitem__)
                self._set_threads(best)
                self.thread_choices.append(best)
                self._until_choice = RETUNE_EVERY
                continue
            out.append(work(bodies[i].ids))
            self._until_choice -= 1
            i += 1
        return out

    def threads_used(self) -> str:
        """What ran: "2 threads", or with threads=None the choices made ("chosen by timing: 2, 2, 1")."""
        if not self.auto_threads:
            return f"{self.threads} threads"
        return "threads chosen by timing: " + (", ".join(map(str, self.thread_choices)) or "none yet")

    def classify(self, items: Sequence[dict[str, Any]]) -> dict[str, str | None]:
        """item id -> label for each {"id", "text"} item."""
        names = self.codec.label_names
        scores = self._each(self._bodies(items), self.scores)
        return {str(it["id"]): names[int(np.argmax(s))] for it, s in zip(items, scores)}

    def generate(self, items: Sequence[dict[str, Any]], *, max_new_tokens: int,
                 stop: Sequence[str]) -> dict[str, str]:
        """item id -> the response greedy generation gives (temperature 0, no penalties), cut at `stop`.

        What `ollama run` does with the export's Modelfile (its TEMPLATE is this prompt, its stops and
        num_predict are `stop` and `max_new_tokens`): llama-cpp-python's completion call, which finds the
        cached prefix and decodes only the article and the response.
        """
        def answer(body_ids: list[int]) -> str:
            res = self.llm.create_completion(self.codec.prefix_ids + body_ids, max_tokens=max_new_tokens,
                                             temperature=0.0, repeat_penalty=1.0, stop=list(stop))
            return res["choices"][0]["text"]

        texts = self._each(self._bodies(items), answer)
        return {str(it["id"]): text for it, text in zip(items, texts)}

    def close(self) -> None:
        self.llm.close()
