"""LoRA training (workers/train): encoding, the shared-prefix forward, the loop, resume, bad input."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from core.context import JobCancelled, LocalContext
from core.contracts.train import TrainResult
from workers.modeling.prompts import default_instruction, render_prompt
from core.specs.train import LoraSpec, TrainSpec
from workers.train import (DatasetNotPrepared, TrainingDiverged, TrainOutOfMemory, UnknownTargetModules,
                           train_adapter)
from workers.train import peft_loop
from workers.train.checkpoint import latest_checkpoint
from workers.modeling.codec import IGNORE, PromptCodec
from workers.modeling.forward import lm_head_of, prefix_kv
from workers.modeling.scoring import score_labels, score_responses
from workers.train.data import collate_train
from tests.conftest import make_dataset_meta

LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def write_dataset(root: Path, ag_news_dir: Path, *, n_train: int = 48, n_val: int = 12,
                  template: str = "alpaca") -> Path:
    """A prepared dataset in prep's format, from the shared AG News train file."""
    rows = [json.loads(line) for line in (ag_news_dir / "train.jsonl").read_text().splitlines()[:n_train + n_val]]
    instruction = default_instruction(LABELS)
    root.mkdir(parents=True, exist_ok=True)

    def rec(i: int, r: dict) -> dict:
        return {"id": f"ag-{i}", "instruction": instruction, "input": r["text"], "output": LABELS[r["label"]],
                "label_id": r["label"]}

    for name, part in (("train", rows[:n_train]), ("validation", rows[n_train:]), ("test", rows[n_train:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(rec(i, r)) + "\n" for i, r in enumerate(part)))
    make_dataset_meta(label_names=LABELS, template=template, instruction=instruction,
                      hash=f"fixture-{n_train}-{n_val}").save(root)
    return root


@pytest.fixture
def dataset_dir(tmp_path, ag_news_dir) -> Path:
    return write_dataset(tmp_path / "ds", ag_news_dir)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from workers.modeling.registry import load_tokenizer
    return load_tokenizer(smollm2_dir)


def tiny_spec(model_dir: Path, **kw) -> TrainSpec:
    base = dict(dataset_id=1, model=str(model_dir), dtype="fp32", batch_size=8, learning_rate=3e-3,
                warmup_steps=2, max_steps=6, eval_every=100, save_every=100, val_samples=8, max_seq_len=128,
                lora=LoraSpec(rank=4, alpha=8))
    base.update(kw)
    return TrainSpec(**base)


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


# -- encoding ---------------------------------------------------------------------------------------

def test_labels_are_ignored_on_the_prompt_and_kept_on_the_response(tokenizer):
    instruction = default_instruction(LABELS)
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=instruction, label_names=LABELS)
    [ex] = enc.examples([{"id": "a", "input": "Stocks fell sharply on Wall Street.", "output": "Sci/Tech"}],
                        max_seq_len=256)
    prompt = render_prompt(instruction, "Stocks fell sharply on Wall Street.")
    assert ex.input_ids[:ex.prompt_len] == tokenizer(prompt)["input_ids"]
    assert ex.labels[:ex.prompt_len] == [IGNORE] * ex.prompt_len
    response = tokenizer(prompt + "Sci/Tech")["input_ids"][ex.prompt_len:] + [tokenizer.eos_token_id]
    assert len(response) == 4  # Sci / / / Tech + EOS
    assert ex.labels[ex.prompt_len:] == response == ex.input_ids[ex.prompt_len:]
    [on_input] = enc.examples([{"id": "a", "input": "Stocks fell.", "output": "World"}], max_seq_len=256,
                              train_on_input=True)
    assert on_input.labels == on_input.input_ids


def test_truncation_cuts_the_article_never_the_template_or_label(tokenizer):
    instruction = default_instruction(LABELS)
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=instruction, label_names=LABELS)
    long_text = "Markets " * 300
    [ex] = enc.examples([{"id": "a", "input": long_text, "output": "Business"}], max_seq_len=100)
    assert ex.truncated
    assert len(ex.input_ids) <= 100
    text = tokenizer.decode(ex.input_ids)
    assert text.endswith("\n\n### Response:\nBusiness" + tokenizer.eos_token)
    assert text.startswith(render_prompt(instruction, "x")[:150]) and "### Input:\nMarkets Markets" in text
    with pytest.raises(ValueError, match="raise max_seq_len"):
        enc.examples([{"id": "a", "input": long_text, "output": "Business"}], max_seq_len=60)


