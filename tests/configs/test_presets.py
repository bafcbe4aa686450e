"""Every YAML preset loads, substitutes its vars, and validates as a spec."""
from __future__ import annotations

from pathlib import Path

import pytest

from api_client.pipeline_config import ConfigError, load_pipeline_config
from tests.conftest import AG_NEWS_DIR, REPO
from core.specs import parse_spec

PIPELINES = sorted((REPO / "configs").glob("*.yaml"))
MODELS = sorted((REPO / "configs" / "models").glob("*.yaml"))


def test_there_are_presets():
    assert {p.name for p in PIPELINES} >= {"agnews-smollm2-quick.yaml", "agnews-smollm2.yaml",
                                          "agnews-llama2-7b.yaml"}


@pytest.mark.parametrize("path", PIPELINES + MODELS, ids=lambda p: p.name)
def test_preset_starts_with_the_command_that_runs_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("newslora run" in first or "Used by" in path.read_text()), first


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_preset_validates(path):
    spec = load_pipeline_config(path, [f"data_dir={AG_NEWS_DIR}"] if "data_dir" in path.read_text() else [])
    parsed = parse_spec("pipeline", spec)
    # The stage specs a pipeline will create validate too.
    parse_spec("train", parsed.train_spec(1))
    parse_spec("classify", parsed.score_spec(1, adapter_id=2))
    parse_spec("classify", parsed.generate_spec(1))
    if parsed.judge is not None:
        parse_spec("judge", parsed.judge_spec(1))
        parse_spec("judge", parsed.dialogue_spec(adapter_id=2))


def test_model_presets_load():
    from workers.modeling.registry import model_presets
    assert {"smollm2-135m", "llama2-7b"} <= set(model_presets())


def test_overrides_and_vars(tmp_path):
    path = REPO / "configs" / "agnews-smollm2-quick.yaml"
    spec = load_pipeline_config(path, [f"data_dir={AG_NEWS_DIR}", "train.max_steps=7", "train.lora.rank=4",
                                       "eval_limit=12"])
    assert spec["train"]["max_steps"] == 7 and spec["train"]["lora"]["rank"] == 4 and spec["eval_limit"] == 12
    assert spec["prep"]["train"]["path"] == str((AG_NEWS_DIR / "train.jsonl").resolve())


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config at"):
        load_pipeline_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prep: {train: {path: '${nowhere}/x.jsonl'}}\n")
    with pytest.raises(ConfigError, match="nowhere"):
        load_pipeline_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline_config(REPO / "configs" / "agnews-smollm2-quick.yaml", [f"data_dir={tmp_path}/missing"])
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline_config(bad)


def test_bad_stage_values_are_refused_naming_the_field():
    path = REPO / "configs" / "agnews-smollm2-quick.yaml"
    data = f"data_dir={AG_NEWS_DIR}"
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(path, [data, "train.lora.rank=-5", "judge.concurrency=0"])
    assert str(e.value).splitlines() == ["train.lora.rank: Input should be greater than or equal to 1",
                                         "judge.concurrency: Input should be greater than or equal to 1"]
    # What the pipeline sets itself (the mode, the ids, the model) is not a stage key.
    with pytest.raises(ConfigError, match=r"^unknown key generate.mode \(keys at generate: limit, label_names"):
        load_pipeline_config(path, [data, "generate.mode=score"])


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1e-4", "unknown key train.lerning_rate; did you mean train.learning_rate?"),
    ("train.lora.rnak=4", "unknown key train.lora.rnak; did you mean train.lora.rank?"),
    ("trian.max_steps=3", "unknown key trian.max_steps; did you mean train.max_steps?"),
    ("prep.text_columns=[title]",
     "unknown key prep.text_columns; did you mean prep.train.text_columns or prep.test.text_columns or "
     "prep.validation.text_columns?"),
    ("train.model=x", "unknown key train.model; did you mean model?"),
    ("train.lora.rank.x=1", "cannot set train.lora.rank.x: train.lora.rank is a single value, not a mapping"),
])
def test_unknown_override_keys_are_refused_with_the_closest_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(REPO / "configs" / "agnews-smollm2-quick.yaml", [f"data_dir={AG_NEWS_DIR}", override])
    assert str(e.value) == message


def test_an_unknown_key_in_the_preset_itself_is_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: x\nprep: {train: {path: fancyzhx/ag_news, format: hub}}\ntrain: {max_stpes: 3}\n")
    with pytest.raises(ConfigError, match=r"^unknown key train.max_stpes; did you mean train.max_steps\?$"):
        load_pipeline_config(bad)
