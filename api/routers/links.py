"""OpenAPI links: where an id in a response leads, so a client (or Schemathesis's stateful phase) can follow it.

A route passes `link(...)` as its `openapi_extra`; FastAPI merges it into the route's documented responses.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import quote


def operation_ref(method: str, path: str) -> str:
    """The `operationRef` of an operation: a JSON Pointer into `paths` (RFC 6901), percent-encoded as a URI."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return f"#/paths/{quote(pointer, safe='~')}/{method.lower()}"


def link(*statuses: str, to: dict[str, tuple[str, str]], **parameters: str) -> dict[str, Any]:
    """`openapi_extra` linking each response in `statuses` to each operation in `to`.

    Args:
        statuses: the response codes that carry the id ("200", "201").
        to: link name -> (method, path) of the operation the id leads to.
        parameters: the target's parameter -> a runtime expression (`$response.body#/id`).
    """
    links = {name: {"operationRef": operation_ref(method, path), "parameters": dict(parameters)}
             for name, (method, path) in to.items()}
    return {"responses": {status: {"links": links} for status in statuses}}