# -- the shared-prefix forward equals the plain forward -------------------------------------------

def _tiny_peft(tiny_model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a non-zero adapter, so the check covers it
    return model.eval()


@pytest.mark.parametrize("train_on_input", [False, True])
def test_shared_prefix_loss_equals_full_sequence_loss(tiny_model_dir, tokenizer, ag_news_dir, train_on_input):
    model = _tiny_peft(tiny_model_dir)
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    rows = [json.loads(x) for x in (ag_news_dir / "train.jsonl").read_text().splitlines()[:5]]
    examples = enc.examples([{"id": i, "input": r["text"], "output": LABELS[r["label"]]} for i, r in enumerate(rows)],
                            max_seq_len=128, train_on_input=train_on_input)
    batch = collate_train(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = peft_loop.batch_loss(model, batch) / batch.n_targets
        # Reference: each full sequence on its own through the plain HF forward with labels.
        total, count = 0.0, 0
        for e in examples:
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            n = sum(x != IGNORE for x in e.labels[1:])
            total, count = total + out.loss.item() * n, count + n
    assert batch.n_targets == count
    assert batch.n_tokens == sum(len(e.input_ids) for e in examples)
    assert ours.item() == pytest.approx(total / count, rel=1e-4)


def test_label_scores_equal_full_sequence_log_likelihoods(tiny_model_dir, tokenizer, ag_news_dir):
    model = _tiny_peft(tiny_model_dir)
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    rows = [json.loads(x) for x in (ag_news_dir / "train.jsonl").read_text().splitlines()[:4]]
    examples = enc.examples([{"id": i, "input": r["text"], "output": LABELS[r["label"]]} for i, r in enumerate(rows)],
                            max_seq_len=128)
    seen = []  # the LM head's input: a strided one costs a copy of the head's weight per row
    hook = lm_head_of(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    scores = score_labels(model, enc, [e.body for e in examples], prefix_kv(model, enc.prefix_ids))
    hook.remove()
    assert seen == [True]
    for b, e in enumerate(examples):
        prompt = e.input_ids[:e.prompt_len]
        for li, ids in enumerate(enc.label_ids):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            want = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids))
            assert scores[b, li].item() == pytest.approx(want, abs=1e-3)


def test_validation_loss_from_the_scoring_forward_equals_the_training_loss(tiny_model_dir, tokenizer, ag_news_dir):
    """Validation reads the gold response's loss (label + EOS) off the scoring forward: one pass, the
    same number as the training forward's loss over the same examples."""
    model = _tiny_peft(tiny_model_dir)
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    rows = [json.loads(x) for x in (ag_news_dir / "train.jsonl").read_text().splitlines()[:7]]
    examples = enc.examples([{"id": i, "input": r["text"], "output": LABELS[r["label"]]} for i, r in enumerate(rows)],
                            max_seq_len=128)
    kv = prefix_kv(model, enc.prefix_ids)
    scores = score_responses(model, enc, examples, kv, batch_size=3)  # batches of mixed lengths
    batch = collate_train(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        want = (peft_loop.batch_loss(model, batch) / batch.n_targets).item()
        plain = score_labels(model, enc, [e.body for e in examples], kv)
    assert scores.n_tokens == batch.n_targets
    assert scores.loss == pytest.approx(want, rel=1e-4)
    assert scores.predicted == plain.argmax(dim=1).tolist()  # EOS columns leave the label scores alone
    assert scores.accuracy == pytest.approx(
        sum(p == e.label_index for p, e in zip(scores.predicted, examples)) / len(examples))
    # A tokenizer without an EOS token has no EOS plan: a clear error, not a wrong loss
    with pytest.raises(ValueError, match="no EOS token"):
        score_responses(model, dataclasses.replace(enc, eos_plan=None), examples, kv)


# -- the loop ---------------------------------------------------------------------------------------

def test_loss_falls_and_the_adapter_loads_with_plain_peft(tiny_model_dir, dataset_dir, tmp_path):
    out = tmp_path / "run"
    ctx = LocalContext(work_dir=tmp_path)
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=20, eval_every=10, learning_rate=3e-2), dataset_dir, out,
                           ctx)
    assert result.steps == 20 and result.resumed_from_step is None
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 20
    # The tiny model's logits are bounded (hidden 64, tied 0.02-scale embeddings): ~1 nat is all it can gain.
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.3, losses
    assert [h.step for h in result.history] == [10, 20]
    assert result.history[-1].val_loss < result.history[0].val_loss * 1.05
    assert 0 <= result.metrics.val_accuracy <= 1 and result.metrics.tokens_per_s > 0
    assert any(e["metrics"].get("eta_s") is not None for e in ctx.events)

    meta = json.loads((out / "adapter" / "newslora.json").read_text())
    assert meta["template"] == "alpaca" and meta["label_names"] == LABELS
    assert meta["base_model_digest"] == result.base_model_digest and meta["dataset_hash"] == "fixture-48-12"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
        after = tuned(input_ids=ids).logits
    assert (after - before).abs().max().item() > 1e-3


