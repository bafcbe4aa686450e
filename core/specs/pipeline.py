"""The pipeline spec: the prep spec plus one typed partial spec per stage, and the child specs built from them.

Each stage field (`train`, `classify`, `generate`, `judge`) is its job spec less the fields the pipeline
fills in itself (dataset, adapter and job ids, the model, the mode): same types, same bounds, unknown keys
refused. So a bad setting (`train.lora.rank=-5`) or a typo (`train.lerning_rate`) is a 422 naming
`train.lora.rank` when the pipeline is submitted, not a child that can never be created. The child specs
are built here and nowhere else (`train_spec`, `score_spec`, ...), and the submit-time check builds every
one of them through its real spec (TrainSpec, ClassifySpec, JudgeSpec) with placeholder ids.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from core.paths import SpecPath
from core.specs.base import Spec, model_paths
from core.specs.classify import ClassifySpec
from core.specs.evaluate import EvaluateSpec
from core.specs.judge import JudgeSpec
from core.specs.prep import PrepSpec
from core.specs.train import TrainSpec


def _stage_spec(name: str, base: type[Spec], *, filled: set[str], doc: str,
                override: dict[str, tuple[Any, FieldInfo]] | None = None) -> type[Spec]:
    """`base` less the fields the pipeline fills in (`filled`): the same field types, bounds and defaults."""
    assert filled <= set(base.model_fields), filled - set(base.model_fields)
    fields: dict[str, Any] = {n: (f.annotation, f) for n, f in base.model_fields.items() if n not in filled}
    fields.update(override or {})
    return create_model(name, __base__=Spec, __doc__=doc, __module__=__name__, **fields)


TrainStage = _stage_spec(
    "TrainStage", TrainSpec, filled={"dataset_id", "model"},
    doc="TrainSpec fields other than dataset_id and model (the pipeline's prep output and its model).")
ClassifyStage = _stage_spec(
    "ClassifyStage", ClassifySpec, filled={"items", "input_file", "dataset_id", "split", "model", "adapter_id",
                                           "mode"},
    doc="ClassifySpec fields for the score-mode runs (base and adapter, on the prepared test split).")
GenerateStage = _stage_spec(
    "GenerateStage", ClassifySpec, filled={"items", "input_file", "dataset_id", "split", "model", "adapter_id",
                                           "mode"},
    doc="ClassifySpec fields for the generate-mode runs (instruction following, and what the judge reads).",
    override={"max_new_tokens": (int, Field(default=8, ge=1, le=1024,
                                            description="most tokens generated (a label is 1-4)"))})
JudgeStage = _stage_spec(
    "JudgeStage", JudgeSpec, filled={"classify_job_id", "model", "adapter_id"},
    doc="JudgeSpec fields for the judge runs; `dialogue` adds the general-instruction runs.",
    override={"dialogue": (bool, Field(default=True, description="also judge general (non-classification) "
                                                                 "answers of the base and fine-tuned models"))})


class PipelineSpec(Spec):
    """The main job: prepare, fine-tune, classify (base and adapter), judge, evaluate, report."""

    name: str = "agnews"
    prep: PrepSpec = Field(default_factory=PrepSpec)
    model: str = "smollm2-135m"
    train: TrainStage = Field(default_factory=TrainStage)
    classify: ClassifyStage = Field(default_factory=ClassifyStage)
    eval_limit: int | None = Field(default=None, ge=1, description="classify at most this many test items")
    generate: GenerateStage = Field(default_factory=GenerateStage)
    generate_limit: int | None = Field(default=100, ge=0, description="generate-mode items per model; 0: none")
    judge: JudgeStage | None = Field(default_factory=JudgeStage, description="null to skip judging")
    reuse_adapter: bool = False
    until: Literal["evaluate", "train"] = Field(
        default="evaluate", description="the last stage: evaluate runs them all; train ends the pipeline once its "
        "adapter is trained (prep -> train, as an OpenAI fine-tuning job does)")

    # ------------------------------------------------------------ the child specs (dicts for parse_spec)

    def train_spec(self, dataset_id: int) -> dict[str, Any]:
        return {**self.train.model_dump(mode="json"), "model": self.model, "dataset_id": dataset_id}

    def score_spec(self, dataset_id: int, adapter_id: int | None = None) -> dict[str, Any]:
        return self._classify_spec(self.classify, "score", self.eval_limit, dataset_id, adapter_id)

    def generate_spec(self, dataset_id: int, adapter_id: int | None = None) -> dict[str, Any]:
        return self._classify_spec(self.generate, "generate", self.generate_limit, dataset_id, adapter_id)

    def _classify_spec(self, stage: Spec, mode: str, limit: int | None, dataset_id: int,
                       adapter_id: int | None) -> dict[str, Any]:
        """A classify child on the dataset's test split (at most `limit` items when set and non-zero)."""
        spec = {**stage.model_dump(mode="json"), "model": self.model, "split": "test", "mode": mode,
                "dataset_id": dataset_id}
        if limit:
            spec["limit"] = limit
        return _with_adapter(spec, adapter_id)

    def judge_spec(self, classify_job_id: int) -> dict[str, Any]:
        assert self.judge is not None
        return {**self.judge.model_dump(mode="json", exclude={"dialogue"}), "classify_job_id": classify_job_id}

    def dialogue_spec(self, adapter_id: int | None = None) -> dict[str, Any]:
        assert self.judge is not None
        spec = {**self.judge.model_dump(mode="json", exclude={"dialogue", "sample"}), "dialogue": True,
                "model": self.model, "sample": None}
        return _with_adapter(spec, adapter_id)

    def paths(self) -> list[SpecPath]:
        """Every child's paths: the prep sources, classes files and tokenizer, the model, the local judge's."""
        prep = [SpecPath(f"prep.{p.field}", p.value, p.kind, p.hub) for p in self.prep.paths()]
        judge = model_paths("judge.judge_model", self.judge.judge_model) \
            if self.judge is not None and self.judge.backend == "local" else []
        return prep + model_paths("model", self.model) + judge

    @property
    def judges_generations(self) -> bool:
        return bool(self.generate_limit) and self.judge is not None

    @property
    def judges_dialogue(self) -> bool:
        return self.judge is not None and self.judge.dialogue

    @model_validator(mode="after")
    def _every_stage_builds(self) -> "PipelineSpec":
        """Build each child spec through its real spec class now, so no stage can fail to be created later."""
        checks: list[tuple[str, type[Spec], dict[str, Any]]] = [
            ("train", TrainSpec, self.train_spec(1)), ("classify", ClassifySpec, self.score_spec(1, 1))]
        if self.generate_limit:
            checks.append(("generate", ClassifySpec, self.generate_spec(1, 1)))
        if self.judges_generations:
            checks.append(("judge", JudgeSpec, self.judge_spec(1)))
        if self.judges_dialogue:
            checks.append(("judge", JudgeSpec, self.dialogue_spec(1)))
        checks.append(("evaluate", EvaluateSpec, {"name": self.name, "classify_job_ids": [1, 2]}))
        for stage, spec_cls, child in checks:
            try:
                spec_cls.model_validate(child)
            except ValidationError as e:
                raise ValueError("; ".join(f"{'.'.join(map(str, (stage, *err['loc'])))}: {err['msg']}"
                                           for err in e.errors(include_url=False))) from None
        return self


def _with_adapter(spec: dict[str, Any], adapter_id: int | None) -> dict[str, Any]:
    return spec if adapter_id is None else {**spec, "adapter_id": adapter_id}
