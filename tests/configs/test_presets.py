"""Every YAML preset loads, substitutes its vars, and validates as a spec."""
from __future__ import annotations

from pathlib import Path

import pytest

from api_client.pipeline_config import ConfigError, load_pipeline_config
from tests.conftest import AG_NEWS_DIR, REPO
from workers.specs import parse_spec

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
    parse_spec("train", {**parsed.train, "dataset_id": 1, "model": parsed.model})
    parse_spec("classify", {**parsed.classify, "dataset_id": 1})
    if parsed.judge is not None:
        parse_spec("judge", {k: v for k, v in parsed.judge.items() if k != "dialogue"} | {"classify_job_id": 1})


def test_model_presets_load():
    from workers.models import model_presets
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
