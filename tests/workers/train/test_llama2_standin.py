"""The LLaMA-2 code path on a stand-in built here (tests/conftest.py make_llama2_standin), never downloaded:
a tiny random LlamaForCausalLM with LLaMA-2's structure and a real SentencePiece tokenizer trained on AG News.

- the stand-in really has LLaMA-2's structure and tokenizer behaviour (BOS, leading-space marker, bytes);
- label scoring through the public classification path gives the probabilities that scoring each full
  prompt + label sequence with a plain forward gives;
- `newslora run configs/agnews-llama2-7b.yaml` end to end on it, with the PEFT loop and with torchtune.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import AG_NEWS_DIR, embedded_env, newslora_cli

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


# ---------------------------------------------------------------------------------------------
# The stand-in itself


def test_standin_has_llama2_structure_and_a_sentencepiece_tokenizer(llama2_standin_dir):
    from transformers import AutoConfig

    from workers.modeling.registry import load_tokenizer
    cfg = AutoConfig.from_pretrained(llama2_standin_dir)
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings is False
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    assert cfg.rope_parameters["rope_theta"] == 10000.0 and cfg.rope_parameters["rope_type"] == "default"
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 4096 and cfg.pad_token_id is None
    assert (llama2_standin_dir / "tokenizer.model").is_file()  # the SentencePiece model it was converted from

    tok = load_tokenizer(llama2_standin_dir)
    assert type(tok).__name__ == "LlamaTokenizer" and tok.pad_token_id == tok.eos_token_id == 2  # no pad: EOS
    ids = tok("Stocks rallied").input_ids
    assert ids[0] == tok.bos_token_id == 1  # BOS, as LLaMA-2 adds it
    pieces = tok.convert_ids_to_tokens(ids[1:])
    assert pieces[0].startswith("▁") and any(p.startswith("▁") for p in pieces[1:])  # word-start markers
    # Byte fallback: characters the 400 articles never had come out as byte pieces and decode back.
    text = "Zürich café 漢字 ☕"
    enc = tok(text, add_special_tokens=False).input_ids
    assert any(p.startswith("<0x") for p in tok.convert_ids_to_tokens(enc)) and tok.unk_token_id not in enc
    assert tok.decode(enc) == text
    # A newline is a byte piece: the label after "### Response:\n" starts a word without a marker, which is
    # why labels are tokenized as they follow the prompt, never alone.
    assert tok.convert_ids_to_tokens(tok("Response:\nSports", add_special_tokens=False).input_ids)[-4:-2] \
        != tok.convert_ids_to_tokens(tok("Sports", add_special_tokens=False).input_ids)[:2]


# ---------------------------------------------------------------------------------------------
# Label scoring = naive full-sequence scoring


def _naive_label_logliks(model, tok, prompt: str, labels: list[str]) -> list[float]:
    """Each label's log-likelihood from one plain forward over the whole prompt + label text, tokenized
    together as a user of the model would."""
    import torch
    prompt_ids = tok(prompt).input_ids
    logliks = []
    for label in labels:
        ids = tok(prompt + label).input_ids
        assert ids[:len(prompt_ids)] == prompt_ids, (prompt[-40:], label)  # the label starts a new token
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)  # (seq, vocab)
        logliks.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))))
    return logliks


@pytest.fixture(scope="module")
def peaky_standin(llama2_standin_dir, tmp_path_factory) -> Path:
    """The stand-in with its output head x10: a random head at init spreads each next token almost evenly
    (every label token ~ -6.9 nats), so a wrong token would hardly move a score; here it would by nats."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM
    path = tmp_path_factory.mktemp("peaky") / "llama2-standin-peaky"
    shutil.copytree(llama2_standin_dir, path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(path)
    return path


def test_label_scoring_matches_naive_full_sequence_scoring(peaky_standin, ag_news_dir):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from core.context import LocalContext
    from workers.inference.classify import InferenceEngine, classify_items
    from workers.modeling.prompts import default_instruction, render_prompt
    from workers.modeling.registry import load_tokenizer
    from core.specs.classify import ClassifySpec

    # Articles the tokenizer never saw (past its 400 training lines), plus bytes, digits, entities, quotes.
    with (ag_news_dir / "train.jsonl").open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"].strip() for n, line in enumerate(fh) if 1000 <= n < 1005]
    texts += ["Zürich's café chain — up 12.5% — opens 3 stores ☕", 'He said "no" &lt;b&gt; 2004-09-01 (AP)', "x"]
    instruction = default_instruction(LABELS)
    items = [{"id": str(i), "text": t} for i, t in enumerate(texts)]
    ctx = LocalContext()
    engine = InferenceEngine(str(peaky_standin), dtype="fp32", device="cpu")
    classify_items(items, engine=engine, model_ref=str(peaky_standin), adapter=None, label_names=LABELS,
                   instruction=instruction, template="alpaca", spec=ClassifySpec(items=items, batch_size=3,
                                                                                 dtype="fp32", device="cpu"),
                   ctx=ctx)

    model = AutoModelForCausalLM.from_pretrained(peaky_standin, dtype=torch.float32).eval()
    tok = load_tokenizer(peaky_standin)
    for item in items:
        row = ctx.predictions[item["id"]]
        got = [row["probs"][name] for name in LABELS]
        logliks = _naive_label_logliks(model, tok, render_prompt(instruction, item["text"], template="alpaca"),
                                       LABELS)
        assert max(logliks) - min(logliks) > 1.0  # the labels' scores are far enough apart to tell
        want = torch.softmax(torch.tensor(logliks), dim=0).tolist()
        assert got == pytest.approx(want, abs=1e-5), (item["text"][:50], got, want)
        # And in log space, where a label far behind still shows: log p_i - log p_0 = loglik_i - loglik_0.
        assert [math.log(p / got[0]) for p in got] == pytest.approx([x - logliks[0] for x in logliks], abs=2e-3)
        assert not row.get("flags")  # nothing was cut


def test_training_examples_are_the_full_text_tokenized_whole(llama2_standin_dir, ag_news_dir):
    """What both training backends learn from: prompt + label + EOS, exactly as the whole text tokenizes."""
    from workers.modeling.codec import PromptCodec
    from workers.modeling.prompts import default_instruction, render_prompt
    from workers.modeling.registry import load_tokenizer

    tok = load_tokenizer(llama2_standin_dir)
    instruction = default_instruction(LABELS)
    with (ag_news_dir / "train.jsonl").open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for n, line in enumerate(fh) if 1000 <= n < 1006]
    texts += ["Zürich's café — up 12.5% ☕", "tab\there", "x"]
    records = [{"id": str(i), "instruction": instruction, "input": t, "output": LABELS[i % 4], "label_id": i % 4}
               for i, t in enumerate(texts)]
    codec = PromptCodec.build(tok, template="alpaca", instruction=instruction, label_names=LABELS)
    for record, example in zip(records, codec.examples(records, max_seq_len=1024)):
        whole = tok(render_prompt(instruction, record["input"]) + record["output"]).input_ids + [tok.eos_token_id]
        assert example.input_ids == whole, record["input"][:50]
        assert example.labels[example.prompt_len:] == whole[example.prompt_len:]  # loss on label + EOS only
        assert set(example.labels[:example.prompt_len]) == {-100}