def test_a_dataset_without_validation_records_trains_without_validating(tiny_model_dir, ag_news_dir, tmp_path):
    """`validation_fraction=0` makes an empty validation split: training runs, no validation, no error (it
    failed inside the tokenizer on an empty batch: IndexError)."""
    ds = write_dataset(tmp_path / "ds", ag_news_dir, n_train=16, n_val=0)
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=2, eval_every=1), ds, tmp_path / "run",
                           LocalContext(work_dir=tmp_path))
    assert result.steps == 2 and result.history == [] and (tmp_path / "run" / "adapter" / "newslora.json").is_file()


@pytest.fixture(scope="module")
def short_run(tiny_model_dir, ag_news_dir, tmp_path_factory) -> TrainResult:
    """Two steps with a validation after each: a TrainResult with every part filled in."""
    root = tmp_path_factory.mktemp("short")
    ds = write_dataset(root / "ds", ag_news_dir, n_train=16, n_val=4)
    return train_adapter(tiny_spec(tiny_model_dir, max_steps=2, eval_every=1, val_samples=4), ds, root / "run",
                         LocalContext(work_dir=root))


def test_train_result_round_trips_through_the_store(short_run, store_url):
    from db import jobs as jobq
    from db.session import session_scope
    assert [h.step for h in short_run.history] == [1, 2] and short_run.metrics.val_accuracy is not None
    stored = short_run.model_copy(update={"adapter_id": 7})  # as the train job stores it, with its adapter's id
    with session_scope(store_url) as s:
        job_id = jobq.create_job(session=s, kind="train", queue="gpu", spec={}).id
    with session_scope(store_url) as s:
        assert jobq.finish(job_id, "succeeded", session=s, result=stored.model_dump(mode="json"))
    with session_scope(store_url) as s:
        raw = jobq.get_job(job_id, session=s).result
    assert TrainResult.validated(raw, where="the stored train result") == stored
    # The keys the pipeline, the CLI and the dashboard read, where they read them.
    assert raw["adapter_id"] == 7 and raw["adapter_dir"] == short_run.adapter_dir and raw["backend"] == "peft"
    assert raw["metrics"]["val_accuracy"] == short_run.metrics.val_accuracy and raw["resumed_from_step"] is None


