"""The two shapes every contract takes: a JSON file in an artifact folder, or a row of a store table.

A contract is a pydantic model with a `format_version`. Whoever writes the thing builds the model;
whoever reads it calls `load`/`from_columns`; nothing else parses it. Unknown keys are errors on
artifacts (a file written by newer code is refused with what to do, not half read) and on rows (a
producer cannot invent a field that the store would drop).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError


class ContractError(ValueError):
    """A file or row does not match its contract: the message names the file, the field and what to do."""


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors())


class Contract(BaseModel):
    """Base of every contract: strict about unknown fields, JSON round trip exact."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)

    FORMAT_VERSION: ClassVar[int] = 1
    format_version: int = 1

    @classmethod
    def validated(cls, data: Any, *, where: str) -> Self:
        """Validate `data`, raising ContractError that names `where` and each bad field."""
        try:
            obj = cls.model_validate(data)
        except ValidationError as e:
            raise ContractError(f"{where} does not match {cls.__name__} v{cls.FORMAT_VERSION}: {_errors(e)}") from None
        if obj.format_version != cls.FORMAT_VERSION:
            raise ContractError(f"{where} has format_version {obj.format_version}, this code reads "
                                f"{cls.FORMAT_VERSION}: re-run the job that wrote it")
        return obj


class ArtifactFile(Contract):
    """A JSON file inside an artifact folder (meta.json, newslora.json ...): `save` and `load` only here."""

    FILE_NAME: ClassVar[str]
    WHAT_TO_DO: ClassVar[str] = "re-run the job that wrote it"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.FILE_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> Self:
        """Read and check the folder's file.

        Raises:
            ContractError: missing, not JSON, or not matching the contract; with what to do.
        """
        path = Path(folder) / cls.FILE_NAME
        if not path.is_file():
            raise ContractError(f"{folder} has no {cls.FILE_NAME}: {cls.WHAT_TO_DO}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ContractError(f"{path} is not valid JSON ({e}): {cls.WHAT_TO_DO}") from None
        return cls.validated(raw, where=str(path))


class StoreRow(Contract):
    """A row of a store table. `COLUMNS` are the table's own columns; every other field travels in the
    table's JSON column `EXTRA_COLUMN`, so no field is ever dropped on the way in or out."""

    COLUMNS: ClassVar[tuple[str, ...]]
    EXTRA_COLUMN: ClassVar[str | None] = None

    def to_columns(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        cols = {c: data.pop(c) for c in self.COLUMNS}
        data.pop("format_version", None)
        if self.EXTRA_COLUMN is not None:
            cols[self.EXTRA_COLUMN] = {"format_version": self.format_version, **data} if data else None
        elif data:
            raise ContractError(f"{type(self).__name__}: fields {sorted(data)} have no column")
        return cols

    @classmethod
    def from_columns(cls, row: dict[str, Any]) -> Self:
        data = {c: row[c] for c in cls.COLUMNS}
        if cls.EXTRA_COLUMN is not None:
            extra = dict(row.get(cls.EXTRA_COLUMN) or {})
            data.update(extra)
        data.setdefault("format_version", cls.FORMAT_VERSION)
        return cls.validated(data, where=f"a stored {cls.__name__} row")
