"""`/v1/files`: upload, list, read, download and delete files, in OpenAI's shapes.

The same store as the native uploads (rows in db/files.py, bytes through core/filestore.py), each file its
owner's alone: another's file is a 404, as a missing one is.
"""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from api.deps import CallerDep, SessionDep
from api.routers.links import link
from api.routers.openai.errors import OpenAIError, openai_errors
from api.routers.openai.idempotency import IdempotencyKeyHeader, fingerprint, remember, replayed
from api.routers.openai.pages import cursor_page
from api.routers.openai.serving import epoch
from core import filestore
from core.settings import get_settings
from db import files as fileq
from db.models import StoredFile

router = APIRouter(prefix="/v1/files", tags=["openai"])

# What a caller may upload: OpenAI's batch and fine-tune inputs, a general one, and newslora's datasets.
UPLOAD_PURPOSES = ("batch", "fine-tune", "user_data", "dataset")
FILE_OPERATIONS = {"file": ("GET", "/v1/files/{file_id}"), "content": ("GET", "/v1/files/{file_id}/content"),
                   "delete": ("DELETE", "/v1/files/{file_id}")}
FILE_ID = r"^[A-Za-z0-9_.-]{1,40}$"


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


def file_object(f: StoredFile) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": epoch(f.created_at) or 0,
            "filename": f.filename, "purpose": f.purpose, "status": f.status if f.status in
            ("uploaded", "processed", "error") else "processed", "expires_at": None, "status_details": None}


def file_or_404(file_id: str, session, caller, *, param: str | None = None) -> StoredFile:
    f = fileq.get_file(file_id, session=session, owner_id=caller.owner_filter)
    if f is None:
        raise OpenAIError(404, f"No such File object: {file_id}", param=param, code="file_not_found")
    return f


def store_output_file(*, session, owner_id: int | None, filename: str, purpose: str, data: bytes,
                      job_id: int | None = None) -> StoredFile:
    """Register bytes a job produced (a batch's output or error file) as a file of `owner_id`."""
    file_id = fileq.new_file_id()
    stored = filestore.store_chunks(file_id, [data], max_bytes=max(len(data), 1))
    return fileq.add_file(session=session, file_id=file_id, owner_id=owner_id, filename=filename, purpose=purpose,
                          size=stored.size, sha256=stored.sha256, path=str(stored.path), job_id=job_id)


@router.post("", response_model=FileObject, responses=openai_errors(400, 401, 413, 422, 503),
             openapi_extra=link("200", to=FILE_OPERATIONS, file_id="$response.body#/id"))
def upload_file(session: SessionDep, caller: CallerDep, file: UploadFile = File(...),
                purpose: Literal[UPLOAD_PURPOSES] = Form(...),  # type: ignore[valid-type]
                idempotency_key: IdempotencyKeyHeader = None) -> dict:
    """Upload a file (multipart: `file`, `purpose`): a batch's requests (JSONL), fine-tuning data, a dataset.

    With an `Idempotency-Key`, the same upload again answers the first file (its bytes are not kept twice)."""
    file_id = fileq.new_file_id()
    chunks = iter(lambda: file.file.read(1 << 20), b"")
    try:
        stored = filestore.store_chunks(file_id, chunks, max_bytes=get_settings().max_upload_bytes)
    except filestore.FileTooLarge as e:
        raise OpenAIError(413, str(e), param="file") from None
    name = (file.filename or "upload").replace("/", "_")[:255] or "upload"
    fp = fingerprint(purpose, name, stored.sha256)
    try:
        first = replayed(idempotency_key, "files", fp, caller, session)
        if first is None:
            f = fileq.add_file(session=session, file_id=file_id, owner_id=caller.user_id, filename=name,
                               purpose=purpose, size=stored.size, sha256=stored.sha256, path=str(stored.path))
            remember(idempotency_key, "files", fp, f.id, caller, session)
            session.commit()
            return file_object(f)
    except IntegrityError:  # a concurrent upload with the same key won: answer its file
        session.rollback()
        filestore.remove(file_id)
        first = replayed(idempotency_key, "files", fp, caller, session)
        if first is None:
            raise
    except BaseException:
        filestore.remove(file_id)
        raise
    filestore.remove(file_id)  # the same upload again: the first file answers
    return file_object(file_or_404(first, session, caller))


@router.get("", response_model=FileList, responses=openai_errors(401, 422, 503),
            openapi_extra=link("200", to=FILE_OPERATIONS, file_id="$response.body#/data/0/id"))
def list_files(session: SessionDep, caller: CallerDep, after: str | None = Query(None, max_length=40),
               limit: int = Query(10000, ge=1, le=10000), order: Literal["asc", "desc"] = "desc",
               purpose: str | None = Query(None, max_length=32)) -> dict:
    """The caller's files, newest first by default; `after` (a file id) and `has_more` page through them."""
    rows, has_more = fileq.list_files(session=session, owner_id=caller.owner_filter, purpose=purpose, after=after,
                                      limit=limit, order=order)
    return cursor_page([file_object(f) for f in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject, responses=openai_errors(401, 404, 422, 503))
def retrieve_file(file_id: str, session: SessionDep, caller: CallerDep) -> dict:
    return file_object(file_or_404(file_id, session, caller))


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}},
                             "description": "The file's bytes."}, **openai_errors(401, 404, 409, 422, 503)})
def file_content(file_id: str, session: SessionDep, caller: CallerDep) -> FileResponse:
    f = file_or_404(file_id, session, caller)
    path = filestore.file_path(f.id)
    if not path.is_file():
        raise OpenAIError(409, f"file {f.id}'s bytes are gone from the server; upload it again")
    return FileResponse(path, media_type="application/octet-stream", filename=f.filename)


@router.delete("/{file_id}", response_model=FileDeleted, responses=openai_errors(401, 404, 422, 503))
def delete_file(file_id: str, session: SessionDep, caller: CallerDep) -> dict:
    f = file_or_404(file_id, session, caller)
    fileq.delete_file(f, session=session)
    session.commit()
    filestore.remove(f.id)
    return {"id": file_id, "object": "file", "deleted": True}
