"""`PromptCodec`: one tokenizer bound to one prompt (template + instruction) and one label set.

Every prompt of a job starts with the same prefix (template header + instruction); each item adds its
article and the template's tail (up to where the response starts). The codec tokenizes each prompt
whole, exactly as training saw it, then splits it by character offsets into the shared prefix (whose
key/value cache is computed once) and the item's body; only the article is ever cut, never the template.
Labels are tokenized as they follow a prompt (jointly with it), never on their own: SentencePiece
tokenizers would otherwise add a word-start marker that the prompt's newline does not produce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from workers.modeling.prompts import split_prompt

IGNORE = -100  # label value that the loss skips (the Hugging Face convention)
# A stand-in article: keeps the prefix's last newline from merging with the tail's first ones.
_PROBE = "x"


class LabelTokensError(ValueError):
    """The label names cannot be scored apart (empty, repeated, or one's tokens a prefix of another's)."""


@dataclass
class Body:
    """One item's prompt tokens after the shared prefix: article (cut if needed) + the template's tail."""

    ids: list[int]
    truncated: bool


@dataclass
class Example:
    """One tokenized training record: the full sequence and its labels (Hugging Face layout, not shifted)."""

    id: str
    input_ids: list[int]  # prefix + article + tail + label + EOS
    labels: list[int]  # IGNORE on prompt tokens unless train_on_input
    prefix_len: int  # tokens of the shared prefix at the start of input_ids
    prompt_len: int  # tokens before the response
    label_index: int
    truncated: bool

    @property
    def body(self) -> list[int]:
        """The prompt tokens after the shared prefix (what label scoring runs on)."""
        return self.input_ids[self.prefix_len:self.prompt_len]


@dataclass(frozen=True)
class ScorePlan:
    """Where score mode reads each label's token log-probabilities (see `score_plan`).

    Attributes:
        branches: per label, the tokens appended after the prompt (each seeing the prompt and itself).
        term_pos: per scored term, its position among the gathered ones (0: the last prompt token,
            then the branch tokens in order).
        term_tok: the token whose log-probability the term reads.
        term_label: which sum the term adds to: label b, or with EOS, n_labels + b for label b's EOS.
    """

    branches: list[list[int]]
    term_pos: list[int]
    term_tok: list[int]
    term_label: list[int]

    @property
    def branch_len(self) -> int:
        return sum(len(b) for b in self.branches)


def score_plan(label_ids: Sequence[Sequence[int]], eos_id: int | None = None) -> ScorePlan:
    """The scoring gather plan of labels of tokens `label_ids`.

    A label of k tokens t0..t(k-1) contributes a branch of t0..t(k-2): t0 is predicted at the last prompt
    token, t(j) at its branch's token j-1. With `eos_id`, the branch holds all k tokens and one more term
    reads EOS at its last token: the label's whole training response (label + EOS), for a validation loss
    from the scoring forward itself.
    """
    n = len(label_ids)
    branches, pos, tok, lab = [], [], [], []
    offset = 1  # gathered position 0 is the last prompt token
    for li, ids in enumerate(label_ids):
        ids = list(ids)
        branch = ids if eos_id is not None else ids[:-1]
        pos.append(0)
        tok.append(ids[0])
        lab.append(li)
        for j in range(1, len(ids)):
            pos.append(offset + j - 1)
            tok.append(ids[j])
            lab.append(li)
        if eos_id is not None:
            pos.append(offset + len(ids) - 1)
            tok.append(eos_id)
            lab.append(n + li)
        branches.append(branch)
        offset += len(branch)
    return ScorePlan(branches=branches, term_pos=pos, term_tok=tok, term_label=lab)


@dataclass
class PromptCodec:
    """Token ids shared by every item of a job, and the encoders built on them.

    Build with `PromptCodec.build(tokenizer, template=..., instruction=..., label_names=...)`.

    Attributes:
        prefix_ids: the shared prompt prefix (template header + instruction), with any BOS.
        tail_ids: the template's tail as it follows an article.
        label_ids: each label's tokens as they follow the prompt.
        plan: score mode's gather plan of the labels (`score_plan`); `eos_plan` adds each label's EOS.
    """

    tokenizer: Any
    template: str
    instruction: str
    label_names: list[str]
    prefix_text: str
    tail_text: str
    prefix_ids: list[int]
    tail_ids: list[int]
    label_ids: list[list[int]]
    eos_id: int | None
    plan: ScorePlan
    eos_plan: ScorePlan | None = None  # None where the tokenizer has no EOS token

    @classmethod
    def build(cls, tokenizer: Any, *, template: str, instruction: str, label_names: Sequence[str]) -> "PromptCodec":
        """Tokenize the parts every item shares.

        Raises:
            LabelTokensError: labels empty, repeated or tokenizing to nothing.
        """
        names = list(label_names)
        if not names:
            raise LabelTokensError("label_names is empty: give the label names to classify into")
        if len(set(names)) != len(names):
            raise LabelTokensError(f"label_names repeats a name: {names}")
        prefix, tail = split_prompt(instruction, "", template=template, tokenizer=tokenizer)
        prefix_ids = tokenizer(prefix, add_special_tokens=True)["input_ids"]
        probe = tokenizer(prefix + _PROBE + tail, add_special_tokens=True, return_offsets_mapping=True)
        head = probe["input_ids"]
        tail_from = len(prefix) + len(_PROBE)
        tail_ids = [t for t, (s, _) in zip(probe["input_ids"], probe["offset_mapping"]) if s >= tail_from]
        label_ids = []
        for name in names:
            full = tokenizer(prefix + _PROBE + tail + name, add_special_tokens=True)["input_ids"]
            ids = full[len(head):] if full[:len(head)] == head else tokenizer(name, add_special_tokens=False)["input_ids"]
            if not ids:
                raise LabelTokensError(f"label {name!r} tokenizes to nothing: rename it in the prep job")
            label_ids.append(ids)
        eos_id = tokenizer.eos_token_id
        return cls(tokenizer=tokenizer, template=template, instruction=instruction, label_names=names,
                   prefix_text=prefix, tail_text=tail, prefix_ids=prefix_ids, tail_ids=tail_ids,
                   label_ids=label_ids, eos_id=eos_id, plan=score_plan(label_ids),
                   eos_plan=score_plan(label_ids, eos_id) if eos_id is not None else None)

    # ------------------------------------------------------------------ labels

    def check_scorable(self) -> None:
        """Score mode compares label likelihoods: no label's tokens may be a prefix of another's.

        Raises:
            LabelTokensError: naming the two labels.
        """
        for i, a in enumerate(self.label_ids):
            for j, b in enumerate(self.label_ids):
                if i != j and len(a) <= len(b) and b[:len(a)] == a:
                    raise LabelTokensError(
                        f"label {self.label_names[i]!r}'s tokens are a prefix of {self.label_names[j]!r}'s, so "
                        f"score mode would never prefer the longer one; rename a label or use mode='generate'")

    @property
    def branch_len(self) -> int:
        """Tokens score mode appends after each prompt (the label branches)."""
        return self.plan.branch_len

    @property
    def tail_len(self) -> int:
        return len(self.tail_ids)

    @property
    def longest_response(self) -> int:
        """Tokens of the longest label plus EOS (what a training sequence adds after the prompt)."""
        return max(len(ids) for ids in self.label_ids) + 1

    # ------------------------------------------------------------------ items

    def article_budget(self, max_seq_len: int, *, reserve: int) -> int:
        """Article tokens that fit in `max_seq_len` beside the template and `reserve` tokens after the prompt."""
        return max_seq_len - len(self.prefix_ids) - self.tail_len - reserve

    def bodies(self, texts: Sequence[str], *, max_article_tokens: int) -> list[Body]:
        """Per-item prompt tokens after the shared prefix, each article cut to `max_article_tokens`.

        Raises:
            ValueError: no room for the article at all.
        """
        if max_article_tokens < 1:
            raise ValueError(f"no room for the article: the prompt template alone fills the model's context "
                             f"(max article tokens {max_article_tokens}); use a model with a longer context")
        if not texts:  # a fast tokenizer fails on an empty batch (IndexError); a dataset may have no validation
            return []
        plen = len(self.prefix_text)
        P = len(self.prefix_ids)
        enc = self.tokenizer([self.prefix_text + t + self.tail_text for t in texts], add_special_tokens=True,
                             return_offsets_mapping=True)
        out = []
        for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
            art_end = plen + len(text)
            # First token starting at or after the prefix's end: normally index P. If the article's first
            # characters merged with the prefix's last token, re-start at the next token boundary.
            start = P if ids[:P] == self.prefix_ids else next(
                (i for i, (s, _) in enumerate(offs) if s >= plen), len(ids))
            tail_start = next((i for i in range(start, len(ids)) if offs[i][0] >= art_end and offs[i][1] > offs[i][0]),
                              len(ids))
            article, tail = ids[start:tail_start], ids[tail_start:]
            if len(article) > max_article_tokens:  # cut: the whole template tail follows, never a part
                out.append(Body(ids=article[:max_article_tokens] + self.tail_ids, truncated=True))
            else:
                out.append(Body(ids=article + tail, truncated=False))
        return out

    def examples(self, records: Sequence[dict[str, Any]], *, max_seq_len: int,
                 train_on_input: bool = False) -> list[Example]:
        """Training examples of records ({"id", "input", "output"}): the response is label + EOS.

        Raises:
            ValueError: max_seq_len leaves too little room for the article, or an output is not a label.
        """
        budget = self.article_budget(max_seq_len, reserve=self.longest_response)
        if budget < 8:
            raise ValueError(f"max_seq_len {max_seq_len} leaves {budget} tokens for the article "
                             f"(template {len(self.prefix_ids) + self.tail_len}, longest label + EOS "
                             f"{self.longest_response}): raise max_seq_len to at least {max_seq_len - budget + 32}")
        index = {name: i for i, name in enumerate(self.label_names)}
        out = []
        for n, (rec, body) in enumerate(zip(records, self.bodies([r["input"] for r in records],
                                                                 max_article_tokens=budget))):
            if rec["output"] not in index:
                raise ValueError(f"record {rec.get('id', n)}: output {rec['output']!r} is not one of {self.label_names}")
            li = index[rec["output"]]
            response = self.label_ids[li] + [self.eos_id]
            prompt = self.prefix_ids + body.ids
            labels = (list(prompt) if train_on_input else [IGNORE] * len(prompt)) + response
            out.append(Example(id=str(rec.get("id", n)), input_ids=prompt + response, labels=labels,
                               prefix_len=len(self.prefix_ids), prompt_len=len(prompt), label_index=li,
                               truncated=body.truncated))
        return out
