"""torchtune's adapter output as a PEFT adapter folder that loads with plain
`peft.PeftModel.from_pretrained(base, out_dir / "adapter")`, with its `newslora.json`."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.atomic import atomic_dir
from core.contracts.adapter import AdapterMeta
from core.specs.train import LoraSpec
from workers.train.torchtune.process import TorchtuneRunFailed


def export_peft_adapter(torchtune_epoch_dir: Path, adapter_dir: Path, *, lora: LoraSpec,
                        base_model_path: Path, adapter_meta: AdapterMeta) -> Path:
    """Turn torchtune's PEFT-format adapter output into a PEFT adapter folder.

    torchtune's HF checkpointer already writes `adapter_model.safetensors` with PEFT key names
    (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`) and with lora_B of q/k
    permuted back from torchtune's interleaved RoPE layout. Its `adapter_config.json` lacks task type
    and dropout, so a full LoraConfig is written instead. `adapter_meta` goes to newslora.json. The folder
    is built aside and renamed into place, so a reader never sees half an adapter.

    Raises:
        TorchtuneRunFailed: torchtune wrote no adapter.
    """
    from peft import LoraConfig  # lazy: peft takes seconds to import (and pulls transformers)

    src = Path(torchtune_epoch_dir) / "adapter_model.safetensors"
    if not src.is_file():
        raise TorchtuneRunFailed(f"torchtune wrote no adapter_model.safetensors under {torchtune_epoch_dir}")
    weights = {k: v.to(torch.float32).contiguous() for k, v in load_file(src).items()}
    hf_modules = sorted({k.split(".")[-3] for k in weights})  # ...q_proj.lora_A.weight -> q_proj
    with atomic_dir(adapter_dir) as tmp:
        save_file(weights, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=hf_modules,
                   bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=str(base_model_path)).save_pretrained(tmp)
        adapter_meta.save(tmp)
    return adapter_dir
