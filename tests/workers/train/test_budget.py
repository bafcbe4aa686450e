"""train.max_minutes (the schedule fitted to a time budget) and train.keep_best (the best validation's weights
exported): the plan as a function of measured seconds, and real runs of the PEFT loop on the tiny model."""
from __future__ import annotations

import json

import pytest
import torch

from core.context import LocalContext
from core.specs.train import TrainSpec
from workers.train import train_adapter
from workers.train.budget import FINAL_SAVE_S, SAFETY, out_of_time, planned_steps
from tests.workers.train.test_train import adapter_tensors, tiny_spec, write_dataset


def test_the_plan_fills_what_is_left_of_the_budget():
    # 900 s budget, 100 used, 1 s a step, a 10 s validation every 100 steps: 1.1 s a step with validations.
    end = planned_steps(budget_s=900, elapsed_s=100, step=5, step_s=1.0, val_s=10, eval_every=100, final_s=3)
    assert end == 5 + int((900 - 100 - 3) * SAFETY / 1.1)
    assert planned_steps(budget_s=900, elapsed_s=100, step=5, step_s=1.0, val_s=10, eval_every=100, final_s=3,
                         cap=50) == 50
    # Nothing left: still one more step (the loop's guard then stops it).
    assert planned_steps(budget_s=10, elapsed_s=20, step=5, step_s=1.0, val_s=0, eval_every=10, final_s=0) == 6
    with pytest.raises(ValueError, match="step_s"):
        planned_steps(budget_s=10, elapsed_s=0, step=0, step_s=0, val_s=0, eval_every=1, final_s=0)
    assert out_of_time(budget_s=100, elapsed_s=97.5, step_s=1.0, final_s=2.0)
    assert not out_of_time(budget_s=100, elapsed_s=96.5, step_s=1.0, final_s=2.0)


def test_the_budget_is_for_the_peft_loop():
    with pytest.raises(ValueError, match="PEFT loop"):
        TrainSpec(dataset_id=1, backend="torchtune", lora={"top_layers": None}, max_minutes=5)


def test_a_run_with_a_budget_plans_its_schedule_and_ends_within_it(tiny_model_dir, ag_news_dir, tmp_path):
    budget_s = 20.0
    ds = write_dataset(tmp_path / "ds", ag_news_dir, n_train=48, n_val=8)
    ctx = LocalContext(work_dir=tmp_path)
    spec = tiny_spec(tiny_model_dir, max_steps=None, epochs=1, max_minutes=budget_s / 60, eval_every=40,
                     warmup_steps=5, batch_size=8)
    result = train_adapter(spec, ds, tmp_path / "run", ctx)
    b = result.metrics.budget
    assert b is not None and b.max_minutes == pytest.approx(budget_s / 60)
    plans = [e for e in ctx.events if "time budget" in e["message"] and "planned" in e["message"]]
    assert len(plans) == 1, [e["message"] for e in ctx.events]
    # One epoch would be 6 steps: the budget buys more (the epochs setting is ignored; how many more depends on
    # the machine and its load, which is the point)...
    assert result.steps > 6 and result.metrics.epochs > 1, (result.steps, b)
    assert result.steps == b.planned_steps or result.metrics.stop_reason == "time_budget"
    # ... and the run ends within it (one validation's time of slack, as the plan allows for the final one).
    assert b.used_s <= budget_s + b.val_s + 1.0, b
    assert b.used_s >= 0.6 * budget_s, b  # it used the budget rather than stopping early
    assert result.total_steps == b.planned_steps
    assert b.validations == len(result.history) >= 2  # the probe's validation, then the rest
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in x]
    if result.metrics.stop_reason != "time_budget":  # a machine that slowed after the last revision stops
        # at the budget mid-decay (seen in CI beside a soak); a plan that ran its length decayed to ~0
        assert lrs[-1] < 0.1 * max(lrs), "the cosine decay did not end near zero at the planned length"


