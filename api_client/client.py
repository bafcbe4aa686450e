"""A small synchronous client for the newslora HTTP API."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

from core.settings import get_settings

TERMINAL = ("succeeded", "failed", "cancelled")
# Hosts that name this machine's API as the CLI's own (the embedded one, or one started beside it).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class ApiError(RuntimeError):
    """An error answer from the API (status and its detail), or the API being unreachable (status 0)."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}" if status else str(detail))


class WaitTimeout(TimeoutError):
    pass


class Client:
    """`Client()` talks to NEWSLORA_API_URL (or the embedded API on 127.0.0.1:8765)."""

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: float = 30.0):
        s = get_settings()
        self.base_url = (base_url or s.resolved_api_url).rstrip("/")
        token = token if token is not None else s.api_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ApiError(0, f"the newslora API at {self.base_url} is unreachable ({type(e).__name__}); "
                              f"start it with `newslora up`") from None
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.text

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    @property
    def is_remote(self) -> bool:
        """Whether the API is at another address than this machine's usual loopback one, so it cannot read
        this machine's files: local files are then uploaded (`upload`) and named by their file id."""
        host = (httpx.URL(self.base_url).host or "").lower()
        return host not in LOCAL_HOSTS

    # ------------------------------------------------------------ files
    def upload(self, path: str | Path, *, purpose: str = "data") -> dict[str, Any]:
        """Upload a local file (streamed): answers its row, whose `id` a spec's data field may name."""
        p = Path(path).expanduser()
        with p.open("rb") as f:
            return self._request("POST", "/files", files={"file": (p.name, f)}, data={"purpose": purpose},
                                 timeout=None)

    def files(self, *, limit: int = 50) -> dict[str, Any]:
        return self._request("GET", "/files", params={"limit": limit})

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._request("DELETE", f"/files/{file_id}")

    # ------------------------------------------------------------ tokens (admin)
    def create_token(self, name: str, *, admin: bool = False) -> dict[str, Any]:
        return self._request("POST", "/tokens", json={"name": name, "role": "admin" if admin else "member"})

    def tokens(self) -> list[dict[str, Any]]:
        return self._request("GET", "/tokens")

    def revoke_token(self, name_or_id: str) -> dict[str, Any]:
        return self._request("POST", f"/tokens/{name_or_id}/revoke")

    # ------------------------------------------------------------ jobs
    def submit(self, kind: str, spec: dict[str, Any] | None = None, *, idempotency_key: str | None = None,
               parent_id: int | None = None) -> dict[str, Any]:
        body = {"kind": kind, "spec": spec or {}}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if parent_id is not None:
            body["parent_id"] = parent_id
        return self._request("POST", "/jobs", json=body)

    def submit_noop(self, **spec: Any) -> dict[str, Any]:
        return self.submit("noop", spec)

    def submit_prep(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit("prep", spec, **kw)

    def submit_train(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit("train", spec, **kw)

    def submit_classify(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit("classify", spec, **kw)

    def submit_judge(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit("judge", spec, **kw)

    def submit_evaluate(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit("evaluate", spec, **kw)

    def submit_pipeline(self, spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return self.submit("pipeline", spec, **kw)

    def get(self, job_id: int) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}")

    def list(self, *, kind: str | None = None, status: str | None = None, parent_id: int | None = None,
             limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params = {k: v for k, v in dict(kind=kind, status=status, parent_id=parent_id, limit=limit,
                                        offset=offset).items() if v is not None}
        return self._request("GET", "/jobs", params=params)

    def cancel(self, job_id: int) -> dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel")

    def events(self, job_id: int, *, after_id: int = 0, limit: int = 200) -> list[dict[str, Any]]:
        return self._request("GET", f"/jobs/{job_id}/events", params={"after_id": after_id, "limit": limit})

    def wait(self, job_id: int, *, timeout: float | None = None, poll_s: float = 0.5,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job finishes; call `progress(job)` on each poll.

        Raises:
            WaitTimeout: not finished within `timeout` seconds (the job keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if progress is not None:
                progress(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------ results
    def predictions(self, job_id: int, *, offset: int = 0, limit: int = 100,
                    failed: bool | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if failed is not None:
            params["failed"] = str(failed).lower()
        return self._request("GET", f"/jobs/{job_id}/predictions", params=params)

    def iter_predictions(self, job_id: int, *, page: int = 1000) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            got = self.predictions(job_id, offset=offset, limit=page)
            yield from got["items"]
            offset += len(got["items"])
            if not got["items"] or offset >= got["total"]:
                return

    def predictions_jsonl(self, job_id: int) -> str:
        return self._request("GET", f"/jobs/{job_id}/predictions.jsonl")

    def judge_scores(self, job_id: int) -> list[dict[str, Any]]:
        return self._request("GET", f"/jobs/{job_id}/judge_scores")

    def evaluations(self, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        return self._request("GET", "/evaluations", params={"limit": limit, "offset": offset})

    def evaluation(self, eval_id: int) -> dict[str, Any]:
        return self._request("GET", f"/evaluations/{eval_id}")

    def datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/datasets")

    def dataset(self, dataset_id: int) -> dict[str, Any]:
        return self._request("GET", f"/datasets/{dataset_id}")

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/models")

    def model(self, model_id: int) -> dict[str, Any]:
        return self._request("GET", f"/models/{model_id}")

    # ------------------------------------------------------------ exports
    def submit_export(self, adapter_id: int, *, format: str = "gguf", quant: str | None = None,
                      **spec: Any) -> dict[str, Any]:
        """An export job: format 'peft', 'merged' or 'gguf' (quant 'f16' or 'q8_0')."""
        body = {"adapter_id": adapter_id, "format": format, **({"quant": quant} if quant else {}), **spec}
        return self.submit("export", body)

    def exports(self, adapter_id: int) -> list[dict[str, Any]]:
        """An adapter's registered exports, newest first (`metrics.verification` holds the check's numbers)."""
        return self._request("GET", f"/models/{adapter_id}/exports")

    def download_export(self, export_id: int, dest: str | Path, *, extract: bool = False) -> Path:
        """Stream an export's tar.gz to `dest` (a folder: written as newslora-export-ID.tar.gz inside it).

        Args:
            extract: also unpack it next to the archive (into `dest/newslora-export-ID/`).

        Returns:
            the archive's path, or the unpacked folder's with `extract`.
        """
        dest = Path(dest).expanduser()
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / f"newslora-export-{export_id}.tar.gz"
        partial = target.with_name(target.name + ".partial")
        try:
            with self._http.stream("GET", f"/models/{export_id}/download", timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        detail = r.json().get("detail", r.text)
                    except ValueError:
                        detail = r.text
                    raise ApiError(r.status_code, detail)
                with partial.open("wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        f.write(chunk)
        except httpx.TransportError as e:
            partial.unlink(missing_ok=True)
            raise ApiError(0, f"the download from {self.base_url} broke off ({type(e).__name__}); try again") from None
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        if not extract:
            return target
        import tarfile
        with tarfile.open(target, "r:gz") as tar:
            tar.extractall(dest, filter="data")
        return dest / f"newslora-export-{export_id}"
