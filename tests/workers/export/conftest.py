"""What the export tests share: a seeded LoRA adapter on the tiny Llama and a small prepared test split."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from workers.inference.classify import AdapterRef
from workers.modeling.prompts import default_instruction
from workers.modeling.registry import model_digest

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
INSTRUCTION = default_instruction(LABELS)
N_TEST = 24  # test articles in the tiny dataset (the check classifies all of them)


def _make_adapter(base_dir: Path, out: Path, seed: int = 0) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj", "down_proj"],
                                                 init_lora_weights=False))
    with torch.no_grad():  # random, non-zero B: the merge really changes the weights
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    (out / "newslora.json").write_text(json.dumps({
        "template": "alpaca", "instruction": INSTRUCTION, "label_names": LABELS, "base_model": str(base_dir),
        "base_model_digest": model_digest(base_dir), "dataset_hash": "d" * 16}))
    return out


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> AdapterRef:
    return AdapterRef(7, _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter"))


@pytest.fixture(scope="module")
def tiny_dataset(ag_news_dir, tmp_path_factory) -> Path:
    """A prepared dataset's test split (the fields load_items reads), N_TEST real AG News articles."""
    d = tmp_path_factory.mktemp("dataset")
    with (ag_news_dir / "test.csv").open(encoding="utf-8", newline="") as f:
        rows = [r for _, r in zip(range(N_TEST), csv.reader(f))]
    (d / "test.jsonl").write_text("".join(json.dumps({"id": f"t{n}", "instruction": INSTRUCTION, "input": f"{t} {x}",
                                                      "output": LABELS[int(c) - 1]}) + "\n"
                                          for n, (c, t, x) in enumerate(rows)))
    return d