def test_crash_and_resume_continues_from_the_checkpoint(tiny_model_dir, dataset_dir, tmp_path, monkeypatch):
    spec = tiny_spec(tiny_model_dir, max_steps=8, save_every=3, lora=LoraSpec(rank=4, alpha=8, dropout=0.1))
    straight = train_adapter(spec, dataset_dir, tmp_path / "straight", LocalContext(work_dir=tmp_path))

    real_step = peft_loop.PeftLoraTrainer._train_step

    def crashing_step(self):
        if self.step == 4:
            raise KeyboardInterrupt("simulated crash at step 5")
        return real_step(self)

    out = tmp_path / "crashy"
    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "_train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(spec, dataset_dir, out, LocalContext(work_dir=tmp_path))
    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "_train_step", real_step)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step_000003" and not (out / "adapter").exists()
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=False)

    seen = {}
    real_resume = peft_loop.PeftLoraTrainer._maybe_resume

    def spy_resume(self):
        real_resume(self)
        seen["exp_avg"] = [self.optimizer.state[p]["exp_avg"].clone() for p in self.optimizer.param_groups[0]["params"]]
        seen["lr"] = self.scheduler.get_last_lr()[0]

    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "_maybe_resume", spy_resume)
    resumed = train_adapter(spec, dataset_dir, out, LocalContext(work_dir=tmp_path))
    assert resumed.resumed_from_step == 3 and resumed.steps == 8
    for i, got in enumerate(seen["exp_avg"]):
        torch.testing.assert_close(got, saved["optimizer"]["state"][i]["exp_avg"])
    assert seen["lr"] == pytest.approx(saved["scheduler"]["_last_lr"][0])
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 9))
    a, b = adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert resumed.metrics.train_loss == pytest.approx(straight.metrics.train_loss, rel=1e-4)


def test_cancel_saves_a_usable_checkpoint(tiny_model_dir, dataset_dir, tmp_path):
    out = tmp_path / "run"
    spec = tiny_spec(tiny_model_dir, max_steps=6, save_every=100)
    with pytest.raises(JobCancelled):
        train_adapter(spec, dataset_dir, out, LocalContext(work_dir=tmp_path, cancel_after_checks=4))
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_000003" and not (out / "adapter").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, ckpt)  # a checkpoint is itself a loadable adapter
    result = train_adapter(spec, dataset_dir, out, LocalContext(work_dir=tmp_path))
    assert result.resumed_from_step == 3 and result.steps == 6 and (out / "adapter" / "newslora.json").exists()
    again = train_adapter(spec, dataset_dir, out, LocalContext(work_dir=tmp_path))  # finished: nothing to do
    assert again.resumed_from_step == 6 and again.steps == 6


def test_resume_refuses_a_checkpoint_from_other_settings(tiny_model_dir, dataset_dir, tmp_path):
    from workers.train import IncompatibleCheckpoint
    out = tmp_path / "run"
    train_adapter(tiny_spec(tiny_model_dir, max_steps=2), dataset_dir, out, LocalContext(work_dir=tmp_path))
    with pytest.raises(IncompatibleCheckpoint, match="batch_size"):
        train_adapter(tiny_spec(tiny_model_dir, max_steps=2, batch_size=4), dataset_dir, out, LocalContext())


def test_early_stopping_on_val_loss_and_wandb_missing_is_a_warning(tiny_model_dir, dataset_dir, tmp_path,
                                                                    monkeypatch):
    import importlib.util
    # Validation loss rises after the first eval: with patience 1 the run stops at the second.
    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "evaluate", lambda self, examples, **kw: (1.0 + self.step, 0.5))
    ctx = LocalContext(work_dir=tmp_path)
    wandb_installed = importlib.util.find_spec("wandb") is not None
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=6, eval_every=1, early_stopping_patience=1,
                                     wandb=not wandb_installed), dataset_dir, tmp_path / "run", ctx)
    assert result.steps == 2 and result.metrics.stop_reason == "early_stopping"
    assert [h.val_loss for h in result.history] == [2.0, 3.0]
    if not wandb_installed:
        assert any(e["level"] == "warning" and "wandb is not installed" in e["message"] for e in ctx.events)


def test_early_stopping_on_val_accuracy_ignores_a_falling_loss(tiny_model_dir, dataset_dir, tmp_path, monkeypatch):
    # Loss keeps falling while accuracy stops rising after the 2nd eval: watching accuracy, patience 2
    # stops at the 4th eval; watching loss, the run goes on to the end.
    accuracy = {1: 0.5, 2: 0.6, 3: 0.6, 4: 0.55, 5: 0.6, 6: 0.6}
    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "evaluate", lambda self, examples, **kw: (1.0 / self.step,
                                                                                       accuracy[self.step]))
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=6, eval_every=1, early_stopping_patience=2,
                                     early_stopping_metric="val_accuracy"), dataset_dir, tmp_path / "acc",
                           LocalContext(work_dir=tmp_path))
    assert result.steps == 4 and result.metrics.stop_reason == "early_stopping"
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=6, eval_every=1, early_stopping_patience=2),
                           dataset_dir, tmp_path / "loss", LocalContext(work_dir=tmp_path))
    assert result.steps == 6 and result.metrics.stop_reason == "completed"


