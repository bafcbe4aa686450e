"""OpenAI request/response shapes for classification (core/openai_shapes.py): pure functions, no server."""
from __future__ import annotations

import json
import math

import pytest

from core.contracts.prediction import PredictionRow
from core.openai_shapes import (CHAT, COMPLETIONS, AnswerOptions, RequestError, chat_body, completion_body,
                                parse_batch, parse_chat, parse_completion, prediction_line)

LABELS = ["World", "Sports"]


def _line(cid, body, url=CHAT):
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def _chat(text="t", **kw):
    return {"model": "m", "messages": [{"role": "system", "content": "Classify."},
                                       {"role": "user", "content": text}], **kw}


def test_a_chat_request_reads_as_the_last_user_text_the_choices_and_the_system_instruction():
    req = parse_chat(_chat("hello", guided_choice=LABELS, logprobs=True, top_logprobs=2))
    assert req.texts == ["hello"] and req.choices == LABELS and req.instruction == "Classify."
    assert req.answer == AnswerOptions("m", True, 2)
    assert parse_chat(_chat(structured_outputs={"choice": ["a", "b"]})).choices == ["a", "b"]
    parts = parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]})
    assert parts.texts == ["x"] and parts.choices is None


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    (_chat(guided_choice=["a", "a"]), "guided_choice"),
    (_chat(n=2), "n"), (_chat(stream=True), "stream"), (_chat(top_logprobs=21), "top_logprobs"),
])
def test_a_bad_chat_request_names_its_field(body, param):
    with pytest.raises(RequestError) as e:
        parse_chat(body)
    assert e.value.param == param


def test_completions_take_several_prompts_up_to_a_limit():
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}, max_prompts=2).texts == ["a", "b"]
    with pytest.raises(RequestError, match="batch"):
        parse_completion({"model": "m", "prompt": ["a", "b"]}, max_prompts=1)


def test_batch_lines_are_checked_one_by_one_with_their_numbers():
    text = "\n".join([_line("a", _chat(guided_choice=LABELS)), "{oops", "",
                      _line("a", _chat(guided_choice=LABELS)), _line("b", _chat(), url=COMPLETIONS),
                      _line("c", {**_chat(guided_choice=LABELS), "model": "other"}),
                      _line("d", _chat(guided_choice=LABELS))])
    parsed = parse_batch(text, CHAT)
    assert [ln.custom_id for ln in parsed.lines] == ["a", "d"]
    assert [(e.line, e.code) for e in parsed.errors] == [(2, "invalid_json"), (4, "duplicate_custom_id"),
                                                          (5, "mismatched_endpoint"), (6, "mixed_requests")]
    assert parsed.total == 6 and all(f"line {e.line}" in e.message for e in parsed.errors)


def test_answers_carry_the_label_and_its_log_probabilities():
    row = PredictionRow(item_id="a", label="Sports", probs={"World": 0.25, "Sports": 0.75})
    body = chat_body([row], AnswerOptions("ft:x", True, 2), created=1, completion_id="chatcmpl-1")
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Sports" and body["model"] == "ft:x"
    content = choice["logprobs"]["content"][0]
    assert content["token"] == "Sports" and math.isclose(content["logprob"], math.log(0.75))
    assert [t["token"] for t in content["top_logprobs"]] == ["Sports", "World"]
    assert chat_body([row], AnswerOptions("m"))["choices"][0]["logprobs"] is None
    comp = completion_body([row], AnswerOptions("m", True, 1))["choices"][0]
    assert comp["text"] == "Sports" and list(comp["logprobs"]["top_logprobs"][0]) == ["Sports"]


def test_a_failed_prediction_is_an_error_line_with_a_status():
    ok = prediction_line(CHAT, "a", PredictionRow(item_id="a", label="World", probs={"World": 1.0}),
                         AnswerOptions("m"), created=1)
    bad = prediction_line(CHAT, "b", PredictionRow(item_id="b", error="empty text", flags=["rejected"]),
                          AnswerOptions("m"), created=1)
    assert ok["response"]["status_code"] == 200 and ok["custom_id"] == "a" and ok["id"].startswith("batch_req_")
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"]["error"]["message"] == "empty text"
