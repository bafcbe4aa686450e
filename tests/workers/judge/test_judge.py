"""The judge: rubrics and parsing, the Ollama backend over real loopback HTTP (with the reply shapes real
servers send), the OpenAI-compatible backend against a real `transformers serve`, the local backend's
text and probability scoring, and the validity check."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.fakes.ollama_server import SHAPES, FakeOllama
from core.context import JobCancelled, LocalContext
from core.contracts.judge import JudgeSummary
from workers.judge import (JUDGE_SCHEMA, RASCHKA, RUBRIC, RUBRIC_VERSION, RUBRICS, TWO_SCORE, ClassifyRun, JudgeAnswer,
                           JudgeInputError, JudgeModelMissing, JudgeUnavailable, LocalJudge, OllamaJudge,
                           OpenAIJudge, Unscorable, answer_dialogue, control_items, dialogue_items, judge_items,
                           judge_messages, judge_validity, make_judge, parse_judgement, parse_raschka, raschka_prompt,
                           run_judge, sample_items, score_distribution, split_thinking, summarize_judgements,
                           validity_line)
from core.specs.judge import JudgeSpec

MODEL = "deepseek-r1:8b"
DIGEST = "sha256:" + "cd" * 32
REFERENCE = Path(__file__).parent / "reference" / "judge-prompt-raschka.md"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


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
# Parsing and rubrics


@pytest.mark.parametrize("content, thinking, expected, method", [
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
    # One scale named: that scale only; the other stays unscored, never copied.
    ('{"coherence": 80}', None, (80, None), "json"),
    ("Coherence: 55", None, (55, None), "named_scores"),
])
def test_parse_recorded_shapes(content, thinking, expected, method):
    j = parse_judgement(content, thinking)
    assert (j.scores["coherence"], j.scores["following"]) == expected
    assert j.method == method


@pytest.mark.parametrize("content, thinking, kind", [
    ("", "I considered the response carefully and... (ran out of tokens)", "empty_answer"),
    ("<think>The answer deserves {\"coherence\": 80, \"following\": 80}", None, "empty_answer"),  # unclosed think
    ("", None, "empty_answer"),
    ("The response is about bananas. 42 bananas.", None, "unparseable"),
    ("asdf qwer zxcv", None, "unparseable"),
    # One number for two scales is used for neither (it used to be copied into both).
    ("85", None, "ambiguous_score"),
    ("Score: 7/10", None, "ambiguous_score"),
    ('{"score": 42}', None, "ambiguous_score"),
])
def test_parse_unscorable(content, thinking, kind):
    with pytest.raises(Unscorable) as e:
        parse_judgement(content, thinking)
    assert e.value.kind == kind


@pytest.mark.parametrize("content, expected, method", [
    ("85", 85, "integer"), ("<think>maybe 20</think>\n72", 72, "integer"), ("Score: 64", 64, "last_number"),
    ("I'd say 40 out of 100", 100, "last_number"),  # the reference's own reading (its last run of digits)
])
def test_parse_raschka_reads_as_the_reference_did(content, expected, method):
    j = parse_raschka(content)
    assert j.scores == {"score": expected} and j.method == method


@pytest.mark.parametrize("content, kind", [("no idea", "unparseable"), ("150", "out_of_range"),
                                           ("<think>it is 90</think>", "empty_answer")])
def test_parse_raschka_unscorable(content, kind):
    with pytest.raises(Unscorable) as e:
        parse_raschka(content)
    assert e.value.kind == kind


def _indented_blocks(md: str) -> list[str]:
    """The markdown's indented (4-space) code blocks, unindented, trailing spaces kept."""
    blocks, cur = [], None
    for line in md.split("\n"):
        if line.startswith("    "):
            cur = (cur or []) + [line[4:]]
        elif line == "" and cur is not None:
            cur.append("")
        elif cur is not None:
            blocks.append("\n".join(cur).rstrip("\n"))
            cur = None
    if cur is not None:
        blocks.append("\n".join(cur).rstrip("\n"))
    return blocks


