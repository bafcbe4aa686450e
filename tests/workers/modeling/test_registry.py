"""The model registry: a preset pointed at a local checkpoint folder by its NEWSLORA_<PRESET>_DIR variable."""
from __future__ import annotations

import pytest

from core.settings import reset_settings
from workers.modeling.registry import ModelNotFound, resolve_model


@pytest.fixture
def preset_dir_env(monkeypatch):
    """Set a variable and have the settings read it again (and forget it after the test)."""
    def setenv(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        reset_settings()
    yield setenv
    monkeypatch.undo()
    reset_settings()


def test_a_preset_dir_variable_points_the_preset_at_a_local_checkpoint(preset_dir_env, tiny_model_dir, tmp_path):
    preset_dir_env("NEWSLORA_SMOLLM2_135M_DIR", str(tiny_model_dir))
    assert resolve_model("smollm2-135m") == tiny_model_dir
    preset_dir_env("NEWSLORA_SMOLLM2_135M_DIR", str(tmp_path))
    with pytest.raises(ModelNotFound, match=f"preset smollm2-135m: {tmp_path} is not a checkpoint folder"):
        resolve_model("smollm2-135m")
