"""The review's size probe against a real API process: a 1,000,000-item classify body (which took the API from
178 MB to 981 MB before its 422) is refused by its size before a byte of it is parsed, and the largest body
the API does parse (the default NEWSLORA_MAX_BODY_BYTES of tiny items) raises its peak memory by a bounded
amount, read from the kernel (VmHWM of the API's process)."""
from __future__ import annotations

import httpx

from core.settings import Settings

TOKEN = "bounds-test-token"
ITEM = '{"id":"1","text":""},'


def _peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def _items_body(n: int) -> bytes:
    return ('{"kind":"classify","spec":{"items":[' + ITEM * (n - 1) + ITEM[:-1] + ']}}').encode()


def test_huge_bodies_are_refused_unread_and_the_largest_parsed_one_is_bounded(stack_factory):
    st = stack_factory(NEWSLORA_API_TOKEN=TOKEN)
    st.start_api()
    url, auth = st.url + "/jobs", {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    pid = st.procs["api"].pid
    assert httpx.post(url, json={"kind": "noop", "spec": {}}, headers=auth).status_code == 201
    before = _peak_kb(pid)

    huge = _items_body(1_000_000)  # the review's probe: ~21 MB
    r = httpx.post(url, content=huge, headers=auth, timeout=60)
    assert r.status_code == 413 and "upload" in r.json()["detail"], r.text
    assert _peak_kb(pid) - before < 20_000, "a refused body was buffered or parsed"

    limit = Settings().max_body_bytes
    n = (limit - 100) // len(ITEM)  # as many items as the largest accepted body holds (~400,000)
    r = httpx.post(url, content=_items_body(n), headers=auth, timeout=120)
    assert r.status_code == 422 and "NEWSLORA_MAX_INLINE_ITEMS" in r.text and "POST /files" in r.text
    grown_mb = (_peak_kb(pid) - before) / 1024
    assert grown_mb < 160, f"parsing the largest body raised the API's peak memory by {grown_mb:.0f} MB"
    assert httpx.get(url, headers=auth).json()["total"] == 1  # nothing was created by either
