"""The torchtune backend: config building, the builder chosen from the model registry, data encoding and
chunking (no torchtune needed), the subprocess plumbing with a stand-in python, and (marked `torchtune`)
a real run of torchtune's recipe on a tiny seeded Llama whose adapter then loads with plain PEFT in this
venv, and a run on the LLaMA-2 stand-in whose worker is SIGKILLed and resumed from its last checkpoint."""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from core.context import JobCancelled, LocalContext
from core.contracts.train import TrainResult
from core.settings import reset_settings
from core.specs.train import LoraSpec, TrainSpec
from workers.modeling.prompts import default_instruction
from workers.train.torchtune import TorchtuneEnvMissing, TorchtuneRunFailed, torchtune_python, train_torchtune
from workers.train.torchtune import entry, recipe
from workers.train.torchtune.process import PID_FILE, is_recipe_process, run_recipe
from workers.train.torchtune.recipe import SNAPSHOTS
from tests.conftest import make_dataset_meta

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
INSTRUCTION = default_instruction(LABELS)

try:
    _ENV_PYTHON: Path | None = torchtune_python()
except TorchtuneEnvMissing:
    _ENV_PYTHON = None
needs_env = pytest.mark.skipif(
    _ENV_PYTHON is None,
    reason="the isolated torchtune environment is missing: run `bash scripts/setup_torchtune_env.sh`")


def write_dataset(root: Path, records: list[tuple[str, int]], *, val: list[tuple[str, int]] = ()) -> Path:
    """A prepared-dataset folder (the prep job's format) from (text, label_id) pairs."""
    root.mkdir(parents=True, exist_ok=True)

    def rows(pairs, prefix):
        return "".join(json.dumps({"id": f"{prefix}{i}", "instruction": INSTRUCTION, "input": text,
                                   "output": LABELS[label], "label_id": label}) + "\n"
                       for i, (text, label) in enumerate(pairs))

    (root / "train.jsonl").write_text(rows(records, "t"))
    (root / "validation.jsonl").write_text(rows(val, "v"))
    make_dataset_meta(label_names=LABELS, instruction=INSTRUCTION, hash="fixture-hash").save(root)
    return root


NEWS = [
    ("Stocks rallied on Wall Street as oil prices fell and investors cheered earnings.", 2),
    ("The Red Sox beat the Yankees 5-3 to take the lead in the American League pennant race.", 1),
    ("Rebels and government troops clashed near the capital, leaving dozens dead, officials said.", 0),
    ("A new chip from Intel doubles battery life in laptops, the company said on Tuesday.", 3),
]


# ---------------------------------------------------------------------------------------------
# No torchtune needed


