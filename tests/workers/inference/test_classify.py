"""Batched classification on a seeded tiny Llama (and briefly the real SmolLM2)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from core.context import JobCancelled, LocalContext
from workers.inference.classify import (AdapterError, AdapterRef, InferenceEngine, InputFileError, classify_items, get_engine,
                           load_items, parse_label)
from workers.modeling.codec import LabelTokensError, PromptCodec
from workers.modeling.scoring import score_labels
from workers.modeling.registry import model_digest
from workers.modeling.prompts import default_instruction, render_prompt
from core.specs.classify import ClassifySpec

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
INSTRUCTION = default_instruction(LABELS)
TEXTS = [
    "Stocks fell sharply on Wall Street as oil prices rose.",
    "The home team won the championship after extra time.",
    "A new chip promises faster phones and longer battery life.",
    "Leaders met in Geneva to discuss the ceasefire.",
    "Quarterly profits beat forecasts at the carmaker.",
    "Astronomers found water ice on a distant moon, a surprising result for planetary science.",
    "Short one.",
]


def _items(texts=TEXTS, labels=None):
    return [{"id": f"i{n}", "text": t, "label": (labels[n] if labels else None)} for n, t in enumerate(texts)]


def _spec(**kw) -> ClassifySpec:
    return ClassifySpec(items=[{"id": "x", "text": "x"}], **{"dtype": "fp32", **kw})


def _classify(engine, items, *, adapter=None, ctx=None, model_ref="tiny", **spec_kw):
    ctx = ctx or LocalContext()
    summary = classify_items(items, engine=engine, model_ref=model_ref, adapter=adapter, label_names=LABELS,
                             instruction=INSTRUCTION, template="alpaca", spec=_spec(**spec_kw), ctx=ctx)
    return summary, ctx


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> InferenceEngine:
    return get_engine(str(tiny_model_dir), dtype="fp32", device="cpu")


def _naive_loglik(model, tok, text: str, plan) -> torch.Tensor:
    """Sum of label-token log-probs from full forward passes over prompt + label (no cache, no batching)."""
    prompt = tok(render_prompt(INSTRUCTION, text))["input_ids"]
    out = []
    for lab in plan.label_ids:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + lab])).logits[0].float(), -1)
        out.append(sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(lab)))
    return torch.tensor(out)


# ---------------------------------------------------------------- exactness of the fast path

def test_prefix_cache_and_branches_match_full_forward(engine):
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=LABELS)
    assert plan.branch_len == sum(len(x) - 1 for x in plan.label_ids) > 0  # Sci/Tech is several tokens
    enc = plan.bodies(TEXTS, max_article_tokens=500)
    with engine.use(None) as key:
        cached = score_labels(engine.model, plan, [e.ids for e in enc], engine.prefix_kv(key, plan.prefix_ids))
        uncached = score_labels(engine.model, plan, [plan.prefix_ids + e.ids for e in enc], None)
        naive = torch.stack([_naive_loglik(engine.model, engine.tokenizer, t, plan) for t in TEXTS])
    assert cached.shape == (len(TEXTS), len(LABELS))
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=0)


def test_item_tokens_equal_whole_prompt_tokenization(engine):
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=LABELS)
    enc = plan.bodies(TEXTS, max_article_tokens=500)
    for text, e in zip(TEXTS, enc):
        assert plan.prefix_ids + e.ids == engine.tokenizer(render_prompt(INSTRUCTION, text))["input_ids"]
        assert not e.truncated


def test_batching_gives_same_labels_and_probs_as_one_at_a_time(engine):
    _, batched = _classify(engine, _items(), batch_size=4)
    _, single = _classify(engine, _items(), batch_size=1)
    assert set(batched.predictions) == {f"i{n}" for n in range(len(TEXTS))}
    for iid, row in batched.predictions.items():
        other = single.predictions[iid]
        assert row["label"] == other["label"]
        for name in LABELS:
            assert row["probs"][name] == pytest.approx(other["probs"][name], abs=1e-4)
        assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probs"], key=row["probs"].get)
        assert row["error"] is None and row["model"] == "tiny" and row["adapter_id"] is None


# ---------------------------------------------------------------- score vs generate

def test_score_and_generate_agree_when_the_head_favours_one_label(tiny_model_dir):
    """A head biased to 'Sports' then EOS: greedy generation answers 'Sports', and score mode agrees."""
    engine = InferenceEngine(str(tiny_model_dir), dtype="fp32", device="cpu")  # private: its head is edited
    tok = engine.tokenizer
    sports = tok("Sports", add_special_tokens=False)["input_ids"]
    assert len(sports) == 1
    emb = engine.model.get_input_embeddings().weight
    head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=True)
    with torch.no_grad():
        head.weight.copy_(emb)
        head.bias.zero_()
        head.bias[sports[0]] = 50.0
        head.bias[tok.eos_token_id] = 45.0  # after one 'Sports', repetition penalty 1.5 lets EOS win
    engine.model.lm_head = head
    engine.model.config.tie_word_embeddings = False
    score, sctx = _classify(engine, _items())
    gen, gctx = _classify(engine, _items(), mode="generate", max_new_tokens=4, repetition_penalty=1.5)
    assert score["counts"]["Sports"] == len(TEXTS)
    assert gen["counts"]["Sports"] == len(TEXTS) and gen["following_rate"] == 1.0
    for iid, row in gctx.predictions.items():
        assert row["response"] == "Sports" and row["follows_instruction"] is True and row["probs"] is None
        assert sctx.predictions[iid]["label"] == row["label"] == "Sports"


def test_generate_mode_counts_responses_without_a_label(engine):
    summary, ctx = _classify(engine, _items()[:3], mode="generate", max_new_tokens=3)
    # A random tiny model does not answer with a label name.
    assert summary["following_rate"] == sum(r["follows_instruction"] for r in ctx.predictions.values()) / 3
    for row in ctx.predictions.values():
        assert isinstance(row["response"], str)
        assert (row["label"] is None) == ("no_single_label" in row["flags"])


def test_parse_label_is_strict_about_exactly_one_label():
    assert parse_label("Sports", LABELS) == "Sports"
    assert parse_label("  sci/tech.", LABELS) == "Sci/Tech"
    assert parse_label("The answer is BUSINESS", LABELS) == "Business"
    assert parse_label("Sci-Tech", LABELS) is None
    assert parse_label("Science", LABELS) is None
    assert parse_label("World or Sports", LABELS) is None
    assert parse_label("Worldwide", LABELS) is None
    assert parse_label("", LABELS) is None


# ---------------------------------------------------------------- adapters

def _make_adapter(base_dir: Path, out: Path, seed: int, *, digest: str | None = None, template: str = "alpaca",
                  rank: int = 4, alpha: int = 32, targets: tuple[str, ...] = ("q_proj", "v_proj"),
                  std: float = 0.5) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # random, non-zero B (and A): the adapter changes the outputs
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    peft_model.save_pretrained(out)
    (out / "newslora.json").write_text(json.dumps({
        "template": template, "instruction": INSTRUCTION, "label_names": LABELS,
        "base_model": str(base_dir), "base_model_digest": digest or model_digest(base_dir)}))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    return [AdapterRef(i, _make_adapter(tiny_model_dir, root / f"a{i}", seed=i)) for i in (1, 2, 3)]


def test_base_and_two_adapters_share_one_base_model(tiny_model_dir, adapters):
    engine = InferenceEngine(str(tiny_model_dir), dtype="fp32", device="cpu")
    loads = InferenceEngine.base_loads
    model = engine.model
    items = _items()
    probs = {}
    for name, adapter in [("base", None), ("a1", adapters[0]), ("a2", adapters[1]), ("base2", None),
                          ("a1again", adapters[0])]:
        _, ctx = _classify(engine, items, adapter=adapter)
        probs[name] = torch.tensor([[ctx.predictions[f"i{n}"]["probs"][k] for k in LABELS]
                                    for n in range(len(items))])
        assert all(r["adapter_id"] == (adapter.adapter_id if adapter else None) for r in ctx.predictions.values())
    assert InferenceEngine.base_loads == loads  # no base reload
    assert engine.model is model and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # no PEFT
    assert engine.loaded_adapters == [2, 1]
    assert (probs["a1"] - probs["base"]).abs().max() > 1e-3
    assert (probs["a2"] - probs["a1"]).abs().max() > 1e-3
    torch.testing.assert_close(probs["base2"], probs["base"], atol=1e-5, rtol=0)
    torch.testing.assert_close(probs["a1again"], probs["a1"], atol=1e-5, rtol=0)
    # The adapter's prefix cache is its own: cached scores equal a full forward through the adapter.
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=LABELS)
    with engine.use(adapters[1]):
        naive = torch.softmax(torch.stack([_naive_loglik(engine.model, engine.tokenizer, t, plan)
                                           for t in TEXTS]), -1)
    torch.testing.assert_close(probs["a2"], naive, atol=1e-4, rtol=0)


def test_lru_evicts_the_least_recently_used_adapter(tiny_model_dir, adapters):
    engine = InferenceEngine(str(tiny_model_dir), dtype="fp32", device="cpu", max_adapters=2)
    items = _items()[:2]
    for a in (adapters[0], adapters[1], adapters[0], adapters[2]):
        _classify(engine, items, adapter=a)
    assert engine.loaded_adapters == [1, 3]
    assert set(engine._adapters) == {"a1", "a3"}
    assert all(k[0] != "a2" for k in engine._prefix_kv)
    _, ctx = _classify(engine, items, adapter=adapters[1])  # reloads the evicted one
    assert engine.loaded_adapters == [3, 2] and len(ctx.predictions) == 2


def test_adapter_for_another_base_model_is_refused(tiny_model_dir, tmp_path):
    bad = AdapterRef(9, _make_adapter(tiny_model_dir, tmp_path / "other", seed=5, digest="0123456789abcdef"))
    engine = get_engine(str(tiny_model_dir), dtype="fp32", device="cpu")
    with pytest.raises(AdapterError, match="trained for base model .*0123456789abcdef"):
        _classify(engine, _items()[:1], adapter=bad)
    with pytest.raises(AdapterError, match="does not exist"):
        _classify(engine, _items()[:1], adapter=AdapterRef(10, tmp_path / "nowhere"))
    (tmp_path / "nometa").mkdir()
    (tmp_path / "nometa" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError, match="no newslora.json"):
        _classify(engine, _items()[:1], adapter=AdapterRef(11, tmp_path / "nometa"))


def test_template_contradicting_the_adapter_is_refused(tiny_model_dir, tmp_path):
    chat = AdapterRef(12, _make_adapter(tiny_model_dir, tmp_path / "chat", seed=6, template="chat"))
    engine = get_engine(str(tiny_model_dir), dtype="fp32", device="cpu")
    with pytest.raises(ValueError, match="trained with template 'chat'"):
        _classify(engine, _items()[:1], adapter=chat)


# ---------------------------------------------------------------- bad input

def test_empty_batch_is_an_error(engine):
    with pytest.raises(ValueError, match="empty batch"):
        _classify(engine, [])


def test_empty_text_fails_alone_and_duplicates_keep_the_first(engine):
    items = _items()[:3] + [{"id": "blank", "text": "   "}, {"id": "i0", "text": "a different text"}]
    summary, ctx = _classify(engine, items)
    assert summary["classified"] == 3 and summary["n_failed"] == 2
    blank = ctx.predictions["blank"]
    assert blank["label"] is None and "empty text" in blank["error"] and blank["flags"] == ["empty_text"]
    dup = [f for f in summary["failed"] if f["item_id"] == "i0"]
    assert len(dup) == 1 and "duplicate id" in dup[0]["error"]
    assert ctx.predictions["i0"]["label"] in LABELS and ctx.predictions["i0"]["error"] is None


def test_long_text_is_truncated_never_the_template(engine):
    long_text = " ".join(["market"] * 3000)  # beyond the tiny model's 1024-token context
    items = [{"id": "long", "text": long_text}, {"id": "cut", "text": TEXTS[5]}, {"id": "ok", "text": "Short."}]
    summary, ctx = _classify(engine, items, max_input_tokens=8)
    assert summary["truncated"] == 2
    assert ctx.predictions["long"]["flags"] == ["truncated"] and ctx.predictions["long"]["label"] in LABELS
    assert ctx.predictions["ok"]["flags"] == []
    summary, ctx = _classify(engine, items[:1])  # the model's context alone
    assert summary["truncated"] == 1 and ctx.predictions["long"]["label"] in LABELS
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=LABELS)
    enc = plan.bodies([long_text], max_article_tokens=8)[0]
    tail = engine.tokenizer(render_prompt(INSTRUCTION, "x"))["input_ids"][-plan.tail_len:]
    assert len(enc.ids) == 8 + plan.tail_len and enc.ids[-plan.tail_len:] == tail


def test_labels_that_cannot_be_told_apart_are_refused(engine):
    with pytest.raises(LabelTokensError, match="prefix"):
        PromptCodec.build(engine.tokenizer, instruction="x", template="alpaca",
                          label_names=["Sci", "Sci/Tech"]).check_scorable()
    with pytest.raises(LabelTokensError, match="repeats"):
        PromptCodec.build(engine.tokenizer, instruction="x", template="alpaca", label_names=["A", "A"])


def test_resume_skips_done_items_after_a_cancel(engine):
    items = _items()
    ctx = LocalContext(cancel_after_checks=3)  # the 3rd batch boundary cancels
    with pytest.raises(JobCancelled):
        _classify(engine, items, ctx=ctx, batch_size=2)
    done = len(ctx.predictions)  # the two batches before the cancel (their sizes are the batching's choice)
    assert 2 <= done <= 4
    first = {k: dict(v) for k, v in ctx.predictions.items()}
    ctx.cancel_after_checks = None
    summary, _ = _classify(engine, items, ctx=ctx, batch_size=2)
    assert summary["skipped_done"] == done and summary["attempt_classified"] == len(items) - done
    assert summary["classified"] == len(items)  # the result covers every stored item, both attempts
    assert set(ctx.predictions) == {it["id"] for it in items}
    assert all(ctx.predictions[k] == v for k, v in first.items())
    progress = [e for e in ctx.events if e["message"] == "classified"]
    assert progress and progress[-1]["metrics"]["done"] == len(items) - done and "eta_s" in progress[-1]["metrics"]


def test_accuracy_uses_gold_labels(engine):
    gold = ["Business", "Sports", "Sci/Tech", "World", "Business", "Sci/Tech", "World"]
    summary, ctx = _classify(engine, _items(labels=gold))
    expected = sum(ctx.predictions[f"i{n}"]["label"] == g for n, g in enumerate(gold)) / len(gold)
    assert summary["accuracy"] == pytest.approx(expected) and summary["n_gold"] == len(gold)
    assert sum(summary["counts"].values()) == len(gold)


# ---------------------------------------------------------------- load_items

def test_load_items_from_jsonl_csv_and_dataset(tmp_path):
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"id": "a", "text": "one"}\n\n{"id": 2, "text": "two", "label": "Sports"}\n'
                  'not json\n{"text": "no id"}\n{"id": "c", "text": 5}\n', encoding="utf-8")
    items, rejected = load_items(ClassifySpec(input_file=str(jl)), None)
    assert [(i["id"], i["text"], i["label"]) for i in items] == [("a", "one", None), ("2", "two", "Sports")]
    assert [r["seq"] for r in rejected] == [4, 5, 6]
    assert "not valid JSON" in rejected[0]["reason"] and "no id" in rejected[1]["reason"]
    assert "not a string" in rejected[2]["reason"]

    cs = tmp_path / "in.csv"
    with cs.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "text", "label"], ["x", "hello, world", "World"], ["y", "bye", ""]])
    items, rejected = load_items(ClassifySpec(input_file=str(cs), limit=1), None)
    assert items == [{"id": "x", "text": "hello, world", "label": "World", "seq": 2}] and rejected == []

    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "test.jsonl").write_text("\n".join(json.dumps(
        {"id": f"t{n}", "instruction": INSTRUCTION, "input": f"article {n}", "output": "Sports", "label_id": 1})
        for n in range(3)) + "\n", encoding="utf-8")
    items, _ = load_items(ClassifySpec(dataset_id=1, split="test", limit=2), ds)
    assert [(i["id"], i["text"], i["label"]) for i in items] == [("t0", "article 0", "Sports"),
                                                                  ("t1", "article 1", "Sports")]
    with pytest.raises(InputFileError, match="no validation split"):
        load_items(ClassifySpec(dataset_id=1, split="validation"), ds)


def test_load_items_bad_files(tmp_path):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(InputFileError, match=r"latin.jsonl is not UTF-8: .*byte offset 50 \(line 2\)"):
        load_items(ClassifySpec(input_file=str(bad)), None)
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("3,Title,Body\n", encoding="utf-8")
    with pytest.raises(InputFileError, match="header row with columns id and text"):
        load_items(ClassifySpec(input_file=str(nohead)), None)
    with pytest.raises(InputFileError, match="does not exist"):
        load_items(ClassifySpec(input_file=str(tmp_path / "missing.jsonl")), None)
    with pytest.raises(InputFileError, match="unknown input format"):
        (tmp_path / "x.txt").write_text("hi")
        load_items(ClassifySpec(input_file=str(tmp_path / "x.txt")), None)


# ---------------------------------------------------------------- the real model

@pytest.mark.smollm2
def test_real_smollm2_classifies_ag_news_articles_exactly(smollm2_dir, ag_news_dir):
    labels = LABELS
    with (ag_news_dir / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(4), csv.reader(f))]
    items = [{"id": f"t{n}", "text": f"{t} {d}".replace("\\", " "), "label": labels[int(c) - 1]}
             for n, (c, t, d) in enumerate(rows)]
    engine = get_engine(str(smollm2_dir), dtype="fp32", device="cpu")
    summary, ctx = _classify(engine, items, model_ref="smollm2-135m", batch_size=4)
    assert summary["classified"] == 4 and summary["n_gold"] == 4
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=labels)
    with engine.use(None):
        naive = torch.softmax(torch.stack([_naive_loglik(engine.model, engine.tokenizer, it["text"].strip(), plan)
                                           for it in items]), -1)
    got = torch.tensor([[ctx.predictions[it["id"]]["probs"][k] for k in labels] for it in items])
    torch.testing.assert_close(got, naive, atol=1e-4, rtol=0)


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_merged_adapter_scores_as_peft_runs_the_unmerged_lora(tiny_model_dir, tmp_path):
    """The engine's merged weights give the scores of PEFT's LoRA layers (x W + s x A B), fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    path = _make_adapter(tiny_model_dir, tmp_path / "all", seed=7, rank=8, alpha=16, targets=ALL_LINEAR, std=0.3)
    engine = InferenceEngine(str(tiny_model_dir), dtype="fp32", device="cpu")
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=LABELS)
    seqs = [e.ids for e in plan.bodies(TEXTS, max_article_tokens=500)]
    with engine.use(AdapterRef(5, path)) as key:
        merged = score_labels(engine.model, plan, seqs, engine.prefix_kv(key, plan.prefix_ids))
    with engine.use(None) as key:
        base = score_labels(engine.model, plan, seqs, engine.prefix_kv(key, plan.prefix_ids))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                     str(path)).eval()
    from workers.modeling.forward import prefix_kv
    unmerged = score_labels(peft, plan, seqs, prefix_kv(peft, plan.prefix_ids))
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=0)
    assert (merged - base).abs().max() > 1e-2  # the adapter matters


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_real_smollm2_merged_adapter_predicts_as_unmerged_lora_on_400_articles(smollm2_dir, ag_news_dir, tmp_path):
    """A LoRA of the presets' shape (r 16, alpha 32, all linear layers): the merged fast path's labels equal
    PEFT's unmerged LoRA's on 400 AG News test articles, probabilities within 1e-2.

    In fp32: in bf16 two correct implementations already differ by bf16's rounding (merged vs unmerged, both
    through the Hugging Face forward: 95 of 96 labels equal, probabilities up to 0.06 apart), which would hide
    a real difference in the merge.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from workers.modeling.forward import prefix_kv
    path = _make_adapter(smollm2_dir, tmp_path / "preset", seed=3, rank=16, alpha=32, targets=ALL_LINEAR, std=0.02)
    with (ag_news_dir / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(400), csv.reader(f))]
    items = [{"id": f"t{n}", "text": f"{t} {d}".replace("\\", " ").strip(), "label": LABELS[int(c) - 1]}
             for n, (c, t, d) in enumerate(rows)]
    engine = InferenceEngine(str(smollm2_dir), dtype="fp32", device="cpu")
    summary, ctx = _classify(engine, items, adapter=AdapterRef(1, path), model_ref="smollm2-135m", batch_size=32)
    fast = torch.tensor([[ctx.predictions[it["id"]]["probs"][k] for k in LABELS] for it in items])
    _, bctx = _classify(engine, items[:32], model_ref="smollm2-135m", batch_size=32)
    base = torch.tensor([[bctx.predictions[it["id"]]["probs"][k] for k in LABELS] for it in items[:32]])

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
                                     str(path)).eval()  # the LoRA matmuls on every token
    plan = PromptCodec.build(engine.tokenizer, instruction=INSTRUCTION, template="alpaca", label_names=LABELS)
    enc = plan.bodies([it["text"] for it in items], max_article_tokens=engine.max_positions)
    kv = prefix_kv(peft, plan.prefix_ids)
    order = sorted(range(len(items)), key=lambda i: len(enc[i].ids))
    slow = torch.zeros(len(items), len(LABELS))
    for b in range(0, len(order), 32):
        idx = order[b:b + 32]
        slow[idx] = torch.softmax(score_labels(peft, plan, [enc[i].ids for i in idx], kv), -1)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))  # every label equal, so accuracy too
    assert (fast - slow).abs().max() < 1e-2
    assert summary["accuracy"] == pytest.approx(
        sum(LABELS[int(j)] == it["label"] for j, it in zip(slow.argmax(-1), items)) / len(items))
    assert (base - fast[:32]).abs().max() > 0.05  # the adapter matters
