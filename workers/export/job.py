"""Export a trained adapter for use outside newslora: the PEFT folder, a merged checkpoint, or GGUF + an
Ollama Modelfile, each checked by reloading it the way its users will.

`export_adapter` is the plain function an export job calls (it knows nothing of Celery):

    result = export_adapter(ExportSpec(adapter_id=3, format="gguf", quant="f16"), AdapterRef(3, adapter_dir),
                            Path("exports/job-9"), ctx, dataset_dir=Path("datasets/job-1"))

The export folder appears at `out_dir` only when complete and verified (built next to it, then renamed);
on any error, a full disk or a failed check included, nothing is left behind. Its `export.json`
(`ExportManifest`) says what it holds and how it was checked.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from core.atomic import atomic_dir
from core.context import JobContext
from core.contracts.adapter import AdapterMeta
from core.contracts.export import ExportManifest
from core.specs.classify import ClassifySpec
from core.specs.export import ExportSpec
from core.version import code_version
from core.settings import get_settings
from workers.export.llamacpp import llamacpp_version
from workers.export.gguf_writer import GGUFExportError, base_tokenizer_pre, check_llama, write_gguf
from workers.export.modelfile import render_modelfile
from workers.inference.adapter import AdapterError, AdapterRef
from workers.inference.items import load_items
from workers.modeling.registry import ModelNotFound, model_digest, resolve_model

class ExportError(ValueError):
    """The export cannot be made (bad input, unsupported model, full disk): the message says what to do."""


class ExportCheckFailed(ExportError):
    """The reloaded export does not classify like the adapter: the message carries the numbers."""

    def __init__(self, message: str, verification: dict[str, Any]):
        super().__init__(message)
        self.verification = verification


def export_adapter(spec: ExportSpec, adapter: AdapterRef, out_dir: Path, ctx: JobContext, *,
                   dataset_dir: Path | None, dataset_hash: str | None = None) -> dict[str, Any]:
    """Export one adapter in `spec.format` to `out_dir`, verified.

    Args:
        adapter: the adapter (id + the folder with the PEFT weights and newslora.json, read once as `adapter.meta`).
        out_dir: the export's folder (must not exist yet; a leftover is replaced).
        dataset_dir: the prepared dataset whose test split the check classifies (None: spec.verify off).

    Returns:
        {"path", "format", "quant", "files", "hash", "verification", "manifest"}.

    Raises:
        ExportError: the adapter, its base model, the quant or the disk rule the export out, with what to do.
        ExportCheckFailed: the reloaded export disagrees with the adapter on too many articles.
        JobCancelled: from ctx.check_cancel(); nothing is left behind.
    """
    try:
        meta = adapter.meta
    except AdapterError as e:
        raise ExportError(str(e)) from e
    if not meta.base_model:
        raise ExportError(f"adapter {adapter.adapter_id}: newslora.json names no base model; retrain it with newslora")
    try:
        base_dir = resolve_model(meta.base_model)
    except ModelNotFound as e:
        raise ExportError(f"adapter {adapter.adapter_id}'s base model is not available here: {e}") from e
    if meta.base_model_digest and model_digest(meta.base_model) != meta.base_model_digest:
        raise ExportError(f"adapter {adapter.adapter_id} was trained on a different {meta.base_model!r} "
                          f"(digest {meta.base_model_digest}, here {model_digest(meta.base_model)}): export it "
                          f"where its base model is")
    if spec.format == "gguf":
        _check_gguf_base(base_dir)
    if spec.verify and spec.format != "peft" and dataset_dir is None:
        raise ExportError("verification needs the adapter's prepared dataset (its test split), and there is none: "
                          "give dataset_id, or verify=false to export unchecked")
    label_names = list(meta.label_names or [])
    if not label_names:
        raise ExportError(f"adapter {adapter.adapter_id}: newslora.json names no labels; retrain it with newslora")
    manifest = ExportManifest(format=spec.format, quant=spec.quant, adapter_id=adapter.adapter_id,
                              base_model=meta.base_model, base_model_digest=meta.base_model_digest,
                              dataset_hash=dataset_hash or getattr(meta, "dataset_hash", None),
                              label_names=label_names, instruction=meta.instruction or "",
                              template=meta.template, code_version=code_version())

    scratch = Path(ctx.work_dir) / f"export-verify-{uuid.uuid4().hex[:8]}"
    try:
        with atomic_dir(Path(out_dir)) as tmp:  # a re-delivered job's unregistered leftover is replaced
            ctx.event(f"exporting adapter {adapter.adapter_id} as {spec.format}"
                      + (f" ({spec.quant})" if spec.quant else ""))
            manifest.verification = _write_and_check(spec, adapter, meta, base_dir, tmp, scratch, manifest,
                                                     dataset_dir, ctx)
            manifest.files = _file_table(tmp)
            manifest.save(tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ExportError(f"the disk filled up while writing the export (nothing was kept): free space under "
                              f"{Path(out_dir).parent} and run the export again") from e
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()[:32]
    return {"path": str(Path(out_dir)), "format": spec.format, "quant": spec.quant, "files": manifest.files,
            "hash": digest, "verification": manifest.verification, "manifest": manifest.model_dump(mode="json")}


# ---------------------------------------------------------------- formats

def _write_and_check(spec: ExportSpec, adapter: AdapterRef, meta: AdapterMeta, base_dir: Path, tmp: Path, scratch: Path,
                     manifest: ExportManifest, dataset_dir: Path | None, ctx: JobContext) -> dict[str, Any] | None:
    """Write the export's files into `tmp`; return what reloading them showed (None: spec.verify off)."""
    if spec.format == "peft":
        _write_peft(adapter.path, tmp)
        return _check_peft(tmp, base_dir) if spec.verify else None
    model, tokenizer = _merged(adapter.path, base_dir)
    ctx.check_cancel()
    if spec.format == "merged":
        _write_merged(model, tokenizer, base_dir, tmp)
        reload_dir, how = tmp, "transformers"
    else:
        gguf_name = _write_gguf(model, tokenizer, base_dir, tmp, spec, manifest)
        reload_dir, how = None, f"transformers gguf_file= ({spec.quant})"
    del model
    ctx.check_cancel()
    if not spec.verify:
        return None
    if spec.format == "gguf" and _gguf_loader(spec) == "llama.cpp":
        return _verify_in_llamacpp(spec, tmp / gguf_name, base_dir, adapter, meta, dataset_dir, ctx)
    if reload_dir is None:
        from workers.export.verify import reload_gguf_as_checkpoint  # lazy: torch; the API imports this package
        reload_dir = reload_gguf_as_checkpoint(tmp, gguf_name, scratch / "reloaded")
    return _verify(spec, reload_dir, how, adapter, meta, dataset_dir, ctx)