@pytest.fixture
def env_settings(monkeypatch):
    """Set environment variables for this test, read again by the settings (and forgotten after it)."""
    def setenv(name: str, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        reset_settings()
    yield setenv
    monkeypatch.undo()
    reset_settings()


def test_missing_env_says_how_to_create_it(env_settings, tmp_path):
    env_settings("NEWSLORA_TORCHTUNE_PYTHON", None)
    env_settings("NEWSLORA_TORCHTUNE_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(TorchtuneEnvMissing, match=r"bash scripts/setup_torchtune_env\.sh"):
        torchtune_python()
    spec = TrainSpec(dataset_id=1, backend="torchtune")
    with pytest.raises(TorchtuneEnvMissing):
        train_torchtune(spec, tmp_path, tmp_path / "out", LocalContext(work_dir=tmp_path))


def test_python_override_wins(env_settings):
    env_settings("NEWSLORA_TORCHTUNE_PYTHON", sys.executable)
    assert torchtune_python() == Path(sys.executable)


def test_lora_modules_map_to_torchtune_names():
    attn = ["q_proj", "k_proj", "v_proj", "output_proj"]
    assert recipe.lora_modules(LoraSpec(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])) == (attn, False)
    assert recipe.lora_modules(LoraSpec(target_modules=["all-linear"])) == (attn, True)
    assert recipe.lora_modules(LoraSpec(target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])) \
        == (["q_proj", "v_proj"], True)
    with pytest.raises(ValueError, match="together"):
        recipe.lora_modules(LoraSpec(target_modules=["q_proj", "gate_proj"]))
    with pytest.raises(ValueError, match="lm_head"):
        recipe.lora_modules(LoraSpec(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="attention module"):
        recipe.lora_modules(LoraSpec(target_modules=["gate_proj", "up_proj", "down_proj"]))
    with pytest.raises(ValueError, match="lora.top_layers.*backend 'peft'"):
        recipe.lora_modules(LoraSpec(top_layers=2))


def test_top_layers_with_torchtune_is_refused_when_the_spec_is_made():
    from pydantic import ValidationError
    from core.specs.train import TrainSpec
    with pytest.raises(ValidationError, match="lora.top_layers.*backend 'peft'"):
        TrainSpec(dataset_id=1, backend="torchtune", lora={"top_layers": 2})


def test_builder_args_for_smollm2(smollm2_dir):
    args = recipe.model_builder_args(smollm2_dir)
    assert {k: args[k] for k in ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "embed_dim",
                                 "intermediate_dim", "max_seq_len", "scale_factor", "tie_word_embeddings")} == {
        "vocab_size": 49152, "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "embed_dim": 576,
        "intermediate_dim": 1536, "max_seq_len": 8192, "scale_factor": 1, "tie_word_embeddings": True}
    assert args["rope_base"] == pytest.approx(100000.0)
    assert args["norm_eps"] == pytest.approx(1e-5, rel=1e-3)


def test_builder_refuses_what_it_cannot_reproduce(tmp_path, smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    for change, match in (({"model_type": "mistral"}, "Llama"),
                          ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE"),
                          ({"head_dim": 32}, "head_dim")):
        d = tmp_path / str(len(change) + len(match))
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            recipe.model_builder_args(d)


def _config_dir(root: Path, name: str, **cfg) -> Path:
    """A folder with only a config.json (all that choosing a torchtune builder reads)."""
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return d


LLAMA2_7B_CONFIG = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                    "tie_word_embeddings": False}


def test_builder_and_checkpointer_come_from_the_registry(tmp_path, smollm2_dir, llama2_standin_dir):
    # The LLaMA-2-7B preset: the reference recipe's fixed-size builder and the LLAMA2 checkpointer.
    seven_b = _config_dir(tmp_path, "7b", **LLAMA2_7B_CONFIG)
    m = recipe.torchtune_model("llama2-7b", seven_b)
    assert (m.builder, m.model_type, m.shape) == ("torchtune.models.llama2.lora_llama2_7b", "LLAMA2", {})
    # SmolLM2: Llama-3.2's component builder shaped from config.json, as before.
    m = recipe.torchtune_model("smollm2-135m", smollm2_dir)
    assert (m.builder, m.model_type) == ("torchtune.models.llama3_2.lora_llama3_2", "LLAMA3_2")
    assert m.shape == recipe.model_builder_args(smollm2_dir)
    # A local LLaMA-2-shaped folder (the stand-in): detected by its config, LLaMA-2's component builder.
    m = recipe.torchtune_model(str(llama2_standin_dir), llama2_standin_dir)
    assert (m.builder, m.model_type) == ("torchtune.models.llama2.lora_llama2", "LLAMA2")
    assert m.shape == {"vocab_size": 1000, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "embed_dim": 64,
                       "intermediate_dim": 176, "max_seq_len": 4096, "norm_eps": pytest.approx(1e-5)}
    # The same folder through the 7B preset: the fixed builder would build another shape.
    with pytest.raises(ValueError, match=r"builds vocab_size 32000 \(checkpoint: 1000\)"):
        recipe.torchtune_model("llama2-7b", llama2_standin_dir)
    # ... and a SmolLM2-style folder through it: the wrong family.
    with pytest.raises(ValueError, match="llama3.2-style"):
        recipe.torchtune_model("llama2-7b", smollm2_dir)