# -- bad input --------------------------------------------------------------------------------------

def test_bad_inputs_get_clear_errors(tiny_model_dir, dataset_dir, tmp_path):
    from workers.modeling.registry import ModelNotFound
    ctx = LocalContext(work_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotPrepared, match="missing train.jsonl, validation.jsonl, meta.json.*prep job"):
        train_adapter(tiny_spec(tiny_model_dir), tmp_path / "empty", tmp_path / "r1", ctx)
    with pytest.raises(ModelNotFound, match="unknown model"):
        train_adapter(tiny_spec("no-such-model"), dataset_dir, tmp_path / "r2", ctx)
    with pytest.raises(ModelNotFound, match="not a Hugging Face checkpoint"):
        train_adapter(tiny_spec(tmp_path / "empty"), dataset_dir, tmp_path / "r3", ctx)
    with pytest.raises(UnknownTargetModules, match=r"\['qkv'\].*down_proj, gate_proj, k_proj, o_proj, q_proj"):
        train_adapter(tiny_spec(tiny_model_dir, lora=LoraSpec(target_modules=["q_proj", "qkv"])), dataset_dir,
                      tmp_path / "r4", ctx)
    with pytest.raises(UnknownTargetModules, match=r"lora.top_layers=3, but .* has 2 decoder layers"):
        train_adapter(tiny_spec(tiny_model_dir, lora=LoraSpec(top_layers=3)), dataset_dir, tmp_path / "r5", ctx)
    for run in ("r1", "r2", "r3", "r4", "r5"):
        assert not (tmp_path / run / "adapter").exists()


def test_top_layers_adapts_only_the_top_of_the_decoder_and_the_adapter_merges(tiny_model_dir, dataset_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from workers.inference.engine import merged_lora_weights
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=3, lora=LoraSpec(rank=4, alpha=8, top_layers=1)),
                           dataset_dir, tmp_path / "run", LocalContext(work_dir=tmp_path))
    keys = adapter_tensors(result.adapter_dir).keys()
    assert len(keys) == 2 * 7 and all(".layers.1." in k for k in keys), sorted(keys)  # A and B of 7 modules
    cfg = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [1]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = merged_lora_weights(base, Path(result.adapter_dir))
    assert len(merged) == 7 and all(".layers.1." in name for name in merged)


@pytest.mark.parametrize("failure, error, match", [
    (lambda: torch.tensor(float("nan"), requires_grad=True), TrainingDiverged, "nan at step 1.*lower the learning rate"),
    ("oom", TrainOutOfMemory, "out of memory at step 1.*lower batch_size"),
])
def test_a_failing_step_stops_with_advice_and_no_adapter(tiny_model_dir, dataset_dir, tmp_path, monkeypatch,
                                                         failure, error, match):
    def broken(model, batch, **kw):
        if failure == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return failure()

    monkeypatch.setattr(peft_loop, "batch_loss", broken)
    with pytest.raises(error, match=match):
        train_adapter(tiny_spec(tiny_model_dir), dataset_dir, tmp_path / "run", LocalContext(work_dir=tmp_path))
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.smollm2
def test_a_few_steps_on_real_smollm2(smollm2_dir, ag_news_dir, tmp_path):
    from workers.modeling.registry import cpu_has_fast_bf16
    ds = write_dataset(tmp_path / "ds", ag_news_dir, n_train=24, n_val=8)
    spec = TrainSpec(dataset_id=1, model=str(smollm2_dir), batch_size=8, max_steps=3, warmup_steps=1, val_samples=8,
                     learning_rate=5e-4)
    result = train_adapter(spec, ds, tmp_path / "run", LocalContext(work_dir=tmp_path))
    assert result.steps == 3
    assert result.metrics.dtype == ("bfloat16" if cpu_has_fast_bf16() else "float32")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert losses[-1] < 0.7 * losses[0], losses  # the label + EOS format is learnt within a few steps
    assert 0.0 <= result.metrics.val_accuracy <= 1.0 and result.metrics.tokens_per_s > 0
    # Frozen base in bf16, LoRA weights kept (and saved) in fp32.
    assert {t.dtype for t in adapter_tensors(result.adapter_dir).values()} == {torch.float32}


