"""The frozen bottom layers' output kept once an example (workers/train/frozen_cache.py): LoRA on the top layers."""
from __future__ import annotations

import json

import pytest
import torch

from core.context import LocalContext
from core.specs.train import LoraSpec
from workers.modeling.codec import PromptCodec
from workers.modeling.lora_forward import frozen_layers
from workers.modeling.prompts import default_instruction
from workers.train import peft_loop, train_adapter
from workers.train.data import collate_train
from workers.train.frozen_cache import build_frozen_cache, frozen_cache_bytes
from tests.workers.train.test_train import (LABELS, _loss_and_grads, _peft_on, adapter_tensors, tiny_spec,  # noqa: F401
                                            dataset_dir, tokenizer)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _examples(tokenizer, ag_news_dir, n: int):
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    rows = [json.loads(x) for x in (ag_news_dir / "train.jsonl").read_text().splitlines()[:n]]
    return enc.examples([{"id": i, "input": r["text"], "output": LABELS[r["label"]]} for i, r in enumerate(rows)],
                        max_seq_len=256)


def test_frozen_layers_counts_the_bottom_layers_without_lora(tiny_model_dir):
    assert frozen_layers(_peft_on(tiny_model_dir, ALL, layers=[1])) == 1
    assert frozen_layers(_peft_on(tiny_model_dir, ALL)) == 0
    assert frozen_layers(_peft_on(tiny_model_dir, ["down_proj"], layers=[0])) == 0  # the last module of layer 0


def test_a_step_from_the_kept_output_has_the_loss_and_gradients_of_the_whole_forward(tiny_model_dir, tokenizer,
                                                                                      ag_news_dir):
    model = _peft_on(tiny_model_dir, ALL, layers=[1])
    examples = _examples(tokenizer, ag_news_dir, 10)
    # kept in batches of 4 sorted by length; the step's batch mixes them in another order, with other padding
    cache = build_frozen_cache(model, examples, 1, pad_id=tokenizer.pad_token_id, batch_size=4)
    assert len(cache.rows) == 10
    assert cache.nbytes() == frozen_cache_bytes(examples, model.config.hidden_size, torch.float32)
    rows = [7, 2, 9, 0, 5]
    batch = collate_train([examples[i] for i in rows], tokenizer.pad_token_id)
    assert len({len(examples[i].input_ids) for i in rows}) > 1  # padding is exercised
    ref_loss, ref_grads = _loss_and_grads(model, batch, lean=True)
    model.zero_grad(set_to_none=True)
    loss = peft_loop.batch_loss(model, batch, lean=True, frozen=cache.stream(batch, rows)) / batch.n_targets
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7  # A and B of layer 1's 7 modules
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name
    # a stream whose rows are other examples' gives another loss: the test can fail
    wrong = peft_loop.batch_loss(model, batch, lean=True, frozen=cache.stream(batch, [2, 7, 0, 9, 5])).item()
    assert wrong / batch.n_targets != pytest.approx(ref_loss, rel=1e-3)


def test_training_the_top_layer_from_the_kept_output_trains_the_same_adapter(tiny_model_dir, dataset_dir, tmp_path):
    spec = tiny_spec(tiny_model_dir, max_steps=8, lora=LoraSpec(rank=4, alpha=8, top_layers=1))
    kept_ctx, plain_ctx, over_ctx = (LocalContext(work_dir=tmp_path) for _ in range(3))
    kept = train_adapter(spec, dataset_dir, tmp_path / "kept", kept_ctx)
    plain = train_adapter(spec.model_copy(update={"frozen_cache_gb": 0}), dataset_dir, tmp_path / "plain", plain_ctx)
    over = train_adapter(spec.model_copy(update={"frozen_cache_gb": 1e-9}), dataset_dir, tmp_path / "over", over_ctx)
    said = [e for e in kept_ctx.events if "hold no LoRA weight" in e["message"]]
    assert len(said) == 1 and said[0]["metrics"]["frozen_layers"] == 1
    assert not any("hold no LoRA weight" in e["message"] for e in plain_ctx.events + over_ctx.events)
    assert any("frozen_cache_gb" in e["message"] for e in over_ctx.events)  # declined, and says why
    a, b, c = (adapter_tensors(r.adapter_dir) for r in (kept, plain, over))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-5), name
        assert torch.equal(b[name], c[name]), name
    assert kept.metrics.train_loss == pytest.approx(plain.metrics.train_loss, rel=1e-4)


def test_validation_from_the_kept_output_scores_as_the_whole_forward(tiny_model_dir, tokenizer, ag_news_dir):
    """Score mode on merged weights (training validation) from the kept bottom-layer output: the same label
    log-likelihoods as the whole lean forward, on the first pass (which keeps it) and the next (which reads it)."""
    from workers.modeling.forward import prefix_kv
    from workers.modeling.lora_forward import merged_weights
    from workers.modeling.scoring import FrozenStreams, score_responses
    model = _peft_on(tiny_model_dir, ALL, layers=[1]).eval()
    enc = PromptCodec.build(tokenizer, template="alpaca", instruction=default_instruction(LABELS), label_names=LABELS)
    examples = _examples(tokenizer, ag_news_dir, 10)
    weights = merged_weights(model)
    kv = prefix_kv(model, enc.prefix_ids)
    want = score_responses(model, enc, examples, kv, weights=weights, batch_size=4)
    kept = FrozenStreams(1)
    first = score_responses(model, enc, examples, kv, weights=weights, batch_size=4, frozen=kept)
    assert len(kept.kept) == 3  # one entry a batch of 4, 4, 2
    second = score_responses(model, enc, examples, kv, weights=weights, batch_size=4, frozen=kept)
    assert len(kept.kept) == 3
    for got in (first, second):
        assert got.predicted == want.predicted
        assert got.nll == pytest.approx(want.nll, rel=1e-6)
    # the kept output is what the next pass starts from: another one gives another score (the test can fail)
    for key in kept.kept:
        kept.kept[key] = kept.kept[key] * 0.5
    assert score_responses(model, enc, examples, kv, weights=weights, batch_size=4,
                           frozen=kept).nll != pytest.approx(want.nll, rel=1e-3)


def test_a_cancel_during_the_frozen_pass_is_heard_and_the_run_resumes(tiny_model_dir, dataset_dir, tmp_path):
    from core.context import JobCancelled
    spec = tiny_spec(tiny_model_dir, max_steps=4, lora=LoraSpec(rank=4, alpha=8, top_layers=1))
    out = tmp_path / "run"
    ctx = LocalContext(work_dir=tmp_path, cancel_after_checks=1)  # the first check: after the pass's first batch
    with pytest.raises(JobCancelled):
        train_adapter(spec, dataset_dir, out, ctx)
    assert not any("hold no LoRA weight" in e["message"] for e in ctx.events)  # the pass did not finish
    assert any("cancelled at step 0" in e["message"] for e in ctx.events)
    again = train_adapter(spec, dataset_dir, out, LocalContext(work_dir=tmp_path))
    assert again.steps == 4
