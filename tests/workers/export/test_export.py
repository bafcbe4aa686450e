"""Exports: the GGUF writer's round trip (a seeded tiny Llama, and the real SmolLM2 against the GGUF it
came from), the three formats reloaded as users will, bad input, and the job + API + client path."""
from __future__ import annotations

import csv
import errno
import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from core.context import LocalContext
from workers.export import ExportCheckFailed, ExportError, ExportManifest, export_adapter
from workers.export.gguf_writer import GGUFExportError, NotLlamaArchitecture, llama_cpp_permute, write_gguf
from workers.inference.classify import AdapterRef, clear_engines
from workers.modeling.registry import model_digest
from workers.modeling.prompts import render_prompt
from core.specs.export import ExportSpec

from tests.workers.export.conftest import INSTRUCTION, LABELS, N_TEST


def _load(folder: Path, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval(),
            AutoTokenizer.from_pretrained(folder, **kw))


def _prompt(text: str) -> str:
    return render_prompt(INSTRUCTION, text, template="alpaca")


# ---------------------------------------------------------------- the writer

def test_permutation_is_the_inverse_of_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)  # 3 heads of dim 4 (k: 3 kv heads; q: 6 heads)
    reader = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 3})
    back = reader.process(llama_cpp_permute(w, 6, 3), "blk.0.attn_k.weight").weights
    np.testing.assert_array_equal(back, w)
    # Within a head, HF's halves (0,1 | 2,3) become llama.cpp's adjacent pairs (0,2,1,3).
    np.testing.assert_array_equal(llama_cpp_permute(w, 6, 3)[:4, 0], w[[0, 2, 1, 3], 0])


def test_tiny_llama_round_trips_exactly_in_f16(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    info = write_gguf(model, tok, tmp_path / "tiny.f16.gguf", quant="f16", name="tiny", tokenizer_pre="smollm")
    assert info["tied_embeddings"] and not list(tmp_path.glob(".*partial"))
    back, back_tok = _load(tmp_path, "tiny.f16.gguf")
    sd, got = model.state_dict(), back.state_dict()
    assert set(got) == set(sd)
    for name, t in sd.items():  # matrices: exactly their f16 rounding; norms: exact (stored f32)
        assert torch.equal(got[name], t.half().float() if t.ndim == 2 else t), name
    assert back.config.tie_word_embeddings
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    text = _prompt("Stocks fell 3% on Wall St. <|endoftext|> as oil rose; café naïve 東京.")
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert (back_tok.bos_token_id, back_tok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_q8_0_is_within_its_quantization_error(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    write_gguf(model, tok, tmp_path / "tiny.q8_0.gguf", quant="q8_0", name="tiny")
    back, _ = _load(tmp_path, "tiny.q8_0.gguf")
    got = back.state_dict()
    for name, t in model.state_dict().items():
        if t.ndim == 2:  # Q8_0: blocks of 32 as int8 times an f16 step of max|w|/127: within half a step
            step = t.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            err = (got[name] - t).reshape(-1, 32).abs()
            assert bool((err <= step * 0.57 + 1e-7).all()), name  # + the f16 rounding of the scale
            assert not torch.equal(got[name], t.half().float()), name  # really quantized
        else:
            assert torch.equal(got[name], t), name


def test_unsupported_quant_and_non_llama_models_are_refused(tiny_model_dir, tmp_path):
    model, tok = _load(tiny_model_dir)
    with pytest.raises(GGUFExportError, match="unsupported GGUF quant 'q4_0': use one of f16, q8_0"):
        write_gguf(model, tok, tmp_path / "x.gguf", quant="q4_0", name="x")
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="'f16' or 'q8_0'"):
        ExportSpec(adapter_id=1, quant="q4_0")
    with pytest.raises(ValidationError, match="quant applies to format 'gguf' only"):
        ExportSpec(adapter_id=1, format="merged", quant="f16")
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok)))
    with pytest.raises(NotLlamaArchitecture, match="'gpt2' model, not Llama-architecture"):
        write_gguf(gpt2, tok, tmp_path / "x.gguf", quant="f16", name="x")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_removes_the_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    import gguf
    model, tok = _load(tiny_model_dir)
    real = gguf.GGUFWriter.write_tensors_to_file

    def fills_up(self, *a, **kw):
        self.fout[0].write(b"\0" * 4096)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fills_up)
    with pytest.raises(GGUFExportError, match=r"disk filled up while writing x.f16.gguf \(partial file removed\)"):
        write_gguf(model, tok, tmp_path / "x.f16.gguf", quant="f16", name="x")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", real)


# ---------------------------------------------------------------- the real SmolLM2 against its packaged GGUF

def _packaged_gguf() -> Path:
    from workers.modeling.registry import model_presets
    p = model_presets()["smollm2-135m"]
    return Path(importlib.util.find_spec(p.package).origin).parent / p.gguf_file