# ---------------------------------------------------------------------------------------------
# The 7B preset's whole code path, through the CLI, on the stand-in

PRESET = "configs/agnews-llama2-7b.yaml"
# bench/gpu_check.sh sets cuda: the same runs on the GPU, in the preset's bf16.
DEVICE = os.environ.get("NEWSLORA_STANDIN_DEVICE", "cpu")
DTYPE = "fp32" if DEVICE == "cpu" else "bf16"


def _seconds_overrides(model_dir: Path, backend: str) -> list[str]:
    """The preset pointed at the stand-in and at the shared AG News files, sized to seconds on a CPU.

    Everything else is the preset's: LoRA on q/k/v/o rank 8 alpha 16 dropout 0.05, the cosine schedule,
    max_seq_len 256, and generation with the reference settings (30 new tokens, repetition penalty 1.2).
    The judge stage is skipped (judge=null): the preset's judge is DeepSeek-R1 through an Ollama server,
    which CI does not run; the local judge is exercised by tests/workers/jobs/test_pipeline.py.
    """
    return [
        f"model={model_dir}",
        f"prep.train={{path: {AG_NEWS_DIR / 'train.jsonl'}}}", f"prep.test={{path: {AG_NEWS_DIR / 'test.csv'}}}",
        "prep.max_per_class=6", "prep.test_max_per_class=3", "prep.validation_fraction=0.2",
        f"train.backend={backend}", "train.max_steps=3", "train.grad_accum=2", "train.warmup_steps=1",
        "train.save_every=2", "train.eval_every=2", "train.val_samples=4",
        f"train.device={DEVICE}", f"train.dtype={DTYPE}", f"classify.device={DEVICE}", f"classify.dtype={DTYPE}",
        "classify.batch_size=6", f"generate.device={DEVICE}", f"generate.dtype={DTYPE}", "generate_limit=3",
        "judge=null",
    ]


