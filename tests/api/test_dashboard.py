"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright) against a real API
(uvicorn) and a real worker on the embedded store and broker.

Screenshots go to the test's tmp folder, and to $NEWSLORA_SCREENSHOTS when that is set.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, Stack, make_stack_env, wait_status

CHROMIUM = os.environ.get("NEWSLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
HOSTILE_TEXT = ('<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
                'Stocks & bonds "rallied" </td></tr></table><b>bold?</b>')
HOSTILE_NAME = 'lora rank 4 <img src=x onerror="window.__pwned = 3">'
TOKEN = "dashboard-test-token"



# ---------------------------------------------------------------- a store with real jobs and evaluations

def _predictions(rng: random.Random, n: int, accuracy: float) -> list[dict]:
    rows = []
    for i in range(n):
        gold = LABELS[i % len(LABELS)]
        label = gold if rng.random() < accuracy else rng.choice([x for x in LABELS if x != gold])
        weights = {lab: rng.random() * 0.3 for lab in LABELS}
        weights[label] += 1.0
        total = sum(weights.values())
        rows.append({"item_id": f"a{i}", "seq": i, "gold": gold, "label": label,
                     "probs": {k: v / total for k, v in weights.items()}, "model": "smollm2-135m"})
    return rows


def _classify_job(s, preds: list[dict], adapter_id: int | None, texts: dict[str, str] | None = None) -> int:
    from db import jobs as jobq
    from db import results as resq
    items = [{"id": p["item_id"], "text": (texts or {}).get(p["item_id"], f"Article number {p['seq']} about "
                                                                              f"{p['gold'].lower()} news."),
              "label": p["gold"]} for p in preds]
    job = jobq.create_job(session=s, kind="classify", queue="gpu", spec={
        "items": items, "model": "smollm2-135m", "adapter_id": adapter_id, "mode": "score"})
    resq.save_predictions(job.id, [{**p, "adapter_id": adapter_id} for p in preds], session=s)
    jobq.finish(job.id, "succeeded", session=s, result={"label_names": LABELS, "predicted": len(preds)})
    return job.id


def seed_store(db_url: str) -> dict[str, int]:
    """Jobs and evaluations written straight into the store: a finished pipeline with children, a train job
    with loss and validation-accuracy events, three classify jobs (one with hostile item text) and
    evaluations of two adapters over the same items (one of them twice, under a name with markup in it)."""
    from db import jobs as jobq
    from db import results as resq
    from db.session import session_scope
    from workers.evaluation.evaluate import evaluate_runs
    from core.specs.evaluate import EvaluateSpec

    rng = random.Random(7)
    ids: dict[str, int] = {}
    with session_scope(db_url) as s:
        pipe = jobq.create_job(session=s, kind="pipeline", queue="cpu", spec={"name": "agnews-quick"})
        ids["pipeline"] = pipe.id
        train = jobq.create_job(session=s, kind="train", queue="gpu", spec={"dataset_id": 1, "max_steps": 60},
                                parent_id=pipe.id)
        ids["train"] = train.id
        for step in range(1, 61):
            jobq.add_event(train.id, "progress", session=s, metrics={
                "done": step, "total": 60, "loss": round(2.4 * 0.95 ** step + 0.15 + rng.random() * 0.05, 4)})
            if step % 15 == 0:
                jobq.add_event(train.id, f"eval at step {step}", session=s, metrics={
                    "step": step, "val_loss": round(1.9 * 0.96 ** step + 0.2, 4),
                    "val_accuracy": round(0.3 + 0.6 * (1 - 0.95 ** step), 4)})
        jobq.finish(train.id, "succeeded", session=s, result={"steps": 60})
        prep = jobq.create_job(session=s, kind="prep", queue="cpu", spec={}, parent_id=pipe.id)
        jobq.finish(prep.id, "succeeded", session=s)
        jobq.finish(pipe.id, "succeeded", session=s)

        base = _predictions(rng, 80, 0.3)
        lora_a = _predictions(rng, 80, 0.85)
        lora_b = _predictions(rng, 80, 0.7)
        ids["classify_base"] = _classify_job(s, base, None, texts={"a0": HOSTILE_TEXT})
        ids["classify_a"] = _classify_job(s, lora_a, 1)
        ids["classify_b"] = _classify_job(s, lora_b, 2)
        for key, name, preds, cid in (("eval_a", "lora rank 8", lora_a, ids["classify_a"]),
                                      ("eval_b", "lora rank 4", lora_b, ids["classify_b"]),
                                      ("eval_hostile", HOSTILE_NAME, lora_b, ids["classify_b"])):
            spec = EvaluateSpec(classify_job_ids=[ids["classify_base"], cid], name=name, bootstrap=200)
            doc = evaluate_runs({"base": base, "fine-tuned": preds}, LABELS, spec=spec)
            ids[key] = resq.add_evaluation(session=s, job_id=None, name=name, spec=spec.model_dump(mode="json"),
                                           document=doc, report_path=None).id
    return ids


# ---------------------------------------------------------------- the stack and the browser

@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _save_shot(page, shots: Path, name: str, **kw) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), **kw)
    extra = os.environ.get("NEWSLORA_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)
    return path


def _start(home: Path, **extra: str) -> Stack:
    """A real API (uvicorn) on the embedded default (SQLite store, SQLAlchemy broker) under `home`."""
    home.mkdir()
    st = Stack(make_stack_env(home, database_url=None, broker_url=None, **extra), home)
    st._spawn("api", [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port",
                      str(st.port), "--log-level", "warning"])
    headers = {"Authorization": f"Bearer {extra['NEWSLORA_API_TOKEN']}"} if "NEWSLORA_API_TOKEN" in extra else {}
    deadline = time.monotonic() + 60
    while True:  # /health itself needs the token beyond loopback
        try:
            if httpx.get(st.url + "/health", headers=headers, timeout=2).status_code == 200:
                return st
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"API did not come up: {st.log('api')[-3000:]}"
        time.sleep(0.2)


def _newslora(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api_client.cli", *args], env=env, cwd=REPO, timeout=120,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The API and one worker as `newslora up` starts them (embedded: SQLite store, SQLAlchemy broker), seeded."""
    home = tmp_path_factory.mktemp("dash") / "home"
    home.mkdir()
    st = Stack(make_stack_env(home, database_url=None, broker_url=None), home)
    try:
        up = _newslora(st.env, "up")
        assert up.returncode == 0, up.stderr
        st.up_stdout = up.stdout
        st.ids = seed_store(f"sqlite:///{home}/newslora.sqlite")
        yield st
    finally:
        _newslora(st.env, "down")


def test_newslora_up_prints_the_dashboard_url(stack):
    line = next(ln for ln in stack.up_stdout.splitlines() if ln.startswith("dashboard: "))
    url = line.split(": ", 1)[1]
    assert url == f"{stack.url}/dashboard/jobs"
    shell = httpx.get(url)
    assert shell.status_code == 200 and "dashboard.js" in shell.text
    assert "script-src 'self'" in shell.headers["content-security-policy"]


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, launched by Playwright (never `playwright install`: no download)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: `apt-get install chromium` (.ci/run does), "
                    f"or set NEWSLORA_CHROMIUM")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught exceptions (checked at the end)."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
    yield pg
    ctx.close()


# ---------------------------------------------------------------- jobs

def test_running_job_advances_on_screen_and_cancels_from_the_page(stack, page, shots):
    client = stack.client()
    job = client.submit("noop", {"steps": 400, "sleep_s": 0.05})
    wait_status(client, job["id"], ("running",), timeout=30)

    page.goto(f"{stack.url}/dashboard/jobs/{job['id']}")
    summary = page.locator("#job-summary .progress")
    summary.wait_for()
    page.evaluate("window.__sameDocument = true")  # gone if the page reloaded
    first = float(summary.get_attribute("data-progress"))
    page.wait_for_function("p => Number(document.querySelector('#job-summary .progress').dataset.progress) > p",
                           arg=first, timeout=10_000)
    # A selector, not a JS expression: an expression that must be polled is evaluated as a string, which the
    # page's CSP (script-src 'self', no 'unsafe-eval') refuses.
    page.wait_for_selector("#events tbody tr:nth-child(3)", timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True

    page.goto(f"{stack.url}/dashboard/jobs")
    row = page.locator(f"tr[data-job-id='{job['id']}']")
    row.wait_for()
    page.evaluate("window.__sameDocument = true")
    before = float(row.locator(".progress").get_attribute("data-progress"))
    page.wait_for_function(
        "([id, p]) => Number(document.querySelector(`tr[data-job-id='${id}'] .progress`).dataset.progress) > p",
        arg=[job["id"], before], timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True
    # The pipeline's children sit under it in the tree.
    pipe_row = page.locator(f"tr[data-job-id='{stack.ids['pipeline']}']")
    child_row = page.locator(f"tr[data-job-id='{stack.ids['train']}']")
    assert pipe_row.get_attribute("class") == "depth-0" and child_row.get_attribute("class") == "depth-1"
    _save_shot(page, shots, "jobs")

    row.locator("button[data-cancel]").click()
    page.wait_for_selector(f"tr[data-job-id='{job['id']}'][data-status='cancelled']", timeout=15_000)
    assert client.get(job["id"])["status"] == "cancelled"
    assert page.evaluate("window.__sameDocument") is True

    page.select_option("select[name=status]", "cancelled")
    page.wait_for_url("**/dashboard/jobs?status=cancelled")
    page.wait_for_selector(f"tr[data-job-id='{job['id']}']")
    assert page.locator("#job-rows tbody tr[data-job-id]").count() == 1
    assert page.errors == []


def test_training_job_page_draws_loss_and_validation_accuracy(stack, page, shots):
    page.goto(f"{stack.url}/dashboard/jobs/{stack.ids['train']}")
    page.wait_for_selector("svg.chart polyline[data-series='training loss']")
    series = page.eval_on_selector_all("svg.chart polyline", "els => els.map(e => e.dataset.series)")
    assert series == ["training loss", "validation loss", "validation accuracy"]
    points = page.get_attribute("svg.chart polyline[data-series='training loss']", "points").split()
    assert len(points) == 60
    page.wait_for_selector("#events tbody tr:nth-child(60)")  # a selector: the CSP refuses a polled expression
    _save_shot(page, shots, "train-job", full_page=True)
    assert page.errors == []


# ---------------------------------------------------------------- evaluations

def test_compare_view_shows_both_evaluations_and_mcnemar(stack, page, shots):
    ids = stack.ids
    page.goto(f"{stack.url}/dashboard/evaluations")
    page.wait_for_selector("#compare-form")
    page.select_option("#compare-form select[name=a]", str(ids["eval_a"]))
    page.select_option("#compare-form select[name=b]", str(ids["eval_b"]))
    page.click("#compare-form button[type=submit]")
    page.wait_for_selector("#compare-summary")

    docs = {k: stack.client().evaluation(ids[k])["document"]["models"]["fine-tuned"] for k in ("eval_a", "eval_b")}
    for side, key in (("a", "eval_a"), ("b", "eval_b")):
        acc, f1 = docs[key]["accuracy"], docs[key]["macro_f1"]
        assert page.inner_text(f".acc-{side}") == (f"{acc['value'] * 100:.1f}% [{acc['ci'][0] * 100:.1f}, "
                                                   f"{acc['ci'][1] * 100:.1f}]")
        assert page.inner_text(f".f1-{side}").startswith(f"{f1['value'] * 100:.1f}% [")
    assert page.locator("table.confusion").count() == 2
    assert page.locator("table.per-class tbody tr").count() == len(LABELS)
    assert page.locator("svg.chart circle").count() == 4  # accuracy and macro-F1 of each side

    from workers.evaluation.evaluate import compare_models
    preds = {k: stack.client().predictions(ids[k], limit=1000)["items"] for k in ("classify_a", "classify_b")}
    expected = compare_models(preds["classify_a"], preds["classify_b"], label_names=LABELS, bootstrap=0)
    text = page.inner_text("#mcnemar")
    assert f"On the {expected['n_paired']} items" in text
    assert f"A right and B wrong on {expected['b']}, A wrong and B right on {expected['c']}" in text
    p = expected["mcnemar"]["p_value"]
    assert page.inner_text(".p-value") == ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")
    _save_shot(page, shots, "compare", full_page=True)
    assert page.errors == []


def test_reports_are_served_and_downloadable(stack, page, shots):
    eid = stack.ids["eval_a"]
    page.goto(f"{stack.url}/dashboard/evaluations")
    page.wait_for_selector(f"tr[data-evaluation-id='{eid}']")
    assert page.locator("table.evaluations tbody tr").count() == 6  # three evaluations, two models each
    assert page.locator("a.compare-models").count() == 3  # base and fine-tuned of one evaluation
    hostile = page.locator(f"tr[data-evaluation-id='{stack.ids['eval_hostile']}'] td").first
    assert hostile.inner_text().startswith(f"#{stack.ids['eval_hostile']} {HOSTILE_NAME}")  # text, never markup
    assert page.evaluate("window.__pwned") is None and page.locator("main img").count() == 0
    _save_shot(page, shots, "evaluations")
    with page.expect_download() as dl:
        page.click(f"a[href='/evaluations/{eid}/report?download=1']")
    assert dl.value.suggested_filename == f"evaluation-{eid}-report.html"
    body = Path(dl.value.path()).read_text()
    assert "<h1>lora rank 8</h1>" in body and "data:image/png;base64," in body
    r = httpx.get(f"{stack.url}/evaluations/{eid}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': no script runs
    assert httpx.get(f"{stack.url}/evaluations/424242/report").status_code == 404
    assert page.errors == []


# ---------------------------------------------------------------- predictions

def test_predictions_filter_and_hostile_text_is_shown_as_text(stack, page, shots):
    jid = stack.ids["classify_base"]
    page.goto(f"{stack.url}/dashboard/jobs/{jid}/predictions")
    page.wait_for_selector("table.predictions tbody tr[data-item-id]")
    assert page.locator("table.predictions tbody tr[data-item-id]").count() == 50  # one page
    assert page.inner_text("tr[data-item-id='a0'] .article") == HOSTILE_TEXT
    assert page.evaluate("window.__pwned") is None
    assert page.locator("main img, main script, main b").count() == 0

    page.check("input[name=wrong]")
    page.wait_for_url("**/predictions?wrong=1")
    page.wait_for_selector("#prediction-count")
    preds = stack.client().predictions(jid, limit=1000)["items"]
    n_wrong = sum(p["label"] != p["gold"] for p in preds)
    assert page.inner_text("#prediction-count").startswith(f"{n_wrong} of 80 items match")
    assert page.locator("tr.right").count() == 0

    page.goto(f"{stack.url}/dashboard/jobs/{jid}/predictions?gold=Sports&predicted=Sports&min_conf=0.5")
    page.wait_for_selector("#prediction-count")
    golds = page.eval_on_selector_all("table.predictions tbody tr[data-item-id] td:nth-child(4)",
                                      "els => els.map(e => e.textContent.trim())")
    confs = page.eval_on_selector_all("table.predictions tbody tr[data-item-id] td:nth-child(6)",
                                      "els => els.map(e => Number(e.textContent))")
    expected = [p for p in preds if p["gold"] == "Sports" and p["label"] == "Sports"
                and p["probs"]["Sports"] >= 0.5]
    assert len(golds) == len(expected) > 0 and set(golds) == {"Sports"} and min(confs) >= 0.5
    _save_shot(page, shots, "predictions")
    assert page.errors == []


# ---------------------------------------------------------------- the token beyond loopback

def test_token_is_required_beyond_loopback_and_cancel_works_with_it(tmp_path, browser):
    st = _start(tmp_path / "home", NEWSLORA_API_HOST="0.0.0.0", NEWSLORA_API_TOKEN=TOKEN)
    try:
        job = st.client().submit("noop", {"steps": 1})  # no worker: it stays queued
        ctx = browser.new_context()
        page = ctx.new_page()
        page.goto(f"{st.url}/dashboard/jobs")
        page.wait_for_selector("#token-form:not([hidden])")
        assert page.locator("tr[data-job-id]").count() == 0
        status = page.evaluate(f"fetch('/jobs/{job['id']}/cancel', {{method: 'POST'}}).then(r => r.status)")
        assert status == 401
        for path in ("/dashboard/fragments/jobs", "/dashboard/fragments/jobs/rows",
                     f"/dashboard/fragments/jobs/{job['id']}", "/evaluations/1/report"):
            assert httpx.get(st.url + path).status_code == 401, path
        sneaky = httpx.get(f"{st.url}/dashboard//fragments/jobs")  # public, but only ever the empty shell
        assert sneaky.status_code == 200 and "data-job-id" not in sneaky.text and "noop" not in sneaky.text

        page.fill("#token-form input[name=token]", "wrong")
        page.click("#token-form button")
        page.wait_for_selector("#token-error:text('that token was refused')")
        page.fill("#token-form input[name=token]", TOKEN)
        page.click("#token-form button")
        page.click(f"tr[data-job-id='{job['id']}'] button[data-cancel]")
        page.wait_for_selector(f"tr[data-job-id='{job['id']}'][data-status='cancelled']")
        assert st.client().get(job["id"])["status"] == "cancelled"
        ctx.close()
    finally:
        st.stop()