def _check_gguf_base(base_dir: Path) -> None:
    from transformers import AutoConfig  # lazy: transformers is heavy; the API imports this package
    try:
        check_llama(AutoConfig.from_pretrained(base_dir))
    except GGUFExportError as e:
        raise ExportError(str(e)) from e


def _write_peft(adapter_dir: Path, out: Path) -> None:
    for f in sorted(Path(adapter_dir).iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)


def _check_peft(out: Path, base_dir: Path) -> dict[str, Any]:
    """The copied folder loads with `PeftModel.from_pretrained` onto the base model."""
    import torch  # lazy: torch, peft, transformers; the API imports this package (workers.export.archive)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    n_lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return {"reloaded_with": "peft PeftModel.from_pretrained", "lora_parameters": n_lora, "passed": n_lora > 0}


def _merged(adapter_dir: Path, base_dir: Path):
    """The base model with the LoRA weights merged in (fp32, so the merge itself rounds nothing), + tokenizer."""
    import torch  # lazy: torch, peft, transformers; the API imports this package (workers.export.archive)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return model.eval(), AutoTokenizer.from_pretrained(base_dir)


def _stored_dtype(base_dir: Path):
    """The dtype the base checkpoint is stored in (its config's `dtype`), so the export is no larger."""
    import torch  # lazy: torch; the API imports this package (workers.export.archive)
    raw = json.loads((base_dir / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def _write_merged(model, tokenizer, base_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig  # lazy: transformers; the API imports this package
    model.to(_stored_dtype(base_dir))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gen = GenerationConfig.from_model_config(model.config)
    # newslora's generate mode: greedy, a label's few tokens.
    gen.do_sample, gen.max_new_tokens = False, 16
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen.save_pretrained(out)


def _write_gguf(model, tokenizer, base_dir: Path, out: Path, spec: ExportSpec, manifest: ExportManifest) -> str:
    name = spec.name or f"newslora-adapter{manifest.adapter_id}"
    gguf_name = f"{name}.{spec.quant}.gguf"
    try:
        write_gguf(model, tokenizer, out / gguf_name, quant=spec.quant, name=name,
                   tokenizer_pre=base_tokenizer_pre(base_dir),
                   description=f"newslora adapter {manifest.adapter_id} merged into {manifest.base_model}; "
                               f"labels: {', '.join(manifest.label_names)}")
    except GGUFExportError as e:
        raise ExportError(str(e)) from e
    (out / "Modelfile").write_text(render_modelfile(
        gguf_name, instruction=manifest.instruction or "", template=manifest.template,
        label_names=manifest.label_names, tokenizer=tokenizer, adapter_id=manifest.adapter_id,
        base_model=manifest.base_model), encoding="utf-8")
    return gguf_name


# ---------------------------------------------------------------- verification

def _min_agreement(spec: ExportSpec) -> float:
    if spec.min_agreement is not None:
        return spec.min_agreement
    return 0.95 if spec.quant == "q8_0" else 0.99


def _verify(spec: ExportSpec, reload_dir: Path, how: str, adapter: AdapterRef, meta: AdapterMeta, dataset_dir: Path,
            ctx: JobContext) -> dict[str, Any]:
    from workers.export.verify import compare_to_adapter  # lazy: torch; the API imports this package
    items = _verification_items(spec, dataset_dir)
    ctx.event(f"verifying: {len(items)} test articles through the adapter and through the reloaded export ({how})")
    v = compare_to_adapter(reload_dir, items, adapter=adapter, base_model=meta.base_model,
                           label_names=list(meta.label_names), instruction=meta.instruction or "",
                           template=meta.template, min_agreement=_min_agreement(spec), reloaded_with=how,
                           dtype=spec.dtype, device=spec.device, batch_size=spec.batch_size, ctx=ctx)
    return _report_check(spec, v, ctx)


def _gguf_loader(spec: ExportSpec) -> str:
    """llama.cpp where it is installed (or asked for), else transformers' GGUF loader."""
    if spec.gguf_loader == "llama.cpp" and llamacpp_version() is None:
        raise ExportError("gguf_loader='llama.cpp' but llama-cpp-python is not installed on this worker: "
                          "`make install-llamacpp`, or gguf_loader='auto'")
    if spec.gguf_loader == "auto":
        return "llama.cpp" if llamacpp_version() is not None else "transformers"
    return spec.gguf_loader


def _verification_items(spec: ExportSpec, dataset_dir: Path) -> list[dict]:
    items, _ = load_items(ClassifySpec(dataset_id=spec.dataset_id or 1, split="test", limit=spec.verify_samples),
                          dataset_dir)
    if not items:
        raise ExportError(f"the dataset at {dataset_dir} has no test articles to verify the export with")
    return items


def _verify_in_llamacpp(spec: ExportSpec, gguf_path: Path, base_dir: Path, adapter: AdapterRef, meta: AdapterMeta,
                        dataset_dir: Path, ctx: JobContext) -> dict[str, Any]:
    from workers.export.verify import compare_gguf_in_llamacpp  # lazy: torch; the API imports this package
    items = _verification_items(spec, dataset_dir)
    ctx.event(f"verifying: {len(items)} test articles through the adapter and through the GGUF in llama.cpp")
    v = compare_gguf_in_llamacpp(gguf_path, base_dir, items, adapter=adapter, base_model=meta.base_model,
                                 label_names=list(meta.label_names), instruction=meta.instruction or "",
                                 template=meta.template, min_agreement=_min_agreement(spec), quant=spec.quant or "f16",
                                 dtype=spec.dtype, device=spec.device, batch_size=spec.batch_size,
                                 threads=get_settings().torch_threads, ctx=ctx)
    return _report_check(spec, v, ctx)


def _report_check(spec: ExportSpec, v, ctx: JobContext) -> dict[str, Any]:
    """Record the check's outcome; a failed check fails the export (nothing is kept)."""
    ctx.event(f"verification {'passed' if v.passed else 'FAILED'}: {v.summary()}",
              level="info" if v.passed else "error", metrics=v.as_dict())
    if not v.passed:
        raise ExportCheckFailed(f"the {spec.format} export failed its check: {v.summary()}; nothing was kept",
                                v.as_dict())
    return v.as_dict()


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    table = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            table[str(f.relative_to(folder))] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}
    return table
