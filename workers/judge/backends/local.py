"""A transformers causal LM judging in-process: text scoring (generate and parse, like a server) or
probability scoring (the expected score under the judge's next-token distribution over the digits)."""
from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

from workers.judge.backends.base import JudgeAnswer
from workers.judge.rubrics import TWO_SCORE, Judgement, Rubric
from workers.modeling.registry import load_model, model_digest

LOCAL_DEFAULT_MODEL = "smollm2-135m"
LOCAL_DEFAULT_MAX_NEW_TOKENS = 128


def score_distribution(p: Any) -> Any:
    """Probability of every score 0..100 from the digit distributions of one scale.

    Args:
        p: (batch, 11, 10) digit probabilities (full softmax): row 0 after the answer prefix, row d after
           prefix + digit d (d = 1..9), row 10 after prefix + "10".

    Returns:
        ((batch, 101) distribution, (batch,) probability mass the first token put on digits).

    The first digit is renormalised over the digits (the answer prefix asks for a number, so a reading
    always exists); a following non-digit ends the number; a third digit is only read after "10" (100).
    """
    import torch  # lazy: importing the judge package must not load torch (the API and the CLI import it)

    mass = p[:, 0].sum(-1)  # (B,)
    first = p[:, 0] / mass.clamp_min(1e-12).unsqueeze(-1)  # (B, 10)
    B = p.shape[0]
    dist = torch.zeros(B, 101, dtype=p.dtype)
    dist[:, 0] = first[:, 0]
    for d in range(1, 10):
        second = p[:, d]  # (B, 10) after "d"
        dist[:, d] += first[:, d] * (1 - second.sum(-1)).clamp_min(0)
        dist[:, 10 * d:10 * d + 10] += first[:, d:d + 1] * second
    hundred = dist[:, 10] * p[:, 10, 0]  # "10" then "0"
    dist[:, 10] -= hundred
    dist[:, 100] += hundred
    return dist / dist.sum(-1, keepdim=True).clamp_min(1e-12), mass


class LocalJudge:
    """A transformers causal LM judging in-process.

    `scoring="text"` generates the verdict greedily (`workers.modeling.generation.generate`) and parses it
    like a server's. `scoring="probability"` writes no text: after each scale's fixed answer prefix it reads
    the next-token distribution over the digit tokens (one batched forward pass per item, the rubric's
    shared system text run once per batch) and reports the expected score with its standard deviation.

    One call at a time (`max_concurrency` 1, and a lock besides): threads would only contend for the same
    cores and make each item's latency meaningless.
    """

    backend = "local"
    max_concurrency = 1

    def __init__(self, model: str = LOCAL_DEFAULT_MODEL, *, max_new_tokens: int = LOCAL_DEFAULT_MAX_NEW_TOKENS,
                 dtype: str = "auto", device: str = "auto", rubric: Rubric = TWO_SCORE,
                 scoring: str = "text") -> None:
        if scoring not in ("text", "probability"):
            raise ValueError(f"unknown scoring {scoring!r}: use 'text' or 'probability'")
        self.model = str(model)
        self.max_new_tokens, self.rubric, self.scoring = max_new_tokens, rubric, scoring
        self._model, self._tok = load_model(self.model, dtype=dtype, device=device)
        self._lock = threading.Lock()
        self._digest: str | None = None
        if scoring == "probability":
            self._digits, self._prefix_ids = self._score_tokens()

    def digest(self) -> str | None:
        if self._digest is None:
            self._digest = model_digest(self.model)
        return self._digest

    def _prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self._tok, "chat_template", None):
            text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\nVerdict:\n"
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def _score_tokens(self) -> tuple[list[int], dict[str, list[int]]]:
        """The digit token ids, and each scale's answer-prefix ids; checks that digits are single tokens."""
        enc = lambda s: self._tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        prefixes = {s: enc(p) if p else [] for s, p in self.rubric.answer_prefixes.items()}
        digits = []
        for d in range(10):
            ids = enc(f"{d}")
            if len(ids) != 1:
                raise ValueError(f"scoring=probability needs a tokenizer that writes each digit as one token; "
                                 f"{self.model}'s writes {d!r} as {len(ids)}: use scoring=text")
            digits.append(ids[0])
        for s, p in self.rubric.answer_prefixes.items():
            if p and enc(p + "85") != prefixes[s] + [digits[8], digits[5]]:
                raise ValueError(f"scoring=probability: {self.model}'s tokenizer merges the answer prefix "
                                 f"{p!r} with the digits after it: use scoring=text")
        return digits, prefixes

    def ask(self, messages: list[dict[str, str]]) -> JudgeAnswer:
        from workers.modeling.generation import generate  # lazy: torch (see score_distribution)

        ids = self._prompt_ids(messages)
        with self._lock:
            text = generate(self._model, self._tok, [ids], max_new_tokens=self.max_new_tokens)[0]
        return JudgeAnswer(text)

    def score_batch(self, items: Sequence[Mapping[str, Any]]) -> list[Judgement]:
        """Probability scoring of a batch: the expected score per scale, its spread and the digit mass."""
        import torch  # lazy: torch (see score_distribution)

        from workers.modeling.forward import prefix_kv  # lazy: torch, as above
        from workers.modeling.next_token import common_prefix, next_token_probs  # lazy: torch, as above

        prompts = [self._prompt_ids(self.rubric.messages(it)) for it in items]
        conts: list[list[int]] = []
        for scale in self.rubric.scales:
            a = self._prefix_ids[scale]
            conts += [a] + [a + [self._digits[d]] for d in range(1, 10)] + [a + [self._digits[1], self._digits[0]]]
        P = common_prefix(prompts)
        pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self._tok.eos_token_id
        with self._lock:
            kv = prefix_kv(self._model, prompts[0][:P]) if P else None
            probs = next_token_probs(self._model, [p[P:] for p in prompts], conts, self._digits, pad_id=pad_id,
                                     prefix_kv=kv, prefix_len=P)  # (B, 11 * n_scales, 10)
        values = torch.arange(101, dtype=torch.float32)
        out: list[dict[str, tuple[float, float, float]]] = [{} for _ in items]
        for k, scale in enumerate(self.rubric.scales):
            dist, mass = score_distribution(probs[:, 11 * k:11 * k + 11])  # (B, 101), (B,)
            mean = dist @ values  # (B,)
            std = (dist @ values ** 2 - mean ** 2).clamp_min(0).sqrt()
            for i in range(len(items)):
                out[i][scale] = (float(mean[i]), float(std[i]), float(mass[i]))
        return [Judgement({s: round(v[0], 3) for s, v in o.items()}, "", "expected",
                          {s: round(v[1], 3) for s, v in o.items()}, min(v[2] for v in o.values())) for o in out]
