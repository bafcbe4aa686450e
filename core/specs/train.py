from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.paths import SpecPath
from core.specs.base import Spec, model_paths


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSpec(Spec):
    rank: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32.0, gt=0, description="scaling is alpha / rank")
    # 0 by default: one epoch over a few thousand examples does not overfit, and dropout on every adapted
    # layer's input costs ~10% of a CPU step.
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR), min_length=1,
                                      description="linear layer names (Llama: attention and MLP), or ['all-linear']")
    # The backward pass stops at the lowest adapted layer (nothing below it has a trainable weight), so
    # adapting the top half of the decoder makes a CPU step ~30% shorter (SmolLM2, 2 cores).
    top_layers: int | None = Field(default=None, ge=1, description="adapt only the decoder's top N layers "
                                   "(those nearest the LM head); None: every layer")

    def adapted_layers(self, n_layers: int) -> list[int] | None:
        """Indices of the decoder layers `top_layers` names (the top N of `n_layers`), or None for all.

        Raises:
            ValueError: top_layers is more than the model has.
        """
        if self.top_layers is None:
            return None
        if self.top_layers > n_layers:
            raise ValueError(f"lora.top_layers={self.top_layers}, but the model has {n_layers} decoder layers: "
                             f"use at most {n_layers} (or null for all)")
        return list(range(n_layers - self.top_layers, n_layers))


TORCHTUNE_ALL_LAYERS = ("lora.top_layers: the torchtune backend adapts every decoder layer; use backend 'peft' "
                        "to adapt only the top layers, or set lora.top_layers to null")


class TrainSpec(Spec):
    """LoRA fine-tuning of a causal LM on a prepared dataset."""

    dataset_id: int = Field(ge=1)
    model: str = Field(default="smollm2-135m", description="model preset or local checkpoint folder")
    backend: Literal["peft", "torchtune"] = "peft"
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = Field(default=3e-4, gt=0, le=1, description="peak; linear warm-up, then cosine decay")
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="clip the LoRA gradients' norm; None: off")
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per micro-batch (the shared "
                            "prompt prefix is computed once per micro-batch, so larger is cheaper per example)")
    grad_accum: int = Field(default=1, ge=1, le=1024)
    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; overrides epochs")
    epochs: float = Field(default=1.0, gt=0)
    max_seq_len: int = Field(default=160, ge=16, description="prompt + label + EOS tokens; the article is cut "
                             "to fit, never the template or the label (AG News alpaca prompts: p95 ~157)")
    max_train_samples: int | None = Field(default=None, ge=1)
    train_on_input: bool = Field(default=False, description="also train on the prompt's tokens (the loss "
                                 "then covers them too); validation loss is always the response's (label + EOS)")
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    device: str = "auto"
    eval_every: int = Field(default=100, ge=1, description="validation every N optimizer steps: one scoring "
                            "pass gives the accuracy and the loss per response token (label + EOS)")
    val_samples: int = Field(default=128, ge=1, description="validation records used for val loss/accuracy")
    save_every: int = Field(default=100, ge=1, description="checkpoint every N optimizer steps")
    early_stopping_patience: int | None = Field(default=None, ge=1,
                                                description="validations without a gain in early_stopping_metric")
    early_stopping_metric: Literal["val_loss", "val_accuracy"] = Field(
        default="val_loss", description="what early stopping watches: validation loss (down) or accuracy (up)")
    lean_forward: bool = Field(default=True, description="CPU Llama with one dropout-free LoRA: the packed "
                               "training forward (workers/modeling/lora_forward.py); false: PEFT's own layers")
    frozen_cache_gb: float = Field(default=4.0, ge=0, description="lora.top_layers with the lean forward: "
                                   "memory the trainer may use to keep the output of the frozen layers below the "
                                   "adapted ones, computed once an example before the first step, so that a step "
                                   "runs only the adapted layers (~0.5 GB for 7,557 AG News articles on "
                                   "SmolLM2); 0: run them every step")
    wandb: bool = False
    reuse: bool = Field(default=False, description="pipelines: reuse an adapter trained with the same spec")
    max_minutes: float | None = Field(
        default=None, gt=0, le=7 * 24 * 60,
        description="time budget (PEFT loop): the run plans its schedule (cosine length, so validations) from "
                    "its first steps' measured speed and its first validation's time to end within this many "
                    "minutes from its start, model loading included, plus one final validation; epochs is then "
                    "ignored and max_steps, when set, caps the plan")
    keep_best: bool = Field(default=False, description="export the weights of the best validation (by "
                            "early_stopping_metric), not the last step's; the result names that step")

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        if self.backend == "torchtune" and self.lora.top_layers is not None:
            raise ValueError(TORCHTUNE_ALL_LAYERS)
        if self.backend == "torchtune" and (self.max_minutes is not None or self.keep_best):
            raise ValueError("max_minutes and keep_best: the time budget and the best-checkpoint export are the "
                             "PEFT loop's; use backend 'peft'")
        return self

    def paths(self) -> list[SpecPath]:
        """The model, where it names a local checkpoint folder (the dataset is a row id)."""
        return model_paths("model", self.model)