# -- one modelling core: validation accuracy is the classifier's accuracy ------------------------------

def test_validation_predictions_equal_a_classify_job_item_by_item(tiny_model_dir, dataset_dir, tmp_path):
    from workers.inference.classify import AdapterRef, classify_items, get_engine
    from core.specs.classify import ClassifySpec
    from workers.train.peft_loop import PeftLoraTrainer
    # max_seq_len well above the articles' length: neither path cuts an article, so both see the same prompts.
    spec = tiny_spec(tiny_model_dir, max_steps=8, learning_rate=3e-2, val_samples=12, max_seq_len=512)
    trainer = PeftLoraTrainer(spec, dataset_dir, tmp_path / "run", LocalContext(work_dir=tmp_path))
    trainer.setup()
    try:
        result = trainer.train()
        predicted = trainer.predict(trainer.val_examples)
        _, val_accuracy = trainer.evaluate(trainer.val_examples)
    finally:
        trainer.cleanup()
    assert not any(e.truncated for e in trainer.val_examples)
    by_id = {r["id"]: r for r in trainer.data.validation}
    items = [{"id": e.id, "text": by_id[e.id]["input"], "label": by_id[e.id]["output"]} for e in trainer.val_examples]
    ctx = LocalContext(work_dir=tmp_path)
    # An adapter id no other test uses: engines are cached per process, and so are their merged adapters.
    summary = classify_items(items, engine=get_engine(str(tiny_model_dir), dtype="fp32", device="cpu"),
                             model_ref=str(tiny_model_dir), adapter=AdapterRef(9101, Path(result.adapter_dir)),
                             label_names=LABELS, instruction=default_instruction(LABELS), template="alpaca",
                             spec=ClassifySpec(items=items, model=str(tiny_model_dir), dtype="fp32", device="cpu",
                                               batch_size=5), ctx=ctx)
    # Same probabilities (to float rounding: the classifier merges the adapter into the weights, training
    # keeps it apart), hence the same label wherever the top two labels are not a float-rounding tie.
    trainer.model.eval()
    with torch.no_grad():
        scores = score_labels(trainer.model, trainer.encoder, [e.body for e in trainer.val_examples],
                              prefix_kv(trainer.model, trainer.encoder.prefix_ids))
    train_probs = torch.softmax(scores, -1)
    job_probs = torch.tensor([[ctx.predictions[e.id]["probs"][k] for k in LABELS] for e in trainer.val_examples])
    torch.testing.assert_close(job_probs, train_probs, atol=1e-4, rtol=0)
    assert train_probs.argmax(-1).tolist() == predicted
    top2 = train_probs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.sum() >= len(predicted) // 2, "the tiny model's labels are all near-ties: the test shows nothing"
    for e, p, c in zip(trainer.val_examples, predicted, clear.tolist()):
        if c:
            assert ctx.predictions[e.id]["label"] == LABELS[p], e.id
    if bool(clear.all()):
        assert summary["accuracy"] == pytest.approx(val_accuracy)


# -- the lean LoRA training forward computes what PEFT computes -------------------------------------

def _peft_on(tiny_model_dir: Path, targets: list[str], *, dtype=torch.float32, dropout: float = 0.0, seed: int = 1,
             layers: list[int] | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                            layers_to_transform=layers))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a non-zero adapter, so the check covers its forward and its gradients
    return model.train()


