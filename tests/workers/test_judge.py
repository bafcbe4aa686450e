"""The judge: parsing recorded answer shapes, the Ollama backend over real loopback HTTP, the local backend."""
from __future__ import annotations

import json
import re
import time

import pytest

from tests.fakes.ollama_server import FakeOllama
from workers.context import JobCancelled, LocalContext
from workers.judge import (JUDGE_SCHEMA, RUBRIC, RUBRIC_VERSION, JudgeAnswer, JudgeModelMissing, JudgeUnavailable,
                           LocalJudge, OllamaJudge, Unscorable, answer_dialogue, dialogue_items, judge_items,
                           judge_messages, make_judge, parse_judgement, sample_items, split_thinking,
                           summarize_judgements)
from workers.specs.judge import JudgeSpec

MODEL = "deepseek-r1:8b"
DIGEST = "sha256:" + "cd" * 32


def items(n: int) -> list[dict]:
    # The response carries the score the fake judge will give it, so rows can be matched to items.
    return [{"item_id": f"i{k}", "instruction": "Explain X.", "input": "", "reference": "X is Y.",
             "response": f"score-me {10 * k % 100}"} for k in range(n)]


def echo_reply(body: dict) -> tuple[str, str]:
    """A thinking judge: reasoning (with a decoy verdict) apart, the answer scores what the response asks."""
    user = body["messages"][-1]["content"]
    x = int(re.search(r"score-me (\d+)", user).group(1))
    decoy = json.dumps({"coherence": 1, "following": 1, "reason": "decoy in the reasoning"})
    return json.dumps({"coherence": x, "following": 100 - x, "reason": f"gave {x}"}), f"Let me think. {decoy}"


def spec(**kw) -> JudgeSpec:
    base = dict(judge_model=MODEL, sample=None, retries=2, backoff_s=0.01, timeout_s=5.0, concurrency=2)
    return JudgeSpec(**{**base, **kw})


# --------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("content, thinking, expected, method", [
    ("85", None, (85, 85), "single_score"),
    ("Score: 7/10", None, (70, 70), "single_score"),
    ('{"coherence": 80, "following": 65, "reason": "fine"}', None, (80, 65), "json"),
    ('<think>Coherence: 10. {"coherence": 5, "following": 5}</think>\n{"coherence": 90, "following": 95, "reason": "ok"}',
     None, (90, 95), "json"),
    # deepseek-r1 through a template that already opened the think block: only "</think>" shows.
    ('I think it is poor. {"coherence": 3, "following": 3}</think>{"coherence": 60, "following": 40}', None,
     (60, 40), "json"),
    ('{"coherence": 70, "following": 50, "reason": "x"}', 'thinking field: {"coherence": 1, "following": 1}',
     (70, 50), "json"),
    ('Verdict:\n```json\n{"coherence": "9/10", "following": 100}\n```', None, (90, 100), "json_in_text"),
    ("**Coherence:** 75\n**Instruction following:** 60\nReason: ok", None, (75, 60), "named_scores"),
    ('{"coherence": 150, "following": -3, "reason": "out of range"}', None, (100, 0), "json"),
    ('{"score": 42}', None, (42, 42), "json"),
])
def test_parse_recorded_shapes(content, thinking, expected, method):
    j = parse_judgement(content, thinking)
    assert (j.coherence, j.following) == pytest.approx(expected)
    assert j.method == method


@pytest.mark.parametrize("content, thinking, kind", [
    ("", "I considered the response carefully and... (ran out of tokens)", "empty_answer"),
    ("<think>The answer deserves {\"coherence\": 80, \"following\": 80}", None, "empty_answer"),  # unclosed think
    ("", None, "empty_answer"),
    ("The response is about bananas. 42 bananas.", None, "unparseable"),
    ('{"coherence": 80}', None, "unparseable"),  # one scale is not a verdict
    ("asdf qwer zxcv", None, "unparseable"),
])
def test_parse_unscorable(content, thinking, kind):
    with pytest.raises(Unscorable) as e:
        parse_judgement(content, thinking)
    assert e.value.kind == kind


