"""GGUF exports checked by llama.cpp itself (llama-cpp-python): the labels it gives equal the adapter's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.context import LocalContext
from core.specs.export import ExportSpec
from workers.export import ExportCheckFailed, export_adapter
from workers.export.llamacpp import LlamaCppClassifier, llamacpp_version
from workers.inference.classify import clear_engines
from tests.workers.export.conftest import INSTRUCTION, N_TEST

pytestmark = pytest.mark.skipif(llamacpp_version() is None, reason="llama-cpp-python is not installed: "
                                "`make install-llamacpp` (make test installs it)")


def _export(adapter, dataset, out, **spec):
    ctx = LocalContext(work_dir=out.parent)
    result = export_adapter(ExportSpec(adapter_id=adapter.adapter_id, dtype="fp32", device="cpu", **spec), adapter,
                            out, ctx, dataset_dir=dataset, dataset_hash="d" * 16)
    return result, ctx


@pytest.mark.parametrize("quant,needs", [("f16", 0.99), ("q8_0", 0.95)])
def test_gguf_export_is_verified_in_llamacpp(tiny_adapter, tiny_dataset, tmp_path, quant, needs):
    clear_engines()
    result, ctx = _export(tiny_adapter, tiny_dataset, tmp_path / quant, format="gguf", quant=quant)
    v = result["verification"]
    assert v["reloaded_with"].startswith("llama.cpp (llama-cpp-python ") and quant in v["reloaded_with"]
    assert v["passed"] and v["n"] == N_TEST and v["agreement"] >= needs, v
    assert v["export_accuracy"] is not None
    # how long the check took, and which part: the adapter's labels, then the GGUF's in llama.cpp
    assert v["export_seconds"] > 0 and v["seconds"] == pytest.approx(v["reference_seconds"] + v["export_seconds"],
                                                                     abs=0.15)
    assert json.loads((Path(result["path"]) / "export.json").read_text())["verification"]["reloaded_with"] == \
        v["reloaded_with"]
    assert any("GGUF in llama.cpp" in e["message"] for e in ctx.events)


def test_a_writer_without_the_qk_permutation_fails_in_llamacpp_too(tiny_adapter, tiny_dataset, tmp_path,
                                                                   monkeypatch):
    import workers.export.gguf_writer as writer
    monkeypatch.setattr(writer, "llama_cpp_permute", lambda w, n_head, n_head_kv=None: w)
    with pytest.raises(ExportCheckFailed, match=r"labels equal to the adapter's on .* of 24 articles") as e:
        _export(tiny_adapter, tiny_dataset, tmp_path / "bad", format="gguf", quant="f16", gguf_loader="llama.cpp")
    assert e.value.verification["agreement"] < 0.99
    assert e.value.verification["reloaded_with"].startswith("llama.cpp")
    assert list(tmp_path.iterdir()) == []


def test_full_label_scoring_when_first_tokens_collide(tiny_model_dir, tmp_path):
    """Labels that share a first token are told apart by their whole log-likelihood, which equals the one
    transformers computes from the same token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    from workers.export.gguf_writer import write_gguf
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    write_gguf(model, tok, tmp_path / "tiny.gguf", quant="f16", name="tiny", tokenizer_pre="smollm")
    items = [{"id": str(i), "text": t} for i, t in enumerate(["Stocks rallied.", "The team won the cup.",
                                                               "A new chip was shown.", "Talks resumed."])]
    labels = ["Sci/Tech", "Sci/Fi", "Sports"]
    clf = LlamaCppClassifier(tmp_path / "tiny.gguf", tiny_model_dir, template="alpaca", instruction=INSTRUCTION,
                             label_names=labels, threads=1, mode="first-token")
    try:
        assert clf.mode == "full-label"
        body = clf.codec.bodies([items[0]["text"]], max_article_tokens=64)[0].ids
        full = clf.scores(body)
        # the full label's log-likelihood, computed with transformers from the same token ids
        ids = clf.codec.prefix_ids + list(body)
        with torch.no_grad():
            for name, lab, got in zip(labels, clf.codec.label_ids, full):
                seq = torch.tensor([ids + lab])
                logp = torch.log_softmax(model(seq).logits[0].double(), -1)
                want = sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(lab))
                assert got == pytest.approx(want, abs=2e-2), name
        assert set(clf.classify(items).values()) <= set(labels)
    finally:
        clf.close()


def test_threads_chosen_by_timing_keep_every_article_and_its_label(tiny_model_dir, tmp_path, monkeypatch):
    """threads=None times candidate thread counts on the articles themselves: every article is still
    classified once, in order, with the labels a fixed thread count gives; the choice is made again every
    RETUNE_EVERY articles."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    import workers.export.llamacpp as llamacpp
    from workers.export.gguf_writer import write_gguf
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    write_gguf(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "tiny.gguf", quant="f16",
               name="tiny", tokenizer_pre="smollm")
    monkeypatch.setattr(llamacpp, "RETUNE_EVERY", 3)
    monkeypatch.setattr(llamacpp.os, "cpu_count", lambda: 2)  # candidates 2 and 1 on any machine
    texts = ["Stocks rallied.", "The team won the cup.", "A new chip was shown.", "Talks resumed.",
             "Oil prices fell.", "The striker scored twice.", "A probe reached Mars.", "Rebels took the town.",
             "Shares slid on weak sales.", "Researchers built a faster laser."]
    items = [{"id": f"a{i}", "text": t} for i, t in enumerate(texts)]
    kw = dict(template="alpaca", instruction=INSTRUCTION, label_names=["World", "Sports", "Business", "Sci/Tech"])
    fixed = LlamaCppClassifier(tmp_path / "tiny.gguf", tiny_model_dir, threads=1, **kw)
    auto = LlamaCppClassifier(tmp_path / "tiny.gguf", tiny_model_dir, threads=None, **kw)
    try:
        want = fixed.classify(items)
        got = {**auto.classify(items[:4]), **auto.classify(items[4:])}  # the count carries across calls
        assert list(got) == [it["id"] for it in items] and got == want
        # a choice at article 0 (timing articles 0 and 1) and at article 5 (timing 5 and 6)
        assert len(auto.thread_choices) == 2 and set(auto.thread_choices) <= {1, 2}
        # each article's own scores, in order (a tiny model may give every article the same label)
        bodies = auto._bodies(items)
        for a, b in zip(auto._each(bodies, auto.scores), [fixed.scores(x.ids) for x in bodies]):
            assert a == pytest.approx(b, abs=1e-3)
        assert len(auto.thread_choices) == 4
        assert auto.threads_used().startswith("threads chosen by timing: ")
        assert fixed.threads_used() == "1 threads" and fixed.thread_choices == []
    finally:
        fixed.close()
        auto.close()