@pytest.fixture(scope="module")
def standin_cli(tmp_path_factory):
    """An embedded newslora (SQLite, embedded broker, API and a worker under its own NEWSLORA_HOME),
    shared by both backends' runs so the second one reuses the prepared dataset."""
    env = embedded_env(tmp_path_factory.mktemp("standin-cli") / "home")
    yield env
    newslora_cli(env, "down", timeout=60)


def _newslora(env, *args, timeout=600):
    return newslora_cli(env, *args, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["peft", pytest.param("torchtune", marks=pytest.mark.torchtune)])
def test_llama2_7b_preset_runs_end_to_end_on_the_standin(standin_cli, llama2_standin_dir, backend):
    from api_client.client import Client
    if backend == "torchtune":
        from workers.train.torchtune import TorchtuneEnvMissing, torchtune_python
        try:
            torchtune_python()
        except TorchtuneEnvMissing as e:
            pytest.skip(str(e))
    t0 = time.monotonic()
    r = _newslora(standin_cli, "run", PRESET, *_seconds_overrides(llama2_standin_dir, backend), "--timeout", "540")
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "fine-tuned" in r.stdout and "accuracy" in r.stdout.lower()  # the evaluation table
    pipeline_id = int(r.stderr.split("submitted pipeline job ")[1].split()[0])

    c = Client(f"http://127.0.0.1:{standin_cli['NEWSLORA_API_PORT']}")
    done = c.get(pipeline_id)
    kids = {k["idempotency_key"].rsplit(":", 1)[1]: k for k in (c.get(i) for i in done["children"])}
    assert {"train", "classify_base", "classify_adapter", "generate_base", "generate_adapter", "evaluate"} \
        <= set(kids) and not any(s.startswith(("judge", "dialogue")) for s in kids)
    assert all(k["status"] == "succeeded" for k in kids.values())

    train = kids["train"]
    assert train["spec"]["backend"] == backend and train["spec"]["model"] == str(llama2_standin_dir)
    assert train["spec"]["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.05,
                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "top_layers": None}
    assert train["result"]["backend"] == backend and train["result"]["steps"] == 3
    if backend == "torchtune":  # the stand-in is a local folder: LLaMA-2's component builder, from its config
        messages = [e["message"] for e in c.events(train["id"])]
        assert any("torchtune.models.llama2.lora_llama2, LLAMA2" in m for m in messages), messages
        assert any(m.startswith("train: checkpoint at step 2 of 3") for m in messages), messages

    for stage in ("classify_base", "classify_adapter"):
        preds = c.predictions(kids[stage]["id"], limit=100)
        assert preds["total"] == 12  # 3 test articles a class
        assert all(p["label"] in LABELS and abs(sum(p["probs"].values()) - 1) < 1e-3 for p in preds["items"])
    for stage in ("generate_base", "generate_adapter"):
        spec = kids[stage]["spec"]
        assert (spec["mode"], spec["max_new_tokens"], spec["repetition_penalty"]) == ("generate", 30, 1.2)
        preds = c.predictions(kids[stage]["id"], limit=100)
        assert preds["total"] == 3 and all(isinstance(p["response"], str) for p in preds["items"])
    ev = c.evaluation(done["result"]["evaluation_id"])
    assert set(ev["document"]["models"]) == {"base", "fine-tuned"}
    assert ev["document"]["models"]["fine-tuned"]["n"] == 12
    print(json.dumps({"standin_pipeline": backend, "device": DEVICE, "wall_s": round(time.monotonic() - t0, 1),
                      "train_tokens_per_s": train["result"]["metrics"].get("tokens_per_s")}))