def test_raschka_rubric_is_the_published_prompt_verbatim():
    """The prompt text against the reference project's, as published (copied with its source into
    tests/workers/judge/reference/): character for character, trailing space included."""
    fmt, prompt = _indented_blocks(REFERENCE.read_text(encoding="utf-8"))[:2]
    item = {"instruction": "Name the capital of France.", "input": "Europe", "reference": "Paris",
            "response": "Paris."}
    formatted = fmt.format(instruction=item["instruction"], input=item["input"])
    expected = prompt.replace("{format_input(entry)}", formatted).replace("{output}", "Paris") \
        .replace("{response}", "Paris.")
    assert raschka_prompt(item) == expected and expected.endswith("Type only the number. ")
    # No input: the "### Input:" block and the blank line before it are left out.
    no_input = fmt.split("\n\n### Input:")[0].format(instruction="Say hi.")
    assert f"`{no_input}`" in raschka_prompt({**item, "instruction": "Say hi.", "input": ""})
    assert RASCHKA.messages(item) == [{"role": "user", "content": expected}]
    assert RASCHKA.num_ctx == 2048 and RASCHKA.schema is None and RASCHKA.scales == ("score",)


def test_split_thinking():
    assert split_thinking("<think>a</think>b<think>c</think>d") == ("bd", "a\nc")
    assert split_thinking("reasoning</think>answer") == ("answer", "reasoning")
    assert split_thinking("answer<think>cut off") == ("answer", "cut off")


def test_messages_carry_rubric_and_fields():
    msgs = judge_messages({"instruction": "Do I", "input": "In", "reference": "Ref", "response": "Resp"})
    assert msgs[0] == {"role": "system", "content": RUBRIC}
    for part in ("Do I", "In", "Ref", "Resp"):
        assert part in msgs[1]["content"]
    assert RUBRIC_VERSION and TWO_SCORE.sha != RASCHKA.sha


def test_sample_items_is_seeded_and_order_free():
    its = items(10)
    a = sample_items(its, 4, seed=1)
    b = sample_items(list(reversed(its)), 4, seed=1)
    assert len(a) == 4 and {x["item_id"] for x in a} == {x["item_id"] for x in b}
    assert {x["item_id"] for x in sample_items(its, 4, seed=2)} != {x["item_id"] for x in a}
    assert sample_items(its, None, 0) == its


def test_spec_checks_backend_and_scoring():
    with pytest.raises(ValueError, match="needs backend=local"):
        JudgeSpec(backend="ollama", scoring="probability")
    with pytest.raises(ValueError, match="needs base_url"):
        JudgeSpec(backend="openai", judge_model="m")


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
    assert [r.item_id for r in rows] == [f"i{k}" for k in range(5)]
    assert [r.coherence for r in rows] == [0, 10, 20, 30, 40]  # the answer, never the reasoning's decoy
    assert [r.following for r in rows] == [100, 90, 80, 70, 60]
    r = rows[1]
    assert r.status == "scored" and r.reason == "gave 10" and r.parse == "json"
    assert (r.judge_backend, r.judge_model, r.judge_digest) == ("ollama", MODEL, DIGEST)
    assert r.rubric_version == RUBRIC_VERSION and r.latency_ms > 0 and r.thinking_chars > 0
    assert r.rubric == "two-score" and r.scoring == "text" and r.control is None
    assert summary.n_scored == 5 and summary.n_unscored == 0
    assert summary.coherence.mean == pytest.approx(20.0)
    assert set(ctx.judge_rows) == {f"i{k}" for k in range(5)}
    req = fake.requests[0]
    assert req["model"] == MODEL and req["format"] == JUDGE_SCHEMA
    assert req["options"] == {"temperature": 0, "seed": 7}
    assert req["stream"] is stream
    assert req["messages"][0]["content"] == RUBRIC


