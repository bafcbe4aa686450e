from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.paths import SpecPath
from core.specs.base import Spec, is_local_path, model_paths

AG_NEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]


class SourceSpec(Spec):
    """Where one split's rows come from."""

    path: str = Field(description="hub id (e.g. fancyzhx/ag_news), or a local file: AG News CSV, JSONL, CSV, parquet")
    format: Literal["auto", "hub", "agnews_csv", "jsonl", "csv", "parquet", "openai_chat", "prompt_completion"] = Field(
        default="auto", description="openai_chat / prompt_completion: an OpenAI fine-tuning file ({messages: [...]} "
        "or {prompt, completion} a line; text_columns and label_column do not apply)")
    split: str | None = Field(default=None, description="hub split name (train/test)")
    text_columns: list[str] = Field(default_factory=lambda: ["text"], min_length=1,
                                    description="columns joined with a space to make the text (e.g. [title, body]); "
                                                "ignored for agnews_csv, whose text is title + description")
    label_column: str = Field(default="label", description="label names, or integer ids (see first_label_id)")
    first_label_id: int = Field(default=0, description="the integer id of label_names[0] in this source: 0 (the "
                                                       "Hugging Face convention) or 1 (as in the AG News CSV)")
    classes_file: str | None = Field(default=None, description="AG News classes.txt (default: beside the CSV); "
                                                               "its line n names integer label n")

    def is_local_file(self) -> bool:
        """Whether `path` names a local file, not a hub id: format is not `hub`, and the path has no `/`
        (`owner/name` is a hub id's shape), exists here, or is spelled as a path (`./`, `/`, `~`)."""
        return self.format != "hub" and ("/" not in self.path or Path(self.path).expanduser().exists()
                                         or is_local_path(self.path))


    def paths(self, prefix: str = "") -> list[SpecPath]:
        """The source (a local file, or a hub id where it is not one) and the classes file."""
        out = [SpecPath(f"{prefix}path", self.path, hub=not self.is_local_file())]
        if self.classes_file:
            out.append(SpecPath(f"{prefix}classes_file", self.classes_file))
        return out


class PrepSpec(Spec):
    """Turn a labeled news set into Alpaca-style instruction records (train / validation / test)."""

    name: str = Field(default="ag_news", min_length=1, max_length=200)
    train: SourceSpec = Field(default_factory=lambda: SourceSpec(path="fancyzhx/ag_news", split="train"))
    test: SourceSpec | None = Field(default_factory=lambda: SourceSpec(path="fancyzhx/ag_news", split="test"))
    validation: SourceSpec | None = Field(default=None, description="the validation split's rows; not given: "
                                          "validation_fraction of the train source")
    label_names: list[str] | None = Field(
        default=None, min_length=2, description="the labels, in label-id order. Not given: where every label in "
        "the data is a name (not an integer id), the distinct names found, sorted (AG News's four, in AG News's "
        "order, where they are all among those); else AG News's four (World, Sports, Business, Sci/Tech)")
    instruction: str | None = Field(default=None, description="default: lists the label names")
    template: Literal["alpaca", "chat"] = "alpaca"
    validation_fraction: float = Field(default=0.05, ge=0, lt=1)
    seed: int = 0
    max_per_class: int | None = Field(default=None, ge=1,
                                      description="cap per class in train (a seeded sample); validation then keeps "
                                                  "validation_fraction of train + validation")
    test_max_per_class: int | None = Field(default=None, ge=1, description="cap per class in test (a seeded sample)")
    keep_raw: bool = Field(default=False, description="keep the text as read, before cleaning, in a `raw` field")
    line_breaks: Literal["space", "newline"] = Field(
        default="space", description="what an AG News backslash line break becomes in the cleaned text")
    on_bad_rows: Literal["fail", "skip"] = "fail"
    max_text_chars: int = Field(default=20_000, ge=10, description="longer texts are bad rows")
    tokenizer: str | None = Field(default=None, description="model preset or checkpoint for token-length percentiles")

    @model_validator(mode="after")
    def _distinct_labels(self) -> "PrepSpec":
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError("label_names has duplicates")
        return self

    def paths(self) -> list[SpecPath]:
        """Each split's source (a local file, or a hub id) and classes file, and the tokenizer."""
        out = [p for split, src in (("train", self.train), ("test", self.test), ("validation", self.validation))
               if src is not None for p in src.paths(f"{split}.")]
        return out + model_paths("tokenizer", self.tokenizer)