def test_every_registry_entry_names_a_known_builder():
    from workers.modeling.registry import model_presets
    for preset in model_presets().values():
        assert preset.torchtune_builder in recipe.BUILDERS, preset.name
        assert preset.torchtune_model_type == recipe.BUILDERS[preset.torchtune_builder].model_type, preset.name


def test_unknown_architectures_are_refused_clearly(tmp_path):
    mistral = _config_dir(tmp_path, "mistral", **{**LLAMA2_7B_CONFIG, "model_type": "mistral"})
    with pytest.raises(ValueError, match=r"unknown architecture 'mistral'.*use backend 'peft'"):
        recipe.torchtune_model(str(mistral), mistral)
    llama3 = _config_dir(tmp_path, "llama3", **{**LLAMA2_7B_CONFIG, "rope_theta": 500000.0})
    with pytest.raises(ValueError, match=r"untied embeddings and RoPE theta 500000 matches no torchtune builder"):
        recipe.torchtune_model(str(llama3), llama3)
    scaled = _config_dir(tmp_path, "scaled", **{**LLAMA2_7B_CONFIG,
                                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="RoPE type 'llama3'"):
        recipe.torchtune_model(str(scaled), scaled)


def test_recipe_config_chunks_the_run_and_names_the_wandb_run_as_the_peft_loop(tmp_path, llama2_standin_dir):
    import uuid
    spec = TrainSpec(dataset_id=1, model=str(llama2_standin_dir), backend="torchtune", batch_size=2, grad_accum=3,
                     save_every=4, wandb=True, lora=LoraSpec(target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "out"
    cfg = recipe.recipe_config(spec, model_dir=llama2_standin_dir, run_dir=out / "torchtune", tokens_path=tmp_path / "t",
                           total_steps=10, pad_id=2, device="cpu", dtype="fp32",
                           wandb=recipe.wandb_logger_args(spec, out))
    assert cfg["model"]["_component_"] == "torchtune.models.llama2.lora_llama2"
    assert cfg["checkpointer"]["model_type"] == "LLAMA2"
    # 10 steps in chunks of save_every=4: three recipe epochs (4, 4, 2), the schedule over the real 10.
    assert (cfg["epochs"], cfg["max_steps_per_epoch"], cfg["newslora"]["chunk_samples"]) == (3, 4, 4 * 2 * 3)
    assert cfg["lr_scheduler"]["total_steps"] == 10
    wandb = cfg["metric_logger"]["wandb"]
    assert wandb["project"] == "newslora" and wandb["resume"] == "allow" and wandb["log_dir"] == str(out)
    assert wandb["id"] == f"train-{uuid.uuid5(uuid.NAMESPACE_URL, str(out.resolve())).hex[:12]}"
    assert recipe.wandb_logger_args(spec.model_copy(update={"wandb": False}), out) is None


def test_chunk_sampler_serves_each_epoch_its_chunk():
    entry.ChunkSampler.chunk_samples = 4
    sampler = entry.ChunkSampler(list(range(10)), num_replicas=1, rank=0, shuffle=False)
    chunks = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        chunks.append(list(sampler))
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(sampler) == 10
    sampler.load_state_dict({"epoch": 0, "yielded": 4})  # a resumed chunk still starts at its beginning
    sampler.set_epoch(1)
    assert list(sampler) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="shuffle"):
        entry.ChunkSampler(list(range(10)), shuffle=True)


def test_plan_steps_counts_as_the_peft_loop():
    spec = TrainSpec(dataset_id=1, batch_size=4, grad_accum=2, epochs=1.5)
    assert recipe.plan_steps(spec, 40) == 8  # ceil(1.5 * ceil(40 / 4) / 2)
    assert recipe.plan_steps(spec, 3) == 1
    assert recipe.plan_steps(spec.model_copy(update={"max_steps": 3}), 40) == 3


def test_sample_order_is_full_bucketed_batches_each_pass():
    lengths = [10, 50, 12, 48, 11, 49, 30]
    order = recipe.sample_order(lengths, 14, batch_size=3, seed=1)
    assert len(order) == 14
    assert sorted(order[:7]) == sorted(order[7:14]) == list(range(7))  # each pass sees every example once
    assert order == recipe.sample_order(lengths, 14, batch_size=3, seed=1)
    assert order != recipe.sample_order(lengths, 14, batch_size=3, seed=2)


def test_fp16_is_refused_and_auto_follows_the_cpu(monkeypatch):
    spec = TrainSpec(dataset_id=1, dtype="fp16")
    with pytest.raises(ValueError, match="bf16 or fp32"):
        recipe.recipe_dtype(spec, "cpu")
    monkeypatch.setattr(recipe, "cpu_has_fast_bf16", lambda: False)
    assert recipe.recipe_dtype(TrainSpec(dataset_id=1), "cpu") == "fp32"
    assert recipe.recipe_dtype(TrainSpec(dataset_id=1), "cuda:0") == "bf16"


def test_bad_dataset_folder_is_named(tmp_path, env_settings):
    from workers.train.data import DatasetNotPrepared
    env_settings("NEWSLORA_TORCHTUNE_PYTHON", sys.executable)
    spec = TrainSpec(dataset_id=1, backend="torchtune")
    with pytest.raises(DatasetNotPrepared, match="meta.json"):
        train_torchtune(spec, tmp_path, tmp_path / "out", LocalContext(work_dir=tmp_path))


def test_bad_target_modules_fail_before_training(tmp_path, env_settings, tiny_model_dir):
    env_settings("NEWSLORA_TORCHTUNE_PYTHON", sys.executable)
    spec = TrainSpec(dataset_id=1, backend="torchtune", model=str(tiny_model_dir),
                     lora=LoraSpec(target_modules=["q_proj", "up_proj"]))
    with pytest.raises(ValueError, match="together"):
        train_torchtune(spec, write_dataset(tmp_path / "ds", NEWS, val=NEWS[:1]), tmp_path / "out",
                           LocalContext(work_dir=tmp_path))
    assert not (tmp_path / "out" / "torchtune").exists()


def _fake_python(tmp_path: Path, body: str) -> Path:
    """A stand-in for the isolated python: a shell script that ignores its arguments."""
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_run_recipe_turns_metric_lines_into_progress(tmp_path):
    lines = "\n".join(f'echo \'{entry.METRIC_PREFIX}{{"step": {s}, "loss": {3.0 - s}, "lr": 0.1, "time": {100 + s}}}\''
                      for s in (1, 2, 3))
    python = _fake_python(tmp_path, "echo starting\n" + lines + "\n")
    ctx = LocalContext(work_dir=tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    history = run_recipe(python, cfg, ctx, total_steps=3, step_tokens=[10, 20, 30], log_path=tmp_path / "log")
    assert [h["loss"] for h in history] == [2.0, 1.0, 0.0]
    assert "tokens_per_s" not in history[0]
    assert history[1]["tokens_per_s"] == pytest.approx(20.0) and history[2]["tokens_per_s"] == pytest.approx(30.0)
    progress = [e["metrics"] for e in ctx.events if e["message"] == "train"]
    assert [(p["done"], p["total"], p["loss"]) for p in progress] == [(1, 3, 2.0), (2, 3, 1.0), (3, 3, 0.0)]
    assert "starting" in (tmp_path / "log").read_text()


def test_run_recipe_failure_carries_the_log_tail(tmp_path):
    python = _fake_python(tmp_path, "echo 'RuntimeError: size mismatch for tok_embeddings' >&2\nexit 3\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    with pytest.raises(TorchtuneRunFailed, match=r"status 3(.|\n)*size mismatch"):
        run_recipe(python, cfg, LocalContext(work_dir=tmp_path), total_steps=1, step_tokens=[1],
                      log_path=tmp_path / "log")


def test_cancel_terminates_the_subprocess(tmp_path):
    pid_file = tmp_path / "pid"
    python = _fake_python(tmp_path, f"echo $$ > {pid_file}\nexec sleep 60\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    ctx = LocalContext(work_dir=tmp_path, cancel_after_checks=4)  # ~1.5 s in
    with pytest.raises(JobCancelled):
        run_recipe(python, cfg, ctx, total_steps=1, step_tokens=[1], log_path=tmp_path / "log")
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_without_wandb_the_loggers_warn_and_the_warning_becomes_an_event(monkeypatch, capsys, tmp_path):
    # entry.py without wandb in its environment: a warning line, and the step metrics still on stdout.
    real_find_spec = entry.importlib.util.find_spec
    monkeypatch.setattr(entry.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    loggers = entry.MetricLoggers(wandb={"project": "newslora", "id": "train-x"})
    loggers.log_dict({"loss": 2.5, "lr": 0.1}, step=3)
    warning, metric = capsys.readouterr().out.splitlines()
    assert warning.startswith(entry.WARNING_PREFIX) and "wandb is not installed" in warning
    row = json.loads(metric.removeprefix(entry.METRIC_PREFIX))
    assert (row["step"], row["loss"], row["lr"]) == (3, 2.5, 0.1)
    # ... which the parent records as a warning event.
    python = _fake_python(tmp_path, f"echo '{warning}'\necho '{metric}'\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}")
    ctx = LocalContext(work_dir=tmp_path)
    history = run_recipe(python, cfg, ctx, total_steps=3, step_tokens=[1, 1, 1], log_path=tmp_path / "log")
    assert [h["step"] for h in history] == [3]
    assert [e["message"] for e in ctx.events if e["level"] == "warning"] == [warning.removeprefix(entry.WARNING_PREFIX)]


# ---------------------------------------------------------------------------------------------
# The real recipe in the isolated environment


@pytest.fixture(scope="module")
def tiny_tt_model(smollm2_dir, tmp_path_factory) -> Path:
    """A seeded 2-layer Llama (hidden 64, 4 heads, 2 KV heads, tied embeddings) with SmolLM2's tokenizer.

    Its embeddings are scaled x5 (std 0.1): at the default std 0.02 the tied output head's logits span
    about one nat, so no adapter could lower the loss enough for the test to tell training from noise.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from tests.conftest import make_tiny_llama
    path = make_tiny_llama(tmp_path_factory.mktemp("tt") / "tiny", smollm2_dir, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def trained(tiny_tt_model, tmp_path_factory):
    """One short torchtune run, shared by the assertions below: 8 steps on 4 records, fp32."""
    root = tmp_path_factory.mktemp("ttrun")
    dataset = write_dataset(root / "ds", NEWS, val=NEWS[:1])
    spec = TrainSpec(dataset_id=1, model=str(tiny_tt_model), backend="torchtune", max_steps=8, batch_size=4,
                     learning_rate=3e-2, warmup_steps=0, max_seq_len=128, dtype="fp32", seed=3,
                     lora=LoraSpec(rank=4, alpha=8.0, dropout=0.0))
    ctx = LocalContext(work_dir=root)
    result = train_torchtune(spec, dataset, root / "out", ctx, keep_merged=True)
    return spec, result, ctx, root / "out"


@pytest.mark.torchtune
@needs_env
def test_recipe_trains_and_loss_falls(trained):
    spec, result, ctx, out = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if r.get("type") == "eval"]
    assert result.steps == 8 and [r["step"] for r in step_rows] == list(range(1, 9))
    losses = [r["loss"] for r in step_rows]
    # The same 4 records every step (dropout 0), so the curve is deterministic: the loss must fall well
    # below its start (about 11.2 for this model; a run that applies no update stays there).
    assert 10.0 < losses[0] < 12.5
    assert losses[-1] < losses[0] - 1.0
    m = result.metrics
    assert m.train_loss == pytest.approx(sum(losses) / 8, abs=1e-4)  # mean of the last (up to) 10 steps
    assert m.tokens_per_s > 0 and m.dtype == "fp32" and m.device == "cpu"
    # The adapter, scored on the validation record after training, as the PEFT loop scores it.
    assert [h.model_dump(exclude_none=True) for h in result.history] == \
        [{k: v for k, v in eval_rows[0].items() if k not in ("type", "format_version")}]
    assert len(eval_rows) == 1 and eval_rows[0]["val_items"] == 1
    assert m.val_loss == eval_rows[0]["val_loss"] and 0 < m.val_loss < losses[0]
    assert m.val_accuracy in (0.0, 1.0)
    assert result.resumed_from_step is None and result.backend == "torchtune"
    assert [e["metrics"]["done"] for e in ctx.events if e["message"] == "train"] == list(range(1, 9))
    assert m.tokens == sum(r["tokens"] for r in step_rows) > 0
    assert result.label_names == LABELS and result.template == "alpaca"
    assert result.instruction == INSTRUCTION and result.dataset_hash == "fixture-hash"
    assert m.train_loss_first == pytest.approx(losses[0], abs=1e-5) and result.total_steps == 8
    assert TrainResult.model_validate(result.model_dump(mode="json")) == result  # as the train job stores it


@pytest.mark.torchtune
@needs_env
def test_recipe_sees_the_peft_loops_tokens(trained, tiny_tt_model):
    from workers.modeling.registry import load_tokenizer
    from workers.modeling.codec import PromptCodec
    from workers.train.data import load_prepared
    spec, _, _, out = trained
    data = load_prepared(out.parent / "ds")
    encoder = PromptCodec.build(load_tokenizer(tiny_tt_model), template="alpaca", instruction=INSTRUCTION,
                                label_names=LABELS)
    expected = {tuple(e.input_ids): e.labels for e in encoder.examples(data.train, max_seq_len=spec.max_seq_len)}
    rows = [json.loads(line) for line in (out / "torchtune" / "train_tokens.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4  # steps x batch
    assert all(expected[tuple(r["tokens"])] == r["labels"] for r in rows)


@pytest.mark.torchtune
@needs_env
def test_adapter_loads_with_plain_peft_and_matches_torchtune_merge(trained, tiny_tt_model):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    spec, result, _, out = trained
    adapter = Path(result.adapter_dir)
    assert adapter == out / "adapter"
    meta = json.loads((adapter / "newslora.json").read_text())
    assert meta["label_names"] == LABELS and meta["template"] == "alpaca" and meta["dataset_hash"] == "fixture-hash"
    assert meta["base_model_digest"] == result.base_model_digest and meta["spec"]["backend"] == "torchtune"
    assert meta["backend"] == "torchtune" and meta["torchtune_version"] == "0.6.1" and meta["steps"] == 8

    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tiny_tt_model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapter changes the output

    # torchtune's own merged weights (W + alpha/r * B A in its layout, converted back to HF) must give
    # the same model: this checks the key names and the q/k RoPE permutation of lora_B.
    merged = AutoModelForCausalLM.from_pretrained(tiny_tt_model, dtype=torch.float32).eval()
    merged_sd = load_file(out / "torchtune" / "epoch_0" / "model-00001-of-00001.safetensors")
    missing, unexpected = merged.load_state_dict(merged_sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Resume after a SIGKILL, on the LLaMA-2 stand-in, with W&B through torchtune's WandBLogger

# A worker process running the job that SIGKILLs itself (its whole process group) as soon as it hears of
# the first chunk's checkpoint: a real kill, at a point that does not depend on the machine's speed.
_WORKER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from core.context import LocalContext
from core.specs.train import TrainSpec
from workers.train.torchtune import train_torchtune

class KilledAtFirstCheckpoint(LocalContext):
    def event(self, message, **kw):
        super().event(message, **kw)
        if message.startswith("train: checkpoint at step"):
            os.killpg(0, signal.SIGKILL)

spec = TrainSpec.model_validate_json({spec!r})
train_torchtune(spec, Path({dataset!r}), Path({out!r}), KilledAtFirstCheckpoint(work_dir=Path({out!r}).parent))
"""


def _adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(Path(adapter_dir) / "adapter_model.safetensors")


@pytest.mark.torchtune
@needs_env
def test_killed_worker_resumes_from_the_last_chunk_and_ends_where_an_unbroken_run_does(llama2_standin_dir,
                                                                                        tmp_path):
    import signal
    import subprocess
    import time

    import torch

    from tests.conftest import REPO
    dataset = write_dataset(tmp_path / "ds", NEWS * 2, val=NEWS[:2])
    spec = TrainSpec(dataset_id=1, model=str(llama2_standin_dir), backend="torchtune", max_steps=12, save_every=2,
                     batch_size=2, learning_rate=1e-2, warmup_steps=1, max_seq_len=256, dtype="fp32", seed=1,
                     wandb=True, lora=LoraSpec(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    straight = train_torchtune(spec.model_copy(update={"wandb": False}), dataset, tmp_path / "straight",
                               LocalContext(work_dir=tmp_path))

    # The worker is SIGKILLed once the first chunk's checkpoint is written; the recipe subprocess, in a
    # session of its own, then exits by itself.
    out = tmp_path / "killed"
    worker = subprocess.Popen([sys.executable, "-c", _WORKER.format(repo=str(REPO), spec=spec.model_dump_json(),
                                                                     dataset=str(dataset), out=str(out))],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert any((out / "torchtune" / SNAPSHOTS).glob("epoch_*"))
    recipe_pid = int((out / "torchtune" / PID_FILE).read_text())
    deadline = time.monotonic() + 10
    while is_recipe_process(recipe_pid):
        assert time.monotonic() < deadline, "the orphaned recipe subprocess kept running"
        time.sleep(0.1)
    assert not (out / "adapter").exists()

    ctx = LocalContext(work_dir=tmp_path)
    resumed = train_torchtune(spec, dataset, out, ctx)
    start = resumed.resumed_from_step
    assert start in (2, 4, 6, 8, 10), start  # a chunk's end: a kill loses at most save_every steps
    assert any(e["message"].startswith(f"train: resumed from step {start} of 12") for e in ctx.events)
    assert [e["metrics"]["done"] for e in ctx.events if e["message"] == "train"] == list(range(start + 1, 13))
    # Every step once in metrics.jsonl, the curve the unbroken run's, and the same adapter at the end.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    straight_steps = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
                      if json.loads(line)["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in straight_steps], rel=1e-4)
    assert [r["lr"] for r in steps] == pytest.approx([r["lr"] for r in straight_steps], rel=1e-6)
    a, b = _adapter_tensors(straight.adapter_dir), _adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in b.items() if "lora_B" in k)  # it did train
    assert resumed.metrics.val_loss == pytest.approx(straight.metrics.val_loss, rel=1e-4)

    # W&B through torchtune's WandBLogger (scripts/setup_torchtune_env.sh installs wandb), offline, the run
    # named as the PEFT loop names it: the killed session and the resumed one each wrote an offline run of
    # that id, the resumed one with the recipe's step metrics in it.
    run_id = recipe.wandb_logger_args(spec, out)["id"]
    assert not any("wandb is not installed" in e["message"] for e in ctx.events), \
        "no wandb in the torchtune environment: run `bash scripts/setup_torchtune_env.sh`"
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2, sorted(p.name for p in (out / "wandb").iterdir()) if (out / "wandb").is_dir() else out
    records = [(run / f"run-{run_id}.wandb").read_bytes() for run in runs]
    assert all(b"tokens_per_second_per_gpu" in r for r in records[1:]), "the resumed session logged no steps"