def _loss_and_grads(model, batch, lean: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = peft_loop.batch_loss(model, batch, lean=lean) / batch.n_targets
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("targets,train_on_input,layers", [
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, None),
    (["q_proj", "v_proj", "down_proj"], True, None),  # some layers of a pack adapted, others not
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False, [1]),  # top layer only
])
def test_lean_lora_forward_matches_peft_loss_and_gradients(tiny_model_dir, tokenizer, ag_news_dir, targets,
                                                           train_on_input, layers):
    from workers.modeling.lora_forward import lora_forward_ok
    model = _peft_on(tiny_model_dir, targets, layers=layers)
    assert lora_forward_ok(model)
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    rows = [json.loads(x) for x in (ag_news_dir / "train.jsonl").read_text().splitlines()[:6]]
    examples = enc.examples([{"id": i, "input": r["text"], "output": LABELS[r["label"]]} for i, r in enumerate(rows)],
                            max_seq_len=128, train_on_input=train_on_input)
    batch = collate_train(examples, tokenizer.pad_token_id)  # rows of unequal length: padding is exercised
    assert len({len(e.input_ids) for e in examples}) > 1
    ref_loss, ref_grads = _loss_and_grads(model, batch, lean=False)
    loss, grads = _loss_and_grads(model, batch, lean=True)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * len(targets) * len(layers or [0, 1])  # A and B
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_lean_lora_forward_in_bf16_stays_close_to_peft(tiny_model_dir, tokenizer, ag_news_dir):
    """In the trainer's bf16 layout the lean forward makes PEFT's LoRA change and PEFT's LoRA gradients.

    The tiny model's head is nearly flat: its loss (~10.9 nats) moves by hundredths of a nat for this
    adapter, less than bf16 rounding moves it from one thread count to another, so the loss alone cannot
    tell a wrong LoRA path. The checks are on what LoRA changes: the decoder's last hidden states, where this
    adapter moves them by over half their norm (against the base, adapter disabled; within 2%), and every
    LoRA weight's gradient (within 3% overall, 5% each). A LoRA update scaled by 1.1 is off by 6-7% in the
    hidden states and 12% in the gradients; a missing one by 100%.
    """
    from peft.helpers import disable_input_dtype_casting
    from workers.modeling.forward import shared_prefix_hidden
    from workers.modeling.lora_forward import lora_shared_prefix_hidden
    model = _peft_on(tiny_model_dir, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # the trainer's layout: frozen base bf16, LoRA fp32 under autocast
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    rows = [json.loads(x) for x in (ag_news_dir / "train.jsonl").read_text().splitlines()[:6]]
    batch = collate_train(enc.examples([{"id": i, "input": r["text"], "output": LABELS[r["label"]]}
                                        for i, r in enumerate(rows)], max_seq_len=128), tokenizer.pad_token_id)
    real = batch.attention_mask[:, batch.prefix_ids.shape[1]:].bool()  # (B, S): the rows' own tokens
    args = (batch.prefix_ids, batch.input_ids, batch.attention_mask)
    with disable_input_dtype_casting(model), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            with model.disable_adapter():
                base_h = shared_prefix_hidden(model, *args)[1][real]  # (N, H)
            ref_delta = shared_prefix_hidden(model, *args)[1][real].float() - base_h.float()
            delta = lora_shared_prefix_hidden(model, *args)[1][real].float() - base_h.float()
        ref, ref_grads = _loss_and_grads(model, batch, lean=False)
        ours, grads = _loss_and_grads(model, batch, lean=True)
    assert ref_delta.norm() > 0.1 * base_h.float().norm(), "the adapter hardly moves the hidden states"
    assert (delta - ref_delta).norm() / ref_delta.norm() < 0.02
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 modules, 2 layers
    total = sum(float((grads[n] - g).norm() ** 2) for n, g in ref_grads.items()) ** 0.5
    assert total / sum(float(g.norm() ** 2) for g in ref_grads.values()) ** 0.5 < 0.03
    for name, g in ref_grads.items():
        assert float((grads[name] - g).norm() / g.norm()) < 0.05, name
    assert ours == pytest.approx(ref, abs=5e-3)  # and the loss itself, to bf16 rounding


def test_lean_forward_is_not_used_where_it_would_differ(tiny_model_dir):
    from workers.modeling.lora_forward import lora_forward_ok
    assert not lora_forward_ok(_peft_on(tiny_model_dir, ["q_proj"], dropout=0.1))  # dropout: PEFT's own layers
    from transformers import AutoModelForCausalLM
    assert not lora_forward_ok(AutoModelForCausalLM.from_pretrained(tiny_model_dir))  # no adapter at all
