"""The judge job: build the items (a generate-mode classify job's answers, or the general-instruction set
answered by a model), build their control set, judge both, summarise."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

from core.context import JobContext
from core.specs.judge import JudgeSpec
from workers.judge.backends import make_judge
from workers.judge.controls import control_items
from workers.judge.dialogue import answer_dialogue, dialogue_items
from workers.judge.errors import JudgeInputError
from workers.judge.scoring import judge_items, sample_items
from workers.modeling.registry import load_model


@dataclass
class ClassifyRun:
    """What the judge reads of a classify job: its answers and the task they answered."""

    job_id: int
    mode: str | None
    predictions: list[Mapping[str, Any]]  # item_id, gold, response, ...
    instruction: str = ""
    label_names: list[str] = field(default_factory=list)
    records: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # the dataset's records by id, if any
    model: str | None = None
    adapter_id: int | None = None


class JudgeInputs(Protocol):
    """Where a judge job's inputs come from (the store, in a worker; anything, in a test)."""

    def classify_run(self, job_id: int) -> ClassifyRun:
        """The classify job's answers and task. Raises JudgeInputError: not a classify job."""

    def adapter(self, adapter_id: int) -> tuple[Path, str]:
        """(the adapter's folder, the prompt template it was trained with)."""


def _classify_items(run: ClassifyRun) -> list[dict[str, Any]]:
    if run.mode != "generate":
        raise JudgeInputError(f"classify job {run.job_id} ran in {run.mode} mode: the judge scores free-form "
                              f"responses, so judge a generate-mode job")
    items = []
    for p in run.predictions:
        if p.get("response") is None:
            continue
        rec = run.records.get(str(p["item_id"]), {})
        items.append({"item_id": str(p["item_id"]), "instruction": rec.get("instruction") or run.instruction,
                      "input": rec.get("input", ""), "reference": p.get("gold") or rec.get("output", ""),
                      "response": p["response"]})
    if not items:
        raise JudgeInputError(f"classify job {run.job_id} has no generated responses to judge")
    return items


def _dialogue_answers(spec: JudgeSpec, inputs: JudgeInputs, ctx: JobContext) -> list[dict[str, Any]]:
    """The general instructions answered by `spec.model` (+ `spec.adapter_id`, run unmerged by PEFT).

    Not through `workers.inference.engine` (which merges the adapter into the weights): in bf16 the merged
    weights round differently, and greedy answers would change (measured on a tiny model with random
    adapters: 0-1 of 12 answers identical in bf16, 12 of 12 in fp32).
    """
    items = dialogue_items()
    template = "alpaca"
    model, tok = load_model(spec.model)
    if spec.adapter_id is not None:
        from peft import PeftModel  # lazy: peft loads torch, which the API and the CLI must not (they import this)
        adapter_path, template = inputs.adapter(spec.adapter_id)
        model = PeftModel.from_pretrained(model, adapter_path).eval()
    ctx.event(f"answering {len(items)} general instructions with {spec.model}"
              + (f" + adapter {spec.adapter_id}" if spec.adapter_id else ""))
    # The model goes when this returns, before the judge model loads.
    return answer_dialogue(items, model, tok, template=template, max_new_tokens=spec.answer_max_new_tokens)


def run_judge(spec: JudgeSpec, inputs: JudgeInputs, ctx: JobContext) -> dict[str, Any]:
    """The judge job: build the items and their control set, judge both, summarise.

    Classify mode (`spec.classify_job_id`): the generate-mode job's answers, against each article's gold
    label; the control pairs are the gold and a wrong label's name for sampled articles. Dialogue mode
    (`spec.dialogue`): the shipped general instructions answered by `spec.model` (+ `spec.adapter_id`);
    the control pairs are each instruction's reference answer and another's.

    Returns:
        the job result: {classify_job_id | dialogue, model, adapter_id, n, summary (a JudgeSummary as JSON)}.

    Raises:
        JudgeInputError: nothing to judge; JudgeFatal, JudgeUnavailable, JobCancelled as `judge_items`.
    """
    if spec.dialogue:
        items = _dialogue_answers(spec, inputs, ctx)
        label_names = None
        source: dict[str, Any] = {"dialogue": True, "model": spec.model, "adapter_id": spec.adapter_id}
    else:
        if spec.classify_job_id is None:
            raise JudgeInputError("a judge job needs classify_job_id (a generate-mode classify job) or dialogue=true")
        run = inputs.classify_run(spec.classify_job_id)
        items = _classify_items(run)
        label_names = run.label_names or sorted({str(it["reference"]) for it in items})
        source = {"classify_job_id": run.job_id, "model": run.model, "adapter_id": run.adapter_id}
    chosen = sample_items(items, spec.sample, spec.seed)
    # The control pairs come from the items judged (the same articles, the same instructions).
    controls = control_items(chosen, label_names=label_names, n_pairs=spec.control_pairs,
                             n_repeats=spec.control_repeats, seed=spec.seed, pool=items)
    judge = make_judge(spec)
    try:
        rows, summary = judge_items(chosen, judge, spec, ctx, controls=controls)
    finally:
        close = getattr(judge, "close", None)
        if close:
            close()
    return {**source, "n": summary.n, "summary": summary.model_dump(mode="json")}