def test_split_thinking():
    assert split_thinking("<think>a</think>b<think>c</think>d") == ("bd", "a\nc")
    assert split_thinking("reasoning</think>answer") == ("answer", "reasoning")
    assert split_thinking("answer<think>cut off") == ("answer", "cut off")


def test_messages_carry_rubric_and_fields():
    msgs = judge_messages({"instruction": "Do I", "input": "In", "reference": "Ref", "response": "Resp"})
    assert msgs[0] == {"role": "system", "content": RUBRIC}
    for part in ("Do I", "In", "Ref", "Resp"):
        assert part in msgs[1]["content"]
    assert RUBRIC_VERSION


def test_sample_items_is_seeded_and_order_free():
    its = items(10)
    a = sample_items(its, 4, seed=1)
    b = sample_items(list(reversed(its)), 4, seed=1)
    assert len(a) == 4 and {x["item_id"] for x in a} == {x["item_id"] for x in b}
    assert {x["item_id"] for x in sample_items(its, 4, seed=2)} != {x["item_id"] for x in a}
    assert sample_items(its, None, 0) == its


# --------------------------------------------------------------------------------------------------
# Ollama over loopback HTTP


@pytest.fixture
def fake():
    with FakeOllama(models={MODEL: DIGEST}, reply=echo_reply) as f:
        yield f


@pytest.mark.parametrize("stream", [True, False])
def test_ollama_judge_scores_and_records(fake, stream):
    judge = OllamaJudge(MODEL, host=fake.url, stream=stream, seed=7)
    ctx = LocalContext()
    rows, summary = judge_items(items(5), judge, spec(stream=stream), ctx)
    assert [r["item_id"] for r in rows] == [f"i{k}" for k in range(5)]
    assert [r["coherence"] for r in rows] == [0, 10, 20, 30, 40]  # the answer, never the reasoning's decoy
    assert [r["following"] for r in rows] == [100, 90, 80, 70, 60]
    r = rows[1]
    assert r["status"] == "scored" and r["reason"] == "gave 10" and r["parse"] == "json"
    assert (r["backend"], r["judge_model"], r["model_digest"]) == ("ollama", MODEL, DIGEST)
    assert r["rubric_version"] == RUBRIC_VERSION and r["latency_ms"] > 0 and r["thinking_chars"] > 0
    assert summary["n_scored"] == 5 and summary["n_unscored"] == 0
    assert summary["coherence"]["mean"] == pytest.approx(20.0)
    assert set(ctx.predictions) == {f"i{k}" for k in range(5)}
    req = fake.requests[0]
    assert req["model"] == MODEL and req["format"] == JUDGE_SCHEMA
    assert req["options"] == {"temperature": 0, "seed": 7}
    assert req["stream"] is stream
    assert req["messages"][0]["content"] == RUBRIC


def test_thinking_without_answer_is_counted_unscored(fake):
    fake.reply = lambda body: ("" if "score-me 10" in body["messages"][-1]["content"] else echo_reply(body)[0],
                               "so much reasoning that the answer never came")
    rows, summary = judge_items(items(3), OllamaJudge(MODEL, host=fake.url), spec(), LocalContext())
    assert [r["status"] for r in rows] == ["scored", "unscored", "scored"]
    assert rows[1]["error_kind"] == "empty_answer" and "no answer" in rows[1]["error"]
    assert summary["n"] == 3 and summary["n_scored"] == 2 and summary["n_unscored"] == 1
    assert summary["unscored_reasons"] == {"empty_answer": 1}
    assert summary["coherence"]["mean"] == pytest.approx((0 + 20) / 2)  # over scored items, count beside it