def test_keep_best_exports_the_best_validations_weights(tiny_model_dir, ag_news_dir, tmp_path, monkeypatch):
    from workers.train import peft_loop
    scripted = iter([(1.0, 0.50), (0.4, 0.90), (0.8, 0.70)])  # the second validation (step 4) is the best
    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "evaluate", lambda self, examples, **kw: next(scripted))
    ds = write_dataset(tmp_path / "ds", ag_news_dir, n_train=32, n_val=4)
    ctx = LocalContext(work_dir=tmp_path)
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=6, eval_every=2, keep_best=True,
                                     early_stopping_metric="val_loss", learning_rate=3e-2), ds, tmp_path / "run", ctx)
    assert [h.step for h in result.history] == [2, 4, 6]
    assert result.metrics.best_step == 4 and result.metrics.val_loss == 0.4 and result.metrics.val_accuracy == 0.9
    assert any("keep_best: exporting step 4" in e["message"] for e in ctx.events)
    exported = adapter_tensors(result.adapter_dir)
    last = adapter_tensors(tmp_path / "run" / "checkpoints" / "step_000006")
    assert any(not torch.equal(exported[k], last[k]) for k in exported), "the last step's weights were exported"


def test_a_resumed_budget_run_keeps_its_plan_and_its_clock(tiny_model_dir, ag_news_dir, tmp_path):
    from core.context import JobCancelled
    from workers.train.checkpoint import STATE_FILE, latest_checkpoint
    ds = write_dataset(tmp_path / "ds", ag_news_dir, n_train=48, n_val=8)
    out = tmp_path / "run"
    # eval_every past the run: no validation revises the plan, so the resumed run must end where the first planned
    spec = tiny_spec(tiny_model_dir, max_steps=None, max_minutes=20 / 60, eval_every=10**6, warmup_steps=2,
                     save_every=10**6)
    with pytest.raises(JobCancelled):  # cancelled after the plan (step 5): a checkpoint at the cancel
        train_adapter(spec, ds, out, LocalContext(work_dir=tmp_path, cancel_after_checks=6))
    state = torch.load(latest_checkpoint(out) / STATE_FILE, weights_only=False)
    assert state["planned"] and state["step"] == 5 and state["budget_used_s"] > 0
    ctx = LocalContext(work_dir=tmp_path)
    resumed = train_adapter(spec, ds, out, ctx)
    assert resumed.resumed_from_step == 5 and resumed.total_steps == state["total_steps"]
    assert not any("planned" in e["message"] for e in ctx.events)  # the plan came from the checkpoint
    assert resumed.metrics.budget.used_s >= state["budget_used_s"]  # the clock went on from the first session
    assert resumed.metrics.budget.used_s <= 20 + resumed.metrics.budget.val_s + 1.0


def test_keep_best_breaks_an_accuracy_tie_by_the_lower_loss(tiny_model_dir, ag_news_dir, tmp_path, monkeypatch):
    from workers.train import peft_loop
    # steps 2 and 6 tie on accuracy (the best), step 6 with the lower loss; step 4 is worse on both
    scripted = iter([(0.50, 0.90), (0.40, 0.80), (0.45, 0.90)])
    monkeypatch.setattr(peft_loop.PeftLoraTrainer, "evaluate", lambda self, examples, **kw: next(scripted))
    ds = write_dataset(tmp_path / "ds", ag_news_dir, n_train=32, n_val=4)
    ctx = LocalContext(work_dir=tmp_path)
    result = train_adapter(tiny_spec(tiny_model_dir, max_steps=6, eval_every=2, keep_best=True,
                                     early_stopping_metric="val_accuracy"), ds, tmp_path / "run", ctx)
    assert [h.step for h in result.history] == [2, 4, 6]
    assert result.metrics.best_step == 6 and result.metrics.val_loss == 0.45
    assert not any("keep_best: exporting step" in e["message"] for e in ctx.events)  # the last step's own weights
