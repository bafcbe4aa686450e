"""Classification in llama.cpp itself (through `llama-cpp-python`), from a GGUF export.

Used two ways: an export job checks a GGUF the way its users will run it (the labels llama.cpp gives must
equal the adapter's), and `bench/peer_llamacpp.py` measures llama.cpp beside newslora on the same articles.

The method is llama.cpp's best for this job: newslora's own token ids (`PromptCodec`, so both engines see
the same tokens), the shared prompt prefix evaluated once and its KV cache kept (each article rewinds to
the end of the prefix and evaluates only its own tokens), and the label read from the logits: by default
each label's full log-likelihood (its tokens evaluated one by one after the article: what newslora's score
mode computes, so an export check compares like with like), or, with `mode="first-token"` (the fastest:
one forward an article), the argmax over the labels' first tokens where those differ.

`llama-cpp-python` compiles llama.cpp from source (~6 min on 2 cores): `make install-llamacpp` builds the
wheel once per machine and caches it. Where it is not installed, `llamacpp_version()` is None and export
verification falls back to transformers' GGUF loader.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workers.modeling.codec import PromptCodec
from workers.modeling.registry import load_tokenizer

CONTEXT_TOKENS = 2048  # the verification articles and the bench's fit (AG News: ~60-200 tokens a prompt)


def llamacpp_version() -> str | None:
    """The installed llama-cpp-python's version, or None."""
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class LlamaCppRun:
    labels: dict[str, str | None]  # item id -> label
    seconds: float
    mode: str  # "first-token" | "full-label"


class LlamaCppClassifier:
    """A GGUF model in llama.cpp, classifying articles into fixed labels.

    Args:
        gguf_path: the GGUF file.
        tokenizer_ref: the Hugging Face tokenizer the model was trained with (the base model's folder or
            preset), so prompts are tokenized exactly as newslora tokenizes them.
        template, instruction, label_names: as stored in the adapter's newslora.json.
        threads: llama.cpp's threads (default: every core).
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
        self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=CONTEXT_TOKENS, n_batch=512,
                                   n_threads=threads or os.cpu_count() or 1, logits_all=False, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        firsts = [ids[0] for ids in self.codec.label_ids]
        if mode not in ("full-label", "first-token"):
            raise ValueError(f"mode must be 'full-label' or 'first-token', not {mode!r}")
        # First tokens that collide cannot tell their labels apart: those need the full labels.
        self.mode = mode if len(set(firsts)) == len(firsts) else "full-label"
        self.llm.reset()
        self.llm.eval(self.codec.prefix_ids)  # the shared prefix: evaluated once, its KV cache kept
        self.prefix_len = self.llm.n_tokens

    def _last_logits(self) -> np.ndarray:
        ptr = self._llama_cpp.llama_get_logits(self.llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)  # (vocab,) a copy

    @staticmethod
    def _log_softmax(x: np.ndarray) -> np.ndarray:
        m = x.max()
        return x - m - np.log(np.exp(x - m).sum())

    def _eval_from(self, n_past: int, ids: Sequence[int]) -> np.ndarray:
        self.llm.n_tokens = n_past  # rewind: eval() drops the KV cache past this point
        self.llm.eval(list(ids))
        return self._last_logits()

    def scores(self, body_ids: Sequence[int]) -> list[float]:
        """Each label's score after one article (log-probabilities, first token or full label)."""
        logits = self._eval_from(self.prefix_len, body_ids)
        first = self._log_softmax(logits)
        if self.mode == "first-token":
            return [float(first[ids[0]]) for ids in self.codec.label_ids]
        after_body = self.prefix_len + len(body_ids)
        out = []
        for ids in self.codec.label_ids:
            total = float(first[ids[0]])
            for k in range(1, len(ids)):
                lp = self._log_softmax(self._eval_from(after_body + k - 1, [ids[k - 1]]))
                total += float(lp[ids[k]])
            out.append(total)
        return out

    def classify(self, items: Sequence[dict[str, Any]]) -> dict[str, str | None]:
        """item id -> label for each {"id", "text"} item."""
        bodies = self.codec.bodies([it["text"] for it in items], max_article_tokens=self.max_article_tokens)
        names = self.codec.label_names
        out: dict[str, str | None] = {}
        for it, body in zip(items, bodies):
            s = self.scores(body.ids)
            out[str(it["id"])] = names[int(np.argmax(s))]
        return out

    def close(self) -> None:
        self.llm.close()
