"""A registered LoRA adapter as inference sees it: its id, its folder, and its `newslora.json` read once.

Light on purpose (no torch): the job runtime builds `AdapterRef`s and an export reads their metadata
without loading a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from core.contracts.adapter import AdapterMeta
from core.contracts.base import ContractError


class AdapterError(ValueError):
    """An adapter folder is missing, malformed, or was trained for another base model."""


def read_adapter_meta(path: Path) -> AdapterMeta:
    """Read and check an adapter folder: PEFT weights plus its `newslora.json` (`AdapterMeta`).

    Raises:
        AdapterError: the folder, its PEFT config or its newslora.json is missing or does not match the contract.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist: check the adapter's registered path "
                           f"(re-run the training job if its output was deleted; a worker on another machine "
                           f"needs the shared artifact volume mounted at the same path)")
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path} holds no adapter_config.json: it is not a PEFT adapter folder "
                           f"(save one with peft_model.save_pretrained())")
    try:
        return AdapterMeta.load(path)
    except ContractError as e:
        raise AdapterError(str(e)) from None


@dataclass(frozen=True)
class AdapterRef:
    """A registered adapter: its model-artifact id and the folder holding the PEFT weights + newslora.json.

    `meta` is the folder's newslora.json, read and checked on first use and kept with the ref: a job
    that passes one ref along (prompt resolution, the engine's base-model check, the merge) reads the
    file once.
    """

    adapter_id: int
    path: Path

    @cached_property
    def meta(self) -> AdapterMeta:
        """The adapter's `AdapterMeta`.

        Raises:
            AdapterError: see `read_adapter_meta` (not cached: a later access tries again).
        """
        return read_adapter_meta(self.path)