def test_real_smollm2_round_trip_keeps_llama_cpp_layout_and_predictions(smollm2_dir, ag_news_dir, tmp_path):
    """SmolLM2 as newslora loaded it from the packaged GGUF, written back and reloaded: the same tensors in
    the same llama.cpp layout as the original file (Q/K permuted, no output.weight: tied embeddings), and
    the same labels on real articles."""
    from gguf import GGUFReader, dequantize
    from workers.export.gguf_writer import base_tokenizer_pre
    model, tok = _load(smollm2_dir)
    # The pre-tokenizer name comes from the GGUF the checkpoint was converted from, as in an export job.
    write_gguf(model, tok, tmp_path / "smol.f16.gguf", quant="f16", name="smol",
               tokenizer_pre=base_tokenizer_pre(smollm2_dir))
    ours_reader = GGUFReader(str(tmp_path / "smol.f16.gguf"))
    ours = {t.name: t for t in ours_reader.tensors}
    orig_reader = GGUFReader(str(_packaged_gguf()))
    orig = {t.name: t for t in orig_reader.tensors}
    assert set(ours) == set(orig) and "output.weight" not in ours
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.29.attn_k.weight", "token_embd.weight",
                 "blk.3.ffn_down.weight", "output_norm.weight"):
        a = dequantize(ours[name].data, ours[name].tensor_type)
        b = dequantize(orig[name].data, orig[name].tensor_type)
        assert a.shape == b.shape, name
        # The checkpoint is the original's de-quantized values; ours are their f16 rounding.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6, err_msg=name)
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.model", "llama.rope.freq_base", "llama.attention.head_count_kv"):
        assert ours_reader.fields[key].contents() == orig_reader.fields[key].contents(), key

    back, back_tok = _load(tmp_path, "smol.f16.gguf")  # transformers' gguf_file= loader
    got = back.state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(got[name], t, atol=0, rtol=2 ** -10, msg=name)  # f16: 10 mantissa bits
    # The same label on real articles: each label's log-likelihood after newslora's prompt.
    with (ag_news_dir / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(4), csv.reader(f))]
    for _, title, desc in rows:
        prompt = _prompt(f"{title} {desc}")
        assert back_tok(prompt)["input_ids"] == tok(prompt)["input_ids"]
        assert _label_scores(back, tok, prompt).argmax() == _label_scores(model, tok, prompt).argmax()


def _label_scores(model, tok, prompt: str) -> torch.Tensor:
    """Sum of log p(label tokens | prompt) per label (score mode, without its prefix cache): one forward
    over the labels' continuations, right-padded (causal: padding never reaches an earlier position)."""
    n = len(tok(prompt)["input_ids"])
    seqs = [tok(prompt + label)["input_ids"] for label in LABELS]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id or 0] * (width - len(s)) for s in seqs])  # (labels, width)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), -1)  # (labels, width, vocab)
    return torch.stack([sum(logp[i, j - 1, s[j]] for j in range(n, len(s))) for i, s in enumerate(seqs)])


# ---------------------------------------------------------------- export_adapter: the three formats

def _export(adapter, dataset, out, **spec):
    ctx = LocalContext(work_dir=out.parent)
    result = export_adapter(ExportSpec(adapter_id=adapter.adapter_id, dtype="fp32", device="cpu", **spec), adapter,
                            out, ctx, dataset_dir=dataset, dataset_hash="d" * 16)
    return result, ctx


def _adapter_logits(base_dir: Path, adapter: AdapterRef, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(adapter.path)).eval()(ids).logits


def test_peft_export_loads_with_peft_and_carries_the_metadata(tiny_model_dir, tiny_adapter, tiny_dataset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    result, _ = _export(tiny_adapter, tiny_dataset, tmp_path / "peft", format="peft")
    out = Path(result["path"])
    manifest = ExportManifest.load(out)
    assert (manifest.format, manifest.label_names, manifest.template) == ("peft", LABELS, "alpaca")
    assert manifest.base_model_digest == model_digest(tiny_model_dir) and manifest.dataset_hash == "d" * 16
    assert result["verification"]["passed"] and "adapter_model.safetensors" in manifest.files
    assert json.loads((out / "newslora.json").read_text())["instruction"] == INSTRUCTION
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
    torch.testing.assert_close(got, _adapter_logits(tiny_model_dir, tiny_adapter, ids))


def test_merged_export_loads_with_transformers_alone_and_passes_its_check(tiny_model_dir, tiny_adapter,
                                                                          tiny_dataset, tmp_path):
    clear_engines()
    result, ctx = _export(tiny_adapter, tiny_dataset, tmp_path / "merged", format="merged")
    out = Path(result["path"])
    v = result["verification"]
    assert v["passed"] and v["n"] == N_TEST and v["agreement"] == 1.0 and v["reloaded_with"] == "transformers"
    assert v["export_accuracy"] == v["adapter_accuracy"] is not None
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(result["files"])
    assert (out / "export.json").is_file()
    model, tok = _load(out)  # no peft, no newslora
    ids = torch.tensor([tok(_prompt("Markets rallied."))["input_ids"]])
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _adapter_logits(tiny_model_dir, tiny_adapter, ids), atol=1e-4, rtol=1e-4)
    assert any("verification passed" in e["message"] for e in ctx.events)


