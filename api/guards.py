"""Checks on every request before it is routed, for browsers and sizes (run by `guard` in api/app.py).

- Host allow-list (NEWSLORA_ALLOWED_HOSTS, loopback names by default): a page on another site whose name
  resolves to this machine (DNS rebinding) sends its own name as Host, and is refused. A loopback IP
  literal is always allowed (no name to rebind).
- Cross-site requests: a state-changing method (not GET/HEAD/OPTIONS) from a page of another origin
  (`Origin` not this Host, or `Sec-Fetch-Site: cross-site`) is refused, whatever its content type.
- Every HTML answer carries a Content-Security-Policy (its own, or a strict default) and `nosniff`.
- Body limits: NEWSLORA_MAX_BODY_BYTES, and for uploads NEWSLORA_MAX_UPLOAD_BYTES plus the form's envelope.
"""
from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from core.settings import get_settings

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
UPLOAD_PATHS = ("/files", "/v1/files")
UPLOAD_ENVELOPE_BYTES = 1024 * 1024  # multipart boundaries and fields around the file
# An HTML answer without its own policy (a dashboard fragment opened directly) runs no script at all.
DEFAULT_HTML_CSP = ("default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                    "base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def host_name(host_header: str) -> str:
    """'example.org:8765' -> 'example.org'; '[::1]:8765' -> '[::1]' (lower-cased)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[:h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def host_allowed(host_header: str | None) -> bool:
    if not host_header:
        return False
    name = host_name(host_header)
    allowed = {a.strip().lower() for a in get_settings().allowed_hosts}
    if "*" in allowed or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def cross_site(request: Request) -> bool:
    """A state-changing request sent by a page of another site."""
    if request.method in SAFE_METHODS:
        return False
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin request (browsers send Origin on those)
    parts = urlsplit(origin)
    return origin == "null" or not parts.netloc or parts.netloc.lower() != request.headers.get("host", "").lower()


def secure_html(response: Response) -> Response:
    """`nosniff` on every answer; a strict CSP on an HTML answer that has none."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.headers.get("content-type", "").startswith("text/html"):
        response.headers.setdefault("Content-Security-Policy", DEFAULT_HTML_CSP)
    return response


def body_too_large(limit: int) -> str:
    return (f"request body over {limit} bytes (NEWSLORA_MAX_BODY_BYTES): send a large input as an uploaded file "
            f"(POST /files or /v1/files, streamed to disk) and name it by its id")


def body_limit(path: str) -> int:
    """The most bytes a request body to `path` may have."""
    s = get_settings()
    if path in UPLOAD_PATHS:
        return max(s.max_body_bytes, s.max_upload_bytes + UPLOAD_ENVELOPE_BYTES)
    return s.max_body_bytes
