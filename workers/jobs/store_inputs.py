"""What job handlers read from the store: a prepared dataset's folder, an adapter, a classify run to judge,
the rows an evaluation compares. Each says what to do when the thing a job names is not there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.specs.evaluate import EvaluateSpec
from db import results as resq
from db.models import Dataset, Job, ModelArtifact
from db.session import session_scope
from workers.data.prep import load_records
from workers.evaluation.evaluate import EvaluationInputs
from workers.inference.adapter import AdapterRef
from workers.judge import ClassifyRun, JudgeInputError


class InputError(ValueError):
    """A job names something that is not there (dataset, adapter, job): the message says what to do."""


def prepared_dataset(dataset_id: int) -> tuple[Path, Dataset]:
    """The folder of a prepared dataset (readable on this worker) and its row.

    Raises:
        InputError: no such dataset, or its folder is not mounted here.
    """
    with session_scope() as s:
        ds = resq.get_dataset(dataset_id, session=s)
        if ds is None:
            raise InputError(f"dataset {dataset_id} is not prepared: run a prep job first (`newslora prep ...`) "
                             f"and use the dataset_id it reports")
    if not Path(ds.path).is_dir():
        raise InputError(f"dataset {dataset_id}'s folder {ds.path} is not readable on this worker: mount the "
                         f"shared artifact volume (NEWSLORA_HOME) at the same path on every worker")
    return Path(ds.path), ds


def adapter_artifact(adapter_id: int) -> ModelArtifact:
    """The adapter's row.

    Raises:
        InputError: no adapter with this id.
    """
    with session_scope() as s:
        art = resq.get_artifact(adapter_id, session=s)
        if art is None or art.kind != "adapter":
            raise InputError(f"no adapter with id {adapter_id}: list adapters with `newslora models list`")
        return art


def adapter_ref(adapter_id: int) -> AdapterRef:
    """The adapter as inference takes it (its newslora.json is read once, on first use of `.meta`)."""
    return AdapterRef(adapter_id, Path(adapter_artifact(adapter_id).path))


class StoreJudgeInputs:
    """What a judge job reads from the store (`workers.judge.JudgeInputs`)."""

    def classify_run(self, job_id: int) -> ClassifyRun:
        with session_scope() as s:
            cj = s.get(Job, job_id)
            if cj is None or cj.kind != "classify":
                raise JudgeInputError(f"job {job_id} is not a classify job")
            preds, cresult, cspec = resq.all_predictions(cj.id, session=s), cj.result or {}, cj.spec
        records = {}
        if cspec.get("dataset_id"):
            records = {str(r["id"]): r for r in load_records(prepared_dataset(cspec["dataset_id"])[0],
                                                             cspec.get("split", "test"))}
        return ClassifyRun(job_id=job_id, mode=cspec.get("mode"), predictions=preds,
                           instruction=cresult.get("instruction") or "", label_names=cresult.get("label_names") or [],
                           records=records, model=cspec.get("model"), adapter_id=cspec.get("adapter_id"))

    def adapter(self, adapter_id: int) -> tuple[Path, str]:
        ref = adapter_ref(adapter_id)
        return ref.path, ref.meta.template  # required by the adapter's contract


def _run_name(cspec: dict[str, Any], n_adapters: int) -> str:
    if not cspec.get("adapter_id"):
        return "base"
    return "fine-tuned" if n_adapters == 1 else f"lora#{cspec['adapter_id']}"


def _succeeded_jobs(s: Any, ids: list[int], what: str) -> list[Job]:
    jobs = []
    for i in ids:
        j = s.get(Job, i)
        if j is None or j.kind != what:
            raise InputError(f"job {i} is not a {what} job")
        if j.status != "succeeded":
            raise InputError(f"{what} job {i} is {j.status}, not succeeded")
        jobs.append(j)
    return jobs


def evaluation_inputs(spec: EvaluateSpec) -> EvaluationInputs:
    """The rows an evaluate job reads: predictions and judge rows by model name, and where the data lies.

    Raises:
        InputError: a job the spec names is missing, of another kind, or did not succeed.
    """
    with session_scope() as s:
        cjobs, gjobs, jjobs = (_succeeded_jobs(s, spec.classify_job_ids, "classify"),
                               _succeeded_jobs(s, spec.generate_job_ids, "classify"),
                               _succeeded_jobs(s, spec.judge_job_ids, "judge"))
        n_adapters = len({j.spec.get("adapter_id") for j in cjobs if j.spec.get("adapter_id")})
        inputs = EvaluationInputs(
            runs={_run_name(j.spec, n_adapters): resq.all_predictions(j.id, session=s) for j in cjobs},
            generate_runs={_run_name(j.spec, n_adapters): resq.all_predictions(j.id, session=s) for j in gjobs},
            label_names=(cjobs[0].result or {}).get("label_names") or [],
            split=cjobs[0].spec.get("split", "test"))
        for j in jjobs:
            rows = resq.judge_scores(j.id, session=s)
            (inputs.dialogue if j.spec.get("dialogue") else inputs.judged)[_run_name(j.result or j.spec,
                                                                                      n_adapters)] = rows
        adapter_ids = [j.spec["adapter_id"] for j in cjobs if j.spec.get("adapter_id")]
        inputs.models_used = {"base_model": cjobs[0].spec.get("model"), "adapter_ids": adapter_ids,
                              "classify_job_ids": spec.classify_job_ids}
        dataset_id = cjobs[0].spec.get("dataset_id")
    if dataset_id is not None:
        inputs.dataset_dir = prepared_dataset(dataset_id)[0]
    if adapter_ids:
        inputs.run_dir = Path(adapter_artifact(adapter_ids[0]).path).parent
    return inputs