def test_garbage_answer_is_kept_unscored(fake):
    fake.reply = "I cannot judge this."
    rows, summary = judge_items(items(2), OllamaJudge(MODEL, host=fake.url), spec(), LocalContext())
    assert summary["n_unscored"] == 2 and summary["coherence"] is None
    assert rows[0]["raw"] == "I cannot judge this." and rows[0]["error_kind"] == "unparseable"


def test_server_errors_are_retried_with_backoff(fake):
    fake.fail_first = 2
    t0 = time.perf_counter()
    rows, summary = judge_items(items(3), OllamaJudge(MODEL, host=fake.url), spec(concurrency=1, backoff_s=0.1),
                                LocalContext())
    assert summary["n_scored"] == 3
    assert rows[0]["attempts"] == 3 and rows[1]["attempts"] == 1
    assert fake.chats == 5
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # two waits: 0.1 s then 0.2 s


def test_persistent_server_errors_are_counted(fake):
    fake.fail_first = 10 ** 6
    rows, summary = judge_items(items(3), OllamaJudge(MODEL, host=fake.url), spec(retries=1), LocalContext())
    assert summary["n_unscored"] == 3 and summary["unscored_reasons"] == {"server_error": 3}
    assert all(r["attempts"] == 2 for r in rows)
    assert fake.chats == 6
    assert "500" in rows[0]["error"] and "after 2 attempts" in rows[0]["error"]


def test_slow_server_times_out_and_is_counted(fake):
    fake.delay_s = 1.0
    judge = OllamaJudge(MODEL, host=fake.url, timeout_s=0.2)
    rows, summary = judge_items(items(2), judge, spec(retries=0, timeout_s=0.2), LocalContext())
    assert summary["unscored_reasons"] == {"timeout": 2}
    assert all(r["latency_ms"] < 900 for r in rows)


def test_model_not_pulled_names_the_pull_command(fake):
    with pytest.raises(JudgeModelMissing, match=r"ollama pull qwen3:0.6b"):
        judge_items(items(2), OllamaJudge("qwen3:0.6b", host=fake.url), spec(), LocalContext())
    # Deleted on the server after the digest was read: the chat's 404 stops the job the same way.
    judge = OllamaJudge(MODEL, host=fake.url)
    assert judge.digest() == DIGEST
    fake.models.clear()
    with pytest.raises(JudgeModelMissing, match=f"ollama pull {MODEL}"):
        judge_items(items(4), judge, spec(), LocalContext())


def test_model_digest_from_tags_or_show(fake):
    fake.models["tiny"] = "sha256:00"
    assert OllamaJudge("tiny:latest", host=fake.url).digest() == "sha256:00"  # "tiny" is "tiny:latest"
    # Served but not in /api/tags: /api/show decides it exists and gives a stable digest.
    fake.models["remote:1b"] = "sha256:11"
    fake.unlisted.add("remote:1b")
    d = OllamaJudge("remote:1b", host=fake.url).digest()
    assert d.startswith("show:") and d == OllamaJudge("remote:1b", host=fake.url).digest()


def test_server_down(fake):
    judge = OllamaJudge(MODEL, host=fake.url)
    assert judge.digest() == DIGEST
    fake.stop()
    # Down mid-run: every item is retried, then counted with its reason.
    rows, summary = judge_items(items(3), judge, spec(retries=1), LocalContext())
    assert summary["n_unscored"] == 3 and summary["unscored_reasons"] == {"connection": 3}
    assert "ollama serve" in rows[0]["error"]
    # Down from the start: the job fails at once, saying where it looked.
    with pytest.raises(JudgeUnavailable, match=re.escape(fake.url)):
        judge_items(items(1), OllamaJudge(MODEL, host=fake.url), spec(retries=1), LocalContext())


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit_is_respected(fake, concurrency):
    fake.delay_s = 0.15
    rows, summary = judge_items(items(7), OllamaJudge(MODEL, host=fake.url), spec(concurrency=concurrency),
                                LocalContext())
    assert summary["n_scored"] == 7
    assert fake.max_concurrent == concurrency


