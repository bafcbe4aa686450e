"""OpenAI fine-tuning files (chat and prompt/completion) converted by the prep code into classification records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.context import LocalContext
from core.specs.prep import PrepSpec, SourceSpec
from workers.data.chat_formats import NOT_TRAINED, RecordProblem, chat_example, openai_format_of, \
    prompt_completion_example
from workers.data.loaders import load_source
from workers.data.prep import PrepError, load_records, prepare_dataset, read_meta

SYSTEM = "Classify the news article: World, Sports, Business or Sci/Tech."


def chat(text: str, label: str, *, system: str | None = SYSTEM, weight: int | None = None) -> dict:
    answer = {"role": "assistant", "content": label} | ({"weight": weight} if weight is not None else {})
    return {"messages": ([{"role": "system", "content": system}] if system else []) +
            [{"role": "user", "content": text}, answer]}


def write_lines(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs), encoding="utf-8")
    return path


LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def articles(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"article number {i} about {LABELS[i % 4].lower()}", LABELS[i % 4]) for i in range(start, start + n)]


def test_chat_example_takes_the_last_trained_answer_and_the_user_message_before_it():
    ex = chat_example({"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Sports"}, {"role": "user", "content": [{"type": "text", "text": "second"}]},
        {"role": "assistant", "content": "World", "weight": 0}]})
    assert (ex.text, ex.label, ex.instruction) == ("first", "Sports", "sys")  # the weight-0 turn is not the label
    ex = chat_example(chat("text", "  Business \n", system=None))
    assert (ex.text, ex.label, ex.instruction) == ("text", "Business", None)


@pytest.mark.parametrize("obj, reason, says", [
    ({"messages": []}, "missing_field", "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "missing_field", "no assistant message"),
    ({"messages": [{"role": "assistant", "content": "World"}]}, "missing_field", "no user message"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "bad_message", "robot"),
    (chat("x", "World", weight=2), "bad_weight", "weight is 2"),
    (chat("x", "World", weight=0), NOT_TRAINED, "weight 0"),
    (chat("x", "  "), "empty_label", "empty"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "W"}]}, "bad_text", "content"),
])
def test_chat_lines_that_are_no_example_say_why(obj, reason, says):
    with pytest.raises(RecordProblem) as e:
        chat_example(obj)
    assert e.value.reason == reason and says in e.value.detail


def test_prompt_completion_and_format_detection():
    ex = prompt_completion_example({"prompt": "p", "completion": " Sports"})
    assert (ex.text, ex.label) == ("p", "Sports")
    with pytest.raises(RecordProblem, match="'completion'"):
        prompt_completion_example({"prompt": "p"})
    assert openai_format_of({"messages": []}) == "openai_chat"
    assert openai_format_of({"prompt": "", "completion": ""}) == "prompt_completion"
    assert openai_format_of({"text": "", "label": ""}) is None


def test_loader_numbers_malformed_lines_and_keeps_the_shared_system_message(tmp_path):
    f = write_lines(tmp_path / "train.jsonl", [chat("a", "World"), "{not json", chat("b", "Sports", weight=0), [1],
                                               chat("c", "Sports")])
    src = load_source("train", SourceSpec(path=str(f), format="openai_chat"), None)
    assert [(r.row, r.problem) for r in src.rows] == [(1, None), (2, "bad_json"), (3, NOT_TRAINED),
                                                      (4, "not_an_object"), (5, None)]
    assert src.rows[0].texts == ("a",) and src.rows[0].label == "World"
    assert src.info["instruction"] == SYSTEM
    f2 = write_lines(tmp_path / "mixed.jsonl", [chat("a", "World"), chat("b", "Sports", system="other")])
    assert load_source("train", SourceSpec(path=str(f2), format="openai_chat"), None).info["instruction"] is None


def test_prep_turns_a_chat_file_into_records_weight_zero_lines_skipped(tmp_path):
    rows = [chat(t, y) for t, y in articles(16)] + [chat("never trained", "World", weight=0)]
    train = write_lines(tmp_path / "train.jsonl", rows)
    valid = write_lines(tmp_path / "valid.jsonl", [chat(t, y) for t, y in articles(4, start=100)] +
                        [chat("article number 0 about world", "World")])  # also in train: dropped from train
    spec = PrepSpec(train=SourceSpec(path=str(train), format="openai_chat"), test=None,
                    validation=SourceSpec(path=str(valid), format="openai_chat"), label_names=LABELS,
                    validation_fraction=0.0)
    out = tmp_path / "ds"
    meta = prepare_dataset(spec, out, LocalContext())
    assert meta["instruction"] == SYSTEM  # the system message is the instruction
    assert meta["dropped"] == {NOT_TRAINED: 1, "in_validation": 1}
    train_recs, val_recs = load_records(out, "train"), load_records(out, "validation")
    assert len(train_recs) == 15 and len(val_recs) == 5
    assert {r["output"] for r in train_recs} == set(LABELS)
    assert all(r["id"].startswith("validation-") for r in val_recs)
    assert "never trained" not in {r["input"] for r in train_recs}
    assert read_meta(out).splits["test"].records == 0


def test_prep_reads_prompt_completion_and_fails_naming_the_bad_line(tmp_path):
    f = write_lines(tmp_path / "pc.jsonl", [{"prompt": t, "completion": y} for t, y in articles(8)])
    out = tmp_path / "ds"
    prepare_dataset(PrepSpec(train=SourceSpec(path=str(f), format="prompt_completion"), test=None,
                             validation_fraction=0.25), out, LocalContext())
    assert {r["output"] for r in load_records(out, "train")} == set(LABELS)
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "World"}, {"prompt": "b"}])
    with pytest.raises(PrepError, match=r"bad.jsonl line 2 has no 'completion' field"):
        prepare_dataset(PrepSpec(train=SourceSpec(path=str(bad), format="prompt_completion"), test=None),
                        tmp_path / "ds2", LocalContext())