def test_gguf_export_with_modelfile_passes_its_check(tiny_adapter, tiny_dataset, tmp_path):
    result, _ = _export(tiny_adapter, tiny_dataset, tmp_path / "gguf", format="gguf", quant="f16", name="news",
                        gguf_loader="transformers")
    out = Path(result["path"])
    v = result["verification"]
    assert v["passed"] and v["n"] == N_TEST and v["agreement"] >= 0.99
    assert v["reloaded_with"] == "transformers gguf_file= (f16)"  # asked for: the fallback where llama.cpp is missing
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "news.f16.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./news.f16.gguf\n" in modelfile
    assert f"# labels: {', '.join(LABELS)}\n" in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    article = "Stocks rallied as the Fed held rates"
    assert template.replace("{{ .Prompt }}", article) == _prompt(article)  # newslora's prompt, exactly
    assert 'PARAMETER stop "###"' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile  # SmolLM2's EOS
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob("export-verify-*"))


def test_a_writer_without_the_qk_permutation_fails_the_check_and_keeps_nothing(tiny_adapter, tiny_dataset,
                                                                               tmp_path, monkeypatch):
    import workers.export.gguf_writer as writer
    monkeypatch.setattr(writer, "llama_cpp_permute", lambda w, n_head, n_head_kv=None: w)
    with pytest.raises(ExportCheckFailed, match=r"labels equal to the adapter's on \d+\.\d+% of 24 articles "
                                                r"\(needs 99%\); accuracy") as e:
        _export(tiny_adapter, tiny_dataset, tmp_path / "bad", format="gguf", gguf_loader="transformers")
    assert e.value.verification["agreement"] < 0.99
    assert list(tmp_path.iterdir()) == []  # no export folder, no temp folder, no verification scratch


def test_full_disk_during_an_export_leaves_nothing(tiny_adapter, tiny_dataset, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def fills_up(self, save_directory, *a, **kw):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fills_up)
    with pytest.raises(ExportError, match="disk filled up while writing the export"):
        _export(tiny_adapter, tiny_dataset, tmp_path / "full", format="merged")
    assert list(tmp_path.iterdir()) == []


def test_adapter_on_a_non_llama_base_is_refused_for_gguf(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "newslora.json").write_text(json.dumps({"template": "alpaca", "label_names": LABELS,
                                                       "instruction": INSTRUCTION, "base_model": str(base),
                                                       "base_model_digest": model_digest(base)}))
    with pytest.raises(ExportError, match="'gpt2' model, not Llama-architecture.*format 'merged' or 'peft'"):
        _export(AdapterRef(3, adapter), None, tmp_path / "out", format="gguf")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the job, the API and the client

def test_export_job_registers_the_export_and_the_client_downloads_it(newslora_home, tiny_model_dir, tiny_adapter,
                                                                     tiny_dataset, tmp_path):
    from fastapi.testclient import TestClient
    from api.app import app
    from api_client import Client
    from db import results as resq
    from db import jobs as jobq
    from db.session import init_db, session_scope
    from workers.jobs.runner import run_job
    from workers.jobs.handlers import HANDLERS
    init_db()
    with session_scope() as s:
        ds = resq.add_dataset(session=s, job_id=None, name="t", path=str(tiny_dataset), hash="d" * 16,
                              spec_hash="x", spec={}, meta={})
        ad = resq.add_model_artifact(session=s, job_id=None, kind="adapter", name="a", base_model=str(tiny_model_dir),
                                     path=str(tiny_adapter.path), spec={}, dataset_id=ds.id, dataset_hash="d" * 16)
        adapter_id = ad.id

    def job(spec):
        with session_scope() as s:
            jid = jobq.create_job(session=s, kind="export", queue="cpu", spec=spec).id
        status = run_job(jid, "export", HANDLERS["export"])
        with session_scope() as s:
            j = jobq.get_job(jid, session=s)
            return status, j.result, j.error

    status, result, error = job({"adapter_id": adapter_id, "format": "gguf", "quant": "q8_0", "dtype": "fp32"})
    assert status == "succeeded", error
    assert result["verification"]["passed"] and result["verification"]["n"] == N_TEST
    status, _, error = job({"adapter_id": 999, "format": "merged"})
    assert status == "failed" and "no adapter with id 999" in error
    with session_scope() as s:
        assert [a.kind for a in resq.list_artifacts(session=s)].count("export") == 1

    with TestClient(app) as http:
        client = Client("http://testserver")
        client._http = http
        exports = client.exports(adapter_id)
        assert [e["id"] for e in exports] == [result["export_id"]]
        assert exports[0]["metrics"]["verification"]["agreement"] == result["verification"]["agreement"]
        folder = client.download_export(result["export_id"], tmp_path / "dl", extract=True)
        assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "export.json",
                                                             f"newslora-adapter{adapter_id}.q8_0.gguf"]
        manifest = ExportManifest.load(folder)
        import hashlib
        for name, f in manifest.files.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == f["sha256"], name
        assert tarfile.is_tarfile(tmp_path / "dl" / f"newslora-export-{result['export_id']}.tar.gz")
        assert http.get(f"/models/{adapter_id}/download").status_code == 404  # an adapter, not an export
        assert http.get("/models/999/exports").status_code == 404