def test_cancel_stops_judging(fake):
    fake.delay_s = 0.3
    with pytest.raises(JobCancelled):
        judge_items(items(10), OllamaJudge(MODEL, host=fake.url), spec(concurrency=1), LocalContext(cancel_after_checks=1))
    assert fake.chats < 10


def test_sample_limits_items(fake):
    rows, _ = judge_items(items(10), OllamaJudge(MODEL, host=fake.url), spec(sample=4, seed=3), LocalContext())
    assert len(rows) == 4 and fake.chats == 4


def test_make_judge_and_bad_items(fake):
    j = make_judge(spec(host=fake.url))
    assert isinstance(j, OllamaJudge) and j.host == fake.url
    with pytest.raises(ValueError, match="lacks response"):
        judge_items([{"item_id": "1", "instruction": "x"}], j, spec(), LocalContext())


def test_summary_of_nothing():
    s = summarize_judgements([])
    assert s["n"] == 0 and s["coherence"] is None and s["latency_ms"] is None


# --------------------------------------------------------------------------------------------------
# Local backend and the dialogue set


def test_dialogue_items_are_general_instructions():
    its = dialogue_items()
    assert 10 <= len(its) <= 20
    assert len({i["item_id"] for i in its}) == len(its)
    assert all(i["instruction"] and i["reference"] for i in its)
    assert not any("classify" in i["instruction"].lower() for i in its)
    assert any(i["input"] for i in its) and any(not i["input"] for i in its)


def test_dialogue_items_bad_file(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match="needs an id and an instruction"):
        dialogue_items(bad)


def test_local_judge_tiny_model_is_counted_unscored(tiny_model_dir):
    from workers.models import model_digest
    judge = LocalJudge(str(tiny_model_dir), max_new_tokens=12, dtype="fp32", device="cpu")
    its = answer_dialogue(dialogue_items()[:3], judge._model, judge._tok, "alpaca", max_new_tokens=6)
    assert all(isinstance(i["response"], str) for i in its) and its[0]["item_id"] == "interest-rate"
    rows, summary = judge_items(its, judge, JudgeSpec(backend="local", sample=None, concurrency=2), LocalContext())
    # A random 2-layer model writes garbage: every item is kept, none scored.
    assert summary["n"] == 3 and summary["n_unscored"] == 3 and summary["n_scored"] == 0
    assert {r["error_kind"] for r in rows} <= {"unparseable", "empty_answer"}
    assert rows[0]["backend"] == "local" and rows[0]["model_digest"] == model_digest(tiny_model_dir)


@pytest.mark.smollm2
def test_local_judge_smollm2_runs(smollm2_dir):
    judge = LocalJudge(str(smollm2_dir), max_new_tokens=40, dtype="fp32", device="cpu")
    its = [dict(i, response=i["reference"]) for i in dialogue_items()[:2]]
    rows, summary = judge_items(its, judge, JudgeSpec(backend="local", sample=None), LocalContext())
    assert summary["n"] == 2 and summary["n_scored"] + summary["n_unscored"] == 2
    for r in rows:
        assert r["raw"] is not None
        if r["status"] == "scored":
            assert 0 <= r["coherence"] <= 100 and 0 <= r["following"] <= 100


def test_any_backend_failure_costs_one_item_only():
    class Flaky:
        backend, model = "stub", "stub-1"

        def digest(self):
            return "d0"

        def ask(self, messages):
            if "score-me 10" in messages[-1]["content"]:
                raise RuntimeError("CUDA out of memory")
            return JudgeAnswer('{"coherence": 50, "following": 50}')

    rows, summary = judge_items(items(3), Flaky(), spec(), LocalContext())
    assert [r["status"] for r in rows] == ["scored", "unscored", "scored"]
    assert rows[1]["error_kind"] == "judge_error" and "out of memory" in rows[1]["error"]
    assert summary["unscored_reasons"] == {"judge_error": 1} and rows[0]["model_digest"] == "d0"