# Each documented reply shape (tests/fakes/ollama_server.py SHAPES): what the judge reads from it, or why not.
SHAPE_OUTCOMES = {
    "thinking_field": ("scored", (60, 40), None),
    "think_tags_in_content": ("scored", (60, 40), None),
    "empty_think_block": ("scored", (60, 40), None),
    "closing_tag_only": ("scored", (60, 40), None),
    "double_brace": ("scored", (60, 40), None),
    "format_ignored_prose": ("scored", (60, 40), None),
    "format_ignored_unreadable": ("unscored", (None, None), "unparseable"),
    "json_cut_off": ("unscored", (None, None), "truncated"),
    "json_cut_after_one_scale": ("partial", (60, None), "truncated"),
    "thinking_ran_out": ("unscored", (None, None), "truncated"),
    "stream_error": ("unscored", (None, None), "stream_error"),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_documented_ollama_reply_shapes(fake, name):
    assert set(SHAPE_OUTCOMES) == set(SHAPES)
    fake.reply = SHAPES[name]
    rows, summary = judge_items(items(1), OllamaJudge(MODEL, host=fake.url), spec(retries=1, backoff_s=0.0),
                                LocalContext())
    status, (coherence, following), kind = SHAPE_OUTCOMES[name]
    r = rows[0]
    assert (r.status, r.coherence, r.following, r.error_kind) == (status, coherence, following, kind), r
    if kind:
        assert r.error
    if name == "stream_error":
        assert r.attempts == 2 and "broke off" in r.error  # retried, then counted
    if status == "partial":
        assert summary.n_partial == 1 and summary.following is None and summary.coherence.n == 1


def test_thinking_without_answer_is_counted_unscored(fake):
    fake.reply = lambda body: ("" if "score-me 10" in body["messages"][-1]["content"] else echo_reply(body)[0],
                               "so much reasoning that the answer never came")
    rows, summary = judge_items(items(3), OllamaJudge(MODEL, host=fake.url), spec(), LocalContext())
    assert [r.status for r in rows] == ["scored", "unscored", "scored"]
    assert rows[1].error_kind == "empty_answer" and "no answer" in rows[1].error
    assert summary.n == 3 and summary.n_scored == 2 and summary.n_unscored == 1
    assert summary.unscored_reasons == {"empty_answer": 1}
    assert summary.coherence.mean == pytest.approx((0 + 20) / 2)  # over scored items, count beside it


def test_one_number_is_never_copied_into_both_scales(fake):
    fake.reply = "85"
    rows, summary = judge_items(items(1), OllamaJudge(MODEL, host=fake.url), spec(), LocalContext())
    assert (rows[0].status, rows[0].coherence, rows[0].following) == ("unscored", None, None)
    assert rows[0].error_kind == "ambiguous_score" and summary.coherence is None


def test_raschka_rubric_over_ollama(fake):
    fake.reply = "<think>It matches the reference.</think>\n\n90"
    its = items(2) + [{"item_id": "empty", "instruction": "Say hi.", "input": "", "reference": "Hi",
                       "response": ""}]
    judge = make_judge(spec(host=fake.url, rubric="raschka", seed=123))
    rows, summary = judge_items(its, judge, spec(rubric="raschka"), LocalContext())
    assert [r.score for r in rows] == [90, 90, 0]
    assert rows[0].parse == "integer" and rows[2].parse == "empty_response" and rows[0].coherence is None
    assert fake.chats == 2  # the empty response is scored 0 without asking, as the reference did
    for req in fake.requests:
        assert req["options"] == {"temperature": 0, "seed": 123, "num_ctx": 2048} and "format" not in req
    assert sorted(r["messages"][0]["content"] for r in fake.requests) == sorted(raschka_prompt(it) for it in its[:2])
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" for r in fake.requests)
    assert summary.scales == ["score"] and summary.score.mean == pytest.approx(60.0)


def test_garbage_answer_is_kept_unscored(fake):
    fake.reply = "I cannot judge this."
    rows, summary = judge_items(items(2), OllamaJudge(MODEL, host=fake.url), spec(), LocalContext())
    assert summary.n_unscored == 2 and summary.coherence is None
    assert rows[0].raw == "I cannot judge this." and rows[0].error_kind == "unparseable"


def test_server_errors_are_retried_with_backoff(fake):
    fake.fail_first = 2
    t0 = time.perf_counter()
    rows, summary = judge_items(items(3), OllamaJudge(MODEL, host=fake.url), spec(concurrency=1, backoff_s=0.1),
                                LocalContext())
    assert summary.n_scored == 3
    assert rows[0].attempts == 3 and rows[1].attempts == 1
    assert fake.chats == 5
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # two waits: 0.1 s then 0.2 s


def test_persistent_server_errors_are_counted(fake):
    fake.fail_first = 10 ** 6
    rows, summary = judge_items(items(3), OllamaJudge(MODEL, host=fake.url), spec(retries=1), LocalContext())
    assert summary.n_unscored == 3 and summary.unscored_reasons == {"server_error": 3}
    assert all(r.attempts == 2 for r in rows)
    assert fake.chats == 6
    assert "500" in rows[0].error and "after 2 attempts" in rows[0].error


def test_slow_server_times_out_and_is_counted(fake):
    fake.delay_s = 1.0
    judge = OllamaJudge(MODEL, host=fake.url, timeout_s=0.2)
    rows, summary = judge_items(items(2), judge, spec(retries=0, timeout_s=0.2), LocalContext())
    assert summary.unscored_reasons == {"timeout": 2}
    assert all(r.latency_ms < 900 for r in rows)


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
    assert summary.n_unscored == 3 and summary.unscored_reasons == {"connection": 3}
    assert "ollama serve" in rows[0].error
    # Down from the start: the job fails at once, saying where it looked.
    with pytest.raises(JudgeUnavailable, match=re.escape(fake.url)):
        judge_items(items(1), OllamaJudge(MODEL, host=fake.url), spec(retries=1), LocalContext())


@pytest.mark.parametrize("concurrency", [1, 3])
def test_concurrency_limit_is_respected(fake, concurrency):
    fake.delay_s = 0.15
    rows, summary = judge_items(items(7), OllamaJudge(MODEL, host=fake.url), spec(concurrency=concurrency),
                                LocalContext())
    assert summary.n_scored == 7
    assert fake.max_concurrent == concurrency


def test_cancel_stops_judging(fake):
    fake.delay_s = 0.3
    with pytest.raises(JobCancelled):
        judge_items(items(10), OllamaJudge(MODEL, host=fake.url), spec(concurrency=1),
                    LocalContext(cancel_after_checks=1))
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
    assert s.n == 0 and s.coherence is None and s.latency_ms is None
    assert s.validity is None and s.evidence is False


def test_summary_is_stored_with_its_rubric_scales_only(fake):
    """The summary's JSON (kept in the job result and the evaluation document) names the rubric's own scales
    and loads back equal through its contract."""
    fake.reply = "90"
    _, summary = judge_items(items(2), make_judge(spec(host=fake.url, rubric="raschka")), spec(rubric="raschka"),
                             LocalContext())
    stored = json.loads(summary.model_dump_json())
    assert stored["scales"] == ["score"] and stored["score"]["mean"] == 90.0 and stored["format_version"] == 1
    assert "coherence" not in stored and "following" not in stored
    assert JudgeSummary.validated(stored, where="test") == summary
    two = summarize_judgements([{"item_id": "a", "status": "scored", "coherence": 10.0, "following": 20.0}])
    assert set(two.model_dump()) >= {"coherence", "following"} and "score" not in two.model_dump()


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
    assert [r.status for r in rows] == ["scored", "unscored", "scored"]
    assert rows[1].error_kind == "judge_error" and "out of memory" in rows[1].error
    assert summary.unscored_reasons == {"judge_error": 1} and rows[0].judge_digest == "d0"


# --------------------------------------------------------------------------------------------------
# The validity check


def classify_items(n: int) -> list[dict]:
    return [{"item_id": f"a{k}", "instruction": "Classify this news article.", "input": f"article {k}",
             "reference": LABELS[k % 4], "response": LABELS[(k + k // 4) % 4]} for k in range(n)]


def test_control_items_pair_correct_and_wrong_answers():
    ctl = control_items(classify_items(12), label_names=LABELS, n_pairs=5, n_repeats=2, seed=1)
    assert len(ctl) == 5 * 2 + 2 * 2
    first = [c for c in ctl if c["repeat"] == 0]
    for gold, wrong in zip(first[::2], first[1::2]):
        assert (gold["control"], wrong["control"]) == ("gold", "wrong") and gold["pair_id"] == wrong["pair_id"]
        assert gold["response"] == gold["reference"] and wrong["response"] in LABELS
        assert wrong["response"] != wrong["reference"] and gold["input"] == wrong["input"]
    assert [c["item_id"] for c in ctl if c["repeat"]] == [c["item_id"] + "#2" for c in first[:4]]
    assert control_items(classify_items(12), label_names=LABELS, n_pairs=5, n_repeats=0, seed=1) == \
        [c for c in ctl if not c["repeat"]]  # seeded
    dia = control_items(dialogue_items(), n_pairs=4, n_repeats=0, seed=0)
    for real, shuffled in zip(dia[::2], dia[1::2]):
        assert (real["control"], shuffled["control"]) == ("real", "shuffled")
        assert real["response"] == real["reference"] != shuffled["response"]
    assert control_items(classify_items(4), label_names=LABELS, n_pairs=0) == []


def _rows(ctl: list[dict], score) -> list[dict]:
    return [{**c, "status": "scored", "following": score(c)} for c in ctl]


def test_judge_validity_separates_a_judge_from_chance():
    ctl = control_items(classify_items(40), label_names=LABELS, n_pairs=30, n_repeats=10, seed=0)
    good = judge_validity(_rows(ctl, lambda c: 90.0 if c["control"] == "gold" else 10.0), "following")
    assert (good.n_pairs, good.k_correct, good.beats_chance) == (30, 30, True)
    assert good.ci[0] > 0.85 and good.self_agreement.k_within == 20
    flat = judge_validity(_rows(ctl, lambda c: 50.0), "following")  # ties count against the judge
    assert flat.k_correct == 0 and flat.n_ties == 30 and not flat.beats_chance
    # A judge that scores at random (seeded, so the same scores every run) prefers the correct answer in 19 of
    # 30 pairs, more than half, but its Wilson interval reaches below chance: it does not beat chance, and it
    # rarely agrees with itself on a repeated item.
    rng = random.Random(0)
    coin_scores = {c["item_id"]: float(rng.randrange(101)) for c in ctl}
    coin = judge_validity(_rows(ctl, lambda c: coin_scores[c["item_id"]]), "following")
    assert (coin.n_pairs, coin.k_correct, coin.n_ties, coin.n_unscored_pairs) == (30, 19, 0, 0)
    assert coin.rate > coin.chance and coin.ci[0] < coin.chance and not coin.beats_chance
    assert (coin.self_agreement.n, coin.self_agreement.k_within) == (20, 2)
    assert "does NOT beat chance" in validity_line(coin)
    unscored = judge_validity([{**c, "status": "unscored", "following": None} for c in ctl], "following")
    assert unscored.n_unscored_pairs == 30 and not unscored.beats_chance
    assert "does NOT beat chance" in validity_line(flat) and "beats chance" in validity_line(good)
    assert "not evidence" in validity_line(None)


def test_run_judge_scores_the_control_set_beside_the_items(fake):
    """A classify job's answers through `run_judge`: the sample, the control pairs built from the same articles,
    and a summary that says whether the judge told them apart (this fake prefers the reference's answer)."""
    def reply(body):
        user = body["messages"][-1]["content"]
        ref = re.search(r"### Reference answer\n(.*?)\n", user).group(1)
        resp = re.search(r"### Response to grade\n(.*?)\n", user).group(1)
        return json.dumps({"coherence": 80, "following": 95 if resp == ref else 5})
    fake.reply = reply
    its = classify_items(16)

    class Inputs:
        def classify_run(self, job_id):
            return ClassifyRun(job_id=job_id, mode="generate", label_names=LABELS, model="m",
                               predictions=[{"item_id": it["item_id"], "gold": it["reference"],
                                             "response": it["response"]} for it in its],
                               records={it["item_id"]: {"instruction": it["instruction"], "input": it["input"]}
                                        for it in its})

        def adapter(self, adapter_id):
            raise AssertionError("classify mode loads no adapter")

    ctx = LocalContext()
    s = spec(host=fake.url, classify_job_id=3, sample=12, control_pairs=12, control_repeats=3)
    result = run_judge(s, Inputs(), ctx)
    summ = result["summary"]
    assert result["classify_job_id"] == 3 and summ["n"] == 12 and len(ctx.judge_rows) == 12 + 24 + 6
    v = summ["validity"]
    assert (v["n_pairs"], v["k_correct"], v["beats_chance"]) == (12, 12, True) and summ["evidence"]
    assert v["self_agreement"]["k_within"] == 6
    assert any("prefers the correct answer in 12 of 12" in e["message"] for e in ctx.events)
    with pytest.raises(JudgeInputError, match="generate-mode"):
        class ScoreMode(Inputs):
            def classify_run(self, job_id):
                return ClassifyRun(job_id=job_id, mode="score", predictions=[])
        run_judge(s, ScoreMode(), LocalContext())


# --------------------------------------------------------------------------------------------------
# The local backend: text and probability scoring


def test_next_token_probs_match_plain_forward_passes(tiny_model_dir):
    """The token-tree pass (left padding, shared prefix cache, continuations as branches) against one plain
    forward pass per prompt + continuation."""
    from transformers import AutoModelForCausalLM

    from workers.modeling.forward import prefix_kv
    from workers.modeling.next_token import common_prefix, next_token_probs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    shared = [5, 6, 7, 8, 9]
    prompts = [shared + torch.randint(10, 1000, (n,), generator=g).tolist() for n in (7, 3, 12)]
    conts, cands = [[], [11, 12], [11, 13], [11], [50, 51, 52]], [17, 18, 19, 20]
    P = common_prefix(prompts)
    assert P == 5
    for kv, cut in ((None, 0), (prefix_kv(model, prompts[0][:P]), P)):
        got = next_token_probs(model, [p[cut:] for p in prompts], conts, cands, pad_id=0, prefix_kv=kv,
                               prefix_len=cut)  # (3, 5, 4)
        for i, p in enumerate(prompts):
            for j, c in enumerate(conts):
                with torch.no_grad():
                    want = model(torch.tensor([p + c])).logits[0, -1].softmax(-1)[cands]
                torch.testing.assert_close(got[i, j], want, atol=1e-5, rtol=1e-4)


def test_score_distribution_reads_multi_digit_scores():
    p = torch.zeros(1, 11, 10)
    p[0, 0, 8] = 0.5  # first digit "8" ...
    p[0, 0, 1] = 0.5  # ... or "1"
    p[0, 8, 5] = 1.0  # "8" is always followed by "5": 85
    p[0, 1, 0] = 1.0  # "1" is followed by "0" ...
    p[0, 10, 0] = 0.5  # ... and "10" by "0" half the time: 100 or 10
    dist, mass = score_distribution(p)
    assert mass.item() == pytest.approx(1.0)
    assert dist[0, 85].item() == pytest.approx(0.5) and dist[0, 100].item() == pytest.approx(0.25)
    assert dist[0, 10].item() == pytest.approx(0.25) and dist.sum().item() == pytest.approx(1.0)
    q = torch.zeros(1, 11, 10)
    q[0, 0, 7] = 0.1  # only 10% digit mass, then nothing follows "7": the score is 7
    dist, mass = score_distribution(q)
    assert mass.item() == pytest.approx(0.1) and dist[0, 7].item() == pytest.approx(1.0)


@pytest.mark.parametrize("rubric", ["two-score", "raschka"])
def test_probability_judge_scores_every_item(tiny_model_dir, rubric):
    """A random tiny model cannot write a verdict, but probability scoring always reads one: every item scored,
    with its spread, and the same scores however the items are batched."""
    judge = LocalJudge(str(tiny_model_dir), dtype="fp32", device="cpu", rubric=RUBRICS[rubric],
                       scoring="probability")
    its = items(5) + control_items(classify_items(4), label_names=LABELS, n_pairs=2, n_repeats=1)
    rows, summary = judge_items(its[:5], judge, JudgeSpec(backend="local", scoring="probability", rubric=rubric,
                                                           sample=None, batch_size=3), LocalContext(),
                                controls=its[5:])
    assert summary.n == 5 and summary.n_scored == 5 and summary.n_unscored == 0
    scales = ("score",) if rubric == "raschka" else ("coherence", "following")
    for r in rows:
        assert r.status == "scored" and r.scoring == "probability" and r.parse == "expected"
        assert all(0 <= getattr(r, s) <= 100 and r.spread[s] >= 0 for s in scales) and 0 < r.score_mass <= 1
    one_by_one, _ = judge_items(its[:5], judge, JudgeSpec(backend="local", scoring="probability", rubric=rubric,
                                                           sample=None, batch_size=1), LocalContext())
    for a, b in zip(rows, one_by_one):
        assert [getattr(a, s) for s in scales] == pytest.approx([getattr(b, s) for s in scales], abs=0.05)
    assert summary.validity.n_pairs == 2 and summary.validity.self_agreement.n == 2


def test_local_text_judge_tiny_model_is_counted_unscored(tiny_model_dir):
    from workers.modeling.registry import model_digest
    judge = LocalJudge(str(tiny_model_dir), max_new_tokens=12, dtype="fp32", device="cpu")
    its = answer_dialogue(dialogue_items()[:3], judge._model, judge._tok, "alpaca", max_new_tokens=6)
    assert all(isinstance(i["response"], str) for i in its) and its[0]["item_id"] == "interest-rate"
    rows, summary = judge_items(its, judge, JudgeSpec(backend="local", sample=None, concurrency=2), LocalContext())
    # A random 2-layer model writes garbage: every item is kept, none scored.
    assert summary.n == 3 and summary.n_unscored == 3 and summary.n_scored == 0
    assert {r.error_kind for r in rows} <= {"unparseable", "empty_answer", "ambiguous_score"}
    assert rows[0].judge_backend == "local" and rows[0].judge_digest == model_digest(tiny_model_dir)


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


# --------------------------------------------------------------------------------------------------
# The OpenAI-compatible backend against a real server


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_serve(smollm2_dir, tmp_path_factory):
    """`transformers serve` (transformers' own OpenAI-compatible server) with SmolLM2 on loopback."""
    port = _free_port()
    log = tmp_path_factory.mktemp("tserve") / "serve.log"
    exe = Path(sys.executable).with_name("transformers")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                                 "--dtype", "float32", str(smollm2_dir)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                # One torch thread: on a shared 2-core machine more threads thrash (10x slower).
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not come up in 120 s: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url + "/v1", str(smollm2_dir)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.smollm2
def test_openai_backend_against_transformers_serve(transformers_serve):
    """One item under each rubric through a real OpenAI-compatible server: the request goes out, the answer comes
    back and is recorded scored or unscored with its reason, and at least one answer is read as a score (SmolLM2
    is a weak judge, so the item is one it answers with a number: greedy, fp32, the same answer every run)."""
    base_url, model = transformers_serve
    item = {"item_id": "i0", "instruction": "What is 2 + 2?", "input": "", "reference": "4", "response": "4"}
    scored = []
    for rubric in ("two-score", "raschka"):
        s = spec(backend="openai", base_url=base_url, judge_model=model, rubric=rubric, max_new_tokens=8,
                 retries=0, timeout_s=120, concurrency=1)
        judge = make_judge(s)
        assert isinstance(judge, OpenAIJudge) and judge.use_schema is (rubric == "two-score")
        ctx = LocalContext()
        rows, summary = judge_items([item], judge, s, ctx)
        r = rows[0]
        assert summary.n == 1 and set(ctx.judge_rows) == {"i0"}
        assert (r.judge_backend, r.judge_model, r.rubric, r.attempts) == ("openai", model, rubric, 1)
        assert r.judge_digest.startswith("models:") and r.raw is not None and r.latency_ms > 0, r
        assert r.status == "scored" or r.error_kind in ("unparseable", "empty_answer", "ambiguous_score",
                                                        "truncated", "missing_scale", "out_of_range"), r
        if r.status == "scored":
            assert all(isinstance(getattr(r, scale), float) for scale in RUBRICS[rubric].scales), r
            assert summary.n_scored == 1
            scored.append(rubric)
    # The server's answer was read as a score at least once (SmolLM2 answers the raschka prompt "2 + 2 = 4").
    assert scored, "no rubric's answer from the server was scored"
    # A model the server does not serve stops the job, naming what it serves.
    with pytest.raises(JudgeModelMissing, match="not served"):
        judge_items(items(1), make_judge(spec(backend="openai", base_url=base_url, judge_model="nope")), s,
                    LocalContext())
    # Nobody listening: retried, then the job fails at once naming the server.
    dead = spec(backend="openai", base_url=f"http://127.0.0.1:{_free_port()}/v1", judge_model=model, retries=1)
    with pytest.raises(JudgeUnavailable, match="cannot reach"):
        judge_items(items(1), make_judge(dead), dead, LocalContext())


# --------------------------------------------------------------------------------------------------
# The real SmolLM2 as a probability judge


@pytest.mark.smollm2
def test_smollm2_probability_judge_runs_on_a_control_set(smollm2_dir):
    judge = LocalJudge(str(smollm2_dir), dtype="fp32", device="cpu", scoring="probability")
    ctl = control_items(classify_items(8), label_names=LABELS, n_pairs=3, n_repeats=1)
    rows, summary = judge_items(classify_items(1), judge, JudgeSpec(backend="local", scoring="probability",
                                                                    sample=None), LocalContext(), controls=ctl)
    assert summary.n_scored == 1 and all(r.status == "scored" for r in rows)
    assert all(0 < r.score_mass <= 1 and 0 <= r.following <= 100 for r in rows)
    v = summary.validity
    assert v.n_pairs == 3 and v.k_correct + v.n_ties + v.n_unscored_pairs <= 3
    assert v.self_agreement.n == 2 and v.self_agreement.mean_abs_diff < 1.0  # deterministic
