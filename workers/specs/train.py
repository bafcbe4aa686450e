from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.specs.base import Spec


class LoraSpec(Spec):
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class TrainSpec(Spec):
    """LoRA fine-tuning of a causal LM on a prepared dataset."""

    dataset_id: int = Field(ge=1)
    model: str = Field(default="smollm2-135m", description="model preset or local checkpoint folder")
    backend: Literal["peft", "torchtune"] = "peft"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    batch_size: int = Field(default=8, ge=1, le=4096)
    grad_accum: int = Field(default=1, ge=1, le=1024)
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(default=1.0, gt=0)
    max_seq_len: int = Field(default=256, ge=16, description="prompt is truncated to fit, never the label")
    max_train_samples: int | None = Field(default=None, ge=1)
    train_on_input: bool = False
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    device: str = "auto"
    eval_every: int = Field(default=50, ge=1, description="validation loss/accuracy every N optimizer steps")
    val_samples: int = Field(default=200, ge=1)
    save_every: int = Field(default=50, ge=1, description="checkpoint every N optimizer steps")
    early_stopping_patience: int | None = Field(default=None, ge=1, description="evals without val-loss gain")
    wandb: bool = False
    reuse: bool = Field(default=False, description="pipelines: reuse an adapter trained with the same spec")

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        return self
