"""Files: uploads that a job's data fields name by id (`file-<24 hex>`), instead of a path on the server.

`POST /files` streams a multipart upload to disk under the home (core/filestore.py: size limit
NEWSLORA_MAX_UPLOAD_BYTES, SHA-256, all or nothing); each file belongs to its uploader, whom alone (and an
admin) may list, read and delete it. The same rows serve the OpenAI-compatible `/v1/files`.
"""
from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import APIRouter, File, Form, HTTPException, Path as PathParam, Query, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict

from api.deps import Caller, CallerDep, SessionDep
from api.routers.links import link
from api.schemas import UtcTime, errors
from core import filestore
from core.settings import get_settings
from db import files as fileq
from db.models import StoredFile

router = APIRouter(prefix="/files", tags=["files"])

FileId = Annotated[str, PathParam(min_length=1, max_length=40, description="A file id, `file-<24 hex>`.")]
CHUNK = 1024 * 1024
FILE_OPERATIONS = {"file": ("GET", "/files/{file_id}"), "content": ("GET", "/files/{file_id}/content"),
                   "delete": ("DELETE", "/files/{file_id}")}


class FileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    filename: str
    purpose: str
    bytes: int
    sha256: str
    created_at: UtcTime


class FileList(BaseModel):
    items: list[FileOut]
    has_more: bool


class Deleted(BaseModel):
    id: str
    deleted: bool = True


def file_or_404(file_id: str, session, caller: Caller) -> StoredFile:
    """The caller's file (any file for an admin), or 404: another's file is answered as a missing one."""
    f = fileq.get_file(file_id, session=session, owner_id=caller.owner_filter) if fileq.is_file_id(file_id) else None
    if f is None:
        raise HTTPException(404, f"no file with id {file_id}")
    return f


async def _chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk


@router.post("", response_model=FileOut, status_code=201, responses=errors(400, 413, 422, 503),
             openapi_extra=link("201", to=FILE_OPERATIONS, file_id="$response.body#/id"))
async def upload_file(session: SessionDep, caller: CallerDep,
                      file: Annotated[UploadFile, File(description="the file's bytes (multipart/form-data)")],
                      purpose: Annotated[str, Form(min_length=1, max_length=32, pattern=r"^[a-z0-9_-]+$",
                                                   description="what the file is for, e.g. `data`")],
                      ) -> FileOut:
    """Store an upload (a CSV, JSONL or parquet file, or a classes.txt) and answer its id."""
    file_id = fileq.new_file_id()
    filename = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
    try:
        stored = await filestore.store_stream(file_id, _chunks(file), max_bytes=get_settings().max_upload_bytes)
    except filestore.FileTooLarge as e:
        raise HTTPException(413, str(e)) from None
    row = fileq.add_file(session=session, file_id=file_id, owner_id=caller.user_id, filename=filename,
                         purpose=purpose, size=stored.size, sha256=stored.sha256, path=str(stored.path))
    session.commit()
    return FileOut.model_validate(row)


@router.get("", response_model=FileList, responses=errors(422, 503),
            openapi_extra=link("200", to=FILE_OPERATIONS, file_id="$response.body#/items/0/id"))
def list_files(session: SessionDep, caller: CallerDep, purpose: str | None = Query(None, max_length=32),
               after: str | None = Query(None, max_length=40, description="the last file id of the previous page"),
               limit: int = Query(50, ge=1, le=500)) -> FileList:
    rows, more = fileq.list_files(session=session, owner_id=caller.owner_filter, purpose=purpose, after=after,
                                  limit=limit)
    return FileList(items=[FileOut.model_validate(f) for f in rows], has_more=more)


@router.get("/{file_id}", response_model=FileOut, responses=errors(404, 422, 503))
def get_file(file_id: FileId, session: SessionDep, caller: CallerDep) -> FileOut:
    return FileOut.model_validate(file_or_404(file_id, session, caller))


@router.get("/{file_id}/content", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}},
                             "description": "The file's bytes."}, **errors(404, 409, 422, 503)})
def file_content(file_id: FileId, session: SessionDep, caller: CallerDep) -> FileResponse:
    f = file_or_404(file_id, session, caller)
    path = filestore.file_path(f.id)
    if not path.is_file():
        raise HTTPException(409, f"file {file_id}'s bytes are gone from the server; upload it again")
    return FileResponse(path, media_type="application/octet-stream", filename=f.filename,
                        headers={"Cache-Control": "no-store"})


@router.delete("/{file_id}", response_model=Deleted, responses=errors(404, 422, 503))
def delete_file(file_id: FileId, session: SessionDep, caller: CallerDep) -> Deleted:
    f = file_or_404(file_id, session, caller)
    fileq.delete_file(f, session=session)
    session.commit()
    filestore.remove(file_id)
    return Deleted(id=file_id)
