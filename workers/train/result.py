"""What a training run hands on, built in one place for both backends: the adapter's `newslora.json`
(`AdapterMeta`) and the run's `TrainResult`.

    build = ResultBuilder(spec, dataset_meta, model_dir=model_dir, model_digest=digest, backend="peft")
    build.adapter_meta(steps).save(adapter_tmp_dir)        # inside the adapter's atomic write
    return build.result(adapter_dir=..., steps=..., total_steps=..., metrics=..., history=...)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from core.contracts.adapter import AdapterMeta
from core.contracts.dataset import DatasetMeta
from core.contracts.train import EvalPoint, TrainMetrics, TrainResult
from core.specs.train import TrainSpec
from core.version import code_version

ADAPTER_META = AdapterMeta.FILE_NAME  # the adapter folder's newslora.json


@dataclass(frozen=True)
class ResultBuilder:
    """The facts of a run that its adapter meta and its result share: the spec, the dataset it read, the
    base model it adapted and the backend that trained it."""

    spec: TrainSpec
    dataset: DatasetMeta
    model_dir: Path
    model_digest: str
    backend: Literal["peft", "torchtune"]
    torchtune_version: str | None = None

    def adapter_meta(self, steps: int) -> AdapterMeta:
        """The adapter's newslora.json after `steps` optimizer steps (also a checkpoint's spec.json)."""
        return AdapterMeta(template=self.dataset.template, instruction=self.dataset.instruction,
                           label_names=list(self.dataset.label_names), base_model=self.spec.model,
                           base_model_path=str(self.model_dir), base_model_digest=self.model_digest,
                           dataset_hash=self.dataset.hash, steps=steps, max_seq_len=self.spec.max_seq_len,
                           spec=self.spec.model_dump(mode="json"), code_version=code_version(),
                           backend=self.backend, torchtune_version=self.torchtune_version)

    def write_adapter_meta(self, folder: Path, steps: int) -> Path:
        """Write newslora.json into an adapter folder (the folder's atomic write is the caller's)."""
        return self.adapter_meta(steps).save(folder)

    def result(self, *, adapter_dir: Path, steps: int, total_steps: int, metrics: dict[str, Any],
               history: Sequence[dict[str, Any]], resumed_from_step: int | None) -> TrainResult:
        """The run's result.

        Args:
            metrics: the run's summary (`TrainMetrics` fields).
            history: one row per validation (`EvalPoint` fields; a metrics.jsonl eval row's `type` dropped).
        """
        return TrainResult(adapter_dir=str(adapter_dir), base_model=self.spec.model,
                           base_model_digest=self.model_digest, template=self.dataset.template,
                           instruction=self.dataset.instruction, label_names=list(self.dataset.label_names),
                           dataset_hash=self.dataset.hash, steps=steps, total_steps=total_steps,
                           metrics=TrainMetrics.model_validate(metrics),
                           history=[EvalPoint.model_validate({k: v for k, v in row.items() if k != "type"})
                                    for row in history],
                           resumed_from_step=resumed_from_step, backend=self.backend)
