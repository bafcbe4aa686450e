"""The `newslora` command line, built on the Python client (it never touches the database).

    newslora up | down | status          the embedded API + worker (started on demand anyway)
    newslora run CONFIG [key=value ...]  the main job: prepare, fine-tune, classify, judge, evaluate, report
    newslora demo                        a small job through the real queue, with a progress bar
    newslora jobs list|show|cancel|wait|events
    newslora prep | train | classify | submit
    newslora eval list|show|report       stored evaluations
    newslora datasets list | models list | predictions JOB
    newslora db upgrade
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from api_client import embedded
from api_client.client import TERMINAL, ApiError, Client, WaitTimeout
from api_client.embedded import ensure_running
from api_client.pipeline_config import ConfigError, apply_overrides, load_pipeline_config
from core.specs import SPECS
from core.specs.keys import error_lines

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_API = 3


def _console():
    from rich.console import Console
    return Console(stderr=False, highlight=False)


def _client(args: argparse.Namespace) -> Client:
    if not getattr(args, "no_start", False):
        ensure_running()
    return Client()


# ---------------------------------------------------------------- arguments and errors

class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser: `key=value` overrides may come before, between or after its options
    (`newslora prep FILE --name x key=value`), as with argparse's parse_intermixed_args."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # parse_known_intermixed_args calls back in here, twice
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _spec_model(kind: str | None):
    return SPECS.get(kind or "")


def _print_usage_error(e: ConfigError) -> int:
    for line in str(e).splitlines():
        print(f"newslora: {line}", file=sys.stderr)
    return EXIT_USAGE


def _print_api_error(e: ApiError, kind: str | None) -> int:
    """An API error on stderr: a 422's validation errors one `field: message` line each, never raw JSON."""
    status = f" (HTTP {e.status})" if e.status else ""
    if isinstance(e.detail, list) and all(isinstance(d, dict) for d in e.detail):
        for line in error_lines(e.detail, _spec_model(kind)):
            print(f"newslora: {line}{status}", file=sys.stderr)
    else:
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        print(f"newslora: {detail}{status}", file=sys.stderr)
    return EXIT_API


# ---------------------------------------------------------------- display

def _fmt_eta(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return ""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"ETA {h}:{m:02d}:{s:02d}" if h else f"ETA {m}:{s:02d}"


def _progress_text(job: dict[str, Any]) -> str:
    info = job.get("progress_info") or {}
    bits = []
    if info.get("done") is not None and info.get("total"):
        bits.append(f"{info['done']:g}/{info['total']:g}")
    for k in ("loss", "val_loss", "val_accuracy", "lr", "tokens_per_s", "items_per_s"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            bits.append(f"{k}={v:.4g}")
    eta = _fmt_eta(info.get("eta_s"))
    if eta:
        bits.append(eta)
    return " ".join(bits)


def watch(client: Client, job_id: int, *, timeout: float | None = None) -> dict[str, Any]:
    """Live progress bars for a job and its children until it finishes."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    bars: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), transient=False) as progress:
        while True:
            job = client.get(job_id)
            tree = [job] + [client.get(c) for c in job.get("children", [])]
            for j in tree:
                label = f"#{j['id']} {j['kind']:<8} {j['status']:<9}"
                if j["id"] not in bars:
                    bars[j["id"]] = progress.add_task(label, total=1.0, detail="")
                done = 1.0 if j["status"] == "succeeded" else float(j.get("progress") or 0)
                progress.update(bars[j["id"]], description=label, completed=done, detail=_progress_text(j))
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(0.5)


def _print_job(job: dict[str, Any], client: Client, *, events: int = 15) -> None:
    con = _console()
    con.print(f"[bold]job {job['id']}[/bold]  kind={job['kind']}  queue={job['queue']}  status={job['status']}"
              f"  progress={job['progress']:.0%}  attempts={job['attempts']}  code={job['code_version']}")
    con.print(f"created {job['created_at']}  started {job['started_at']}  finished {job['finished_at']}")
    if job.get("error"):
        con.print(f"[red]error:[/red] {job['error']}")
    if job.get("parent_id"):
        con.print(f"parent: {job['parent_id']}")
    if job.get("children"):
        con.print("children:")
        for cid in job["children"]:
            c = client.get(cid)
            con.print(f"  └─ #{c['id']} {c['kind']:<9} {c['status']:<9} {c['progress']:.0%}"
                      + (f"  [red]{c['error']}[/red]" if c.get("error") else ""))
    con.print("spec: " + json.dumps(job["spec"], sort_keys=True)[:2000])
    if job.get("result"):
        result = dict(job["result"])
        meta = result.pop("meta", None)
        con.print("result: " + json.dumps(result, sort_keys=True, default=str)[:3000])
        if meta is not None:
            con.print("meta.json:")
            con.print_json(json.dumps(meta, default=str))
    evs = client.events(job["id"], limit=1000)[-events:]
    if evs:
        con.print(f"last {len(evs)} events:")
        for e in evs:
            m = json.dumps(e["metrics"], default=str) if e.get("metrics") else ""
            con.print(f"  {e['time'][:19]} {e['level']:<7} {e['message']} {m[:300]}")


# ---------------------------------------------------------------- commands

def cmd_up(args) -> int:
    if args.foreground:
        import subprocess
        procs = [subprocess.Popen(c) for c in embedded.commands().values()]
        print(f"dashboard: {embedded.dashboard_url()}", flush=True)
        try:
            for p in procs:
                p.wait()
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
        return 0
    embedded.start()
    base = Client().base_url
    print(f"newslora is up: API {base}, worker on queues cpu,gpu")
    print(f"dashboard: {embedded.dashboard_url(base)}")
    return 0


def cmd_down(args) -> int:
    stopped = embedded.stop()
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args) -> int:
    print(json.dumps({"processes": embedded.status(), "api_up": embedded.api_up()}, indent=2))
    return 0


def cmd_db(args) -> int:
    from db.session import init_db  # lazy: SQLAlchemy and Alembic, only for `newslora db upgrade`
    init_db()
    print("database is at the latest migration")
    return 0


def _submit_and_follow(client: Client, kind: str, spec: dict[str, Any], args) -> int:
    job = client.submit(kind, spec, idempotency_key=getattr(args, "key", None))
    print(f"submitted {kind} job {job['id']}", file=sys.stderr)
    if getattr(args, "no_wait", False):
        print(job["id"])
        return 0
    job = watch(client, job["id"], timeout=getattr(args, "timeout", None))
    if job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}: {job.get('error') or ''}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(job["result"], indent=2, default=str)[:5000])
    return 0


def cmd_submit(args) -> int:
    spec = _load_spec(args.spec)
    apply_overrides(spec, args.overrides, _spec_model(args.kind))
    return _submit_and_follow(_client(args), args.kind, spec, args)


def _load_spec(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    if raw.startswith("@"):
        import yaml
        return yaml.safe_load(Path(raw[1:]).read_text()) or {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise SystemExit(f"newslora: --spec is not JSON ({e}); give JSON or @file.yaml")


def cmd_demo(args) -> int:
    return _submit_and_follow(_client(args), "noop", {"steps": 20, "sleep_s": 0.1}, args)


def cmd_jobs(args) -> int:
    client = _client(args)
    if args.action == "list":
        got = client.list(kind=args.kind, status=args.status, limit=args.limit, offset=args.offset)
        from rich.table import Table
        t = Table("id", "kind", "status", "progress", "parent", "created", "error")
        for j in got["items"]:
            t.add_row(str(j["id"]), j["kind"], j["status"], f"{j['progress']:.0%}", str(j["parent_id"] or ""),
                      j["created_at"][:19], (j.get("error") or "")[:60])
        _console().print(t)
        print(f"{len(got['items'])} of {got['total']}")
        return 0
    if args.id is None:
        raise SystemExit(f"newslora jobs {args.action}: give a job id")
    if args.action == "show":
        _print_job(client.get(args.id), client, events=args.events)
        return 0
    if args.action == "cancel":
        job = client.cancel(args.id)
        print(f"job {job['id']}: {job['status']}" + (" (stops at its next step)" if job["status"] == "running" else ""))
        return 0
    if args.action == "events":
        for e in client.events(args.id, limit=1000):
            print(json.dumps(e, default=str))
        return 0
    if args.action == "wait":
        job = watch(client, args.id, timeout=args.timeout)
        print(f"job {job['id']} {job['status']}" + (f": {job['error']}" if job.get("error") else ""))
        return 0 if job["status"] == "succeeded" else EXIT_FAILED
    raise SystemExit(f"unknown action {args.action}")


def cmd_prep(args) -> int:
    spec: dict[str, Any] = {"name": args.name, "train": _source(args.source)}
    spec["test"] = _source(args.test) if args.test else None
    if args.max_per_class:
        spec["max_per_class"] = args.max_per_class
    if args.tokenizer:
        spec["tokenizer"] = args.tokenizer
    if args.skip_bad_rows:
        spec["on_bad_rows"] = "skip"
    apply_overrides(spec, args.overrides, _spec_model("prep"))
    client = _client(args)
    for split in ("train", "test"):
        if spec.get(split) and client.is_remote:
            spec[split] = _uploaded(spec[split], client)
    return _submit_and_follow(client, "prep", spec, args)


def _source(path: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    if p.exists():
        return {"path": str(p.resolve())}
    return {"path": path, "format": "hub"}


def _uploaded(source: dict[str, Any], client: Client) -> dict[str, Any]:
    """A prep source for an API on another machine: its local file (and its classes file, or the AG News
    classes.txt beside it) uploaded, and named by file id."""
    p = Path(source["path"])
    if source.get("format") == "hub" or not p.is_file():
        return source
    out = {**source, "path": client.upload(p)["id"]}
    classes = Path(source["classes_file"]).expanduser() if source.get("classes_file") else p.with_name("classes.txt")
    if classes.is_file():
        out["classes_file"] = client.upload(classes)["id"]
    return out


def cmd_train(args) -> int:
    spec: dict[str, Any] = {"dataset_id": args.dataset, "model": args.model, "backend": args.backend}
    apply_overrides(spec, args.overrides, _spec_model("train"))
    return _submit_and_follow(_client(args), "train", spec, args)


def cmd_classify(args) -> int:
    if args.file and "=" in args.file and not Path(args.file).expanduser().exists():
        args.overrides, args.file = [args.file, *args.overrides], None  # `--text '...' key=value`: no file
    spec: dict[str, Any] = {"model": args.model, "mode": args.mode}
    if args.adapter:
        spec["adapter_id"] = args.adapter
    if args.text is not None:
        spec["items"] = [{"id": "text", "text": args.text}]
    elif args.file:
        spec["input_file"] = str(Path(args.file).expanduser().resolve())
    else:
        raise SystemExit("newslora classify: give a file (JSONL or CSV) or --text '...'")
    apply_overrides(spec, args.overrides, _spec_model("classify"))
    client = _client(args)
    if spec.get("input_file") and client.is_remote and Path(spec["input_file"]).is_file():
        spec["input_file"] = client.upload(spec["input_file"])["id"]
    rc = _submit_and_follow(client, "classify", spec, args) if args.text is None else None
    if args.text is not None:
        job = client.submit("classify", spec)
        job = client.wait(job["id"], timeout=args.timeout)
        if job["status"] != "succeeded":
            print(f"job {job['id']} {job['status']}: {job.get('error')}", file=sys.stderr)
            return EXIT_FAILED
        p = client.predictions(job["id"])["items"][0]
        if p.get("error"):
            print(f"not classified: {p['error']}", file=sys.stderr)
            return EXIT_FAILED
        print(p["label"])
        for name, prob in sorted((p.get("probs") or {}).items(), key=lambda kv: -kv[1]):
            print(f"  {name:<12} {prob:.3f}")
        if p.get("response"):
            print(f"response: {p['response']!r}")
        return 0
    return rc


def cmd_predictions(args) -> int:
    client = _client(args)
    if args.jsonl:
        text = client.predictions_jsonl(args.job)
        if args.jsonl == "-":
            sys.stdout.write(text)
        else:
            Path(args.jsonl).write_text(text)
            print(f"wrote {args.jsonl}")
        return 0
    got = client.predictions(args.job, offset=args.offset, limit=args.limit)
    for p in got["items"]:
        print(json.dumps(p, default=str))
    print(f"{len(got['items'])} of {got['total']}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    spec: dict[str, Any] = {"adapter_id": args.adapter, "format": args.format}
    if args.quant:
        spec["quant"] = args.quant
    apply_overrides(spec, args.overrides)
    client = _client(args)
    rc = _submit_and_follow(client, "export", spec, args)
    if rc == 0 and args.download and not args.no_wait:
        export_id = client.exports(args.adapter)[0]["id"]
        print(f"downloaded {client.download_export(export_id, args.download, extract=True)}", file=sys.stderr)
    return rc


def cmd_exports(args) -> int:
    client = _client(args)
    if args.action == "list":
        for e in client.exports(args.id):
            v = (e.get("metrics") or {}).get("verification") or {}
            print(json.dumps({"id": e["id"], "name": e["name"], "path": e["path"], "created_at": e["created_at"],
                              "agreement": v.get("agreement"), "n": v.get("n"),
                              "export_accuracy": v.get("export_accuracy"),
                              "adapter_accuracy": v.get("adapter_accuracy")}, default=str))
        return 0
    print(client.download_export(args.id, args.out, extract=not args.archive))
    return 0


def cmd_tokens(args) -> int:
    """Admin: `tokens create NAME [--admin]` (the token is printed once, to stdout only), `list`, `revoke`."""
    client = _client(args)
    if args.action == "list":
        for t in client.tokens():
            state = f"revoked {t['revoked_at'][:19]}" if t.get("revoked_at") else "live"
            print(f"{t['id']:>4}  {t['user']:<20} {t['role']:<7} {t['prefix']}...  {t['created_at'][:19]}  {state}")
        return 0
    if not args.name:
        raise SystemExit(f"newslora tokens {args.action}: give a user name" +
                         (" or a token id" if args.action == "revoke" else ""))
    if args.action == "create":
        t = client.create_token(args.name, admin=args.admin)
        print(f"token for {t['user']} ({t['role']}), shown this once:", file=sys.stderr)
        print(t["token"])
        return 0
    n = client.revoke_token(args.name)["revoked"]
    print(f"revoked {n} token(s)")
    return 0


def cmd_list_simple(args) -> int:
    client = _client(args)
    rows = client.datasets() if args.what == "datasets" else client.models()
    for r in rows:
        r = {k: v for k, v in r.items() if k not in ("meta", "spec")}
        print(json.dumps(r, default=str))
    return 0


def cmd_eval(args) -> int:
    client = _client(args)
    if args.action == "list":
        got = client.evaluations()
        for e in got["items"]:
            print(f"{e['id']:>4}  job {e['job_id']}  {e['name']}  {e['created_at'][:19]}  {e.get('report_path') or ''}")
        return 0
    if args.id is None:
        raise SystemExit(f"newslora eval {args.action}: give an evaluation id")
    ev = client.evaluation(args.id)
    if args.action == "show":
        from workers.evaluation.report import render_table  # lazy: matplotlib, only for `eval show` and `run`
        print(render_table(ev["document"]))
        return 0
    if args.action == "report":
        from workers.evaluation.report import write_report  # lazy: matplotlib, only for `eval report`
        out = Path(args.out or Path.cwd() / f"newslora-eval-{args.id}")
        history = ev["document"].get("loss_history")
        path = write_report(ev["document"], out, loss_history=history)
        print(f"wrote {path}")
        return 0
    raise SystemExit(f"unknown action {args.action}")


def cmd_run(args) -> int:
    spec = load_pipeline_config(args.config, args.overrides)  # every stage checked before anything starts
    client = _client(args)
    job = client.submit("pipeline", spec, idempotency_key=args.key)
    print(f"submitted pipeline job {job['id']} ({args.config}); watch it at "
          f"{client.base_url}/dashboard/jobs/{job['id']}", file=sys.stderr)
    if args.no_wait:
        print(job["id"])
        return 0
    job = watch(client, job["id"], timeout=args.timeout)
    if job["status"] != "succeeded":
        print(f"pipeline {job['id']} {job['status']}: {job.get('error') or ''}", file=sys.stderr)
        return EXIT_FAILED
    result = job.get("result") or {}
    if result.get("evaluation_id"):
        from workers.evaluation.report import render_table  # lazy: matplotlib, only for `eval show` and `run`
        ev = client.evaluation(result["evaluation_id"])
        print(render_table(ev["document"]))
        if ev.get("report_path"):
            print(f"report: {ev['report_path']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="newslora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-start", action="store_true", help="do not start the embedded API/worker")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)

    up = sub.add_parser("up", help="start the embedded API and worker")
    up.add_argument("--foreground", action="store_true")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the embedded API and worker").set_defaults(func=cmd_down)
    sub.add_parser("status", help="embedded processes").set_defaults(func=cmd_status)
    dbp = sub.add_parser("db", help="database maintenance")
    dbp.add_argument("action", choices=["upgrade"])
    dbp.set_defaults(func=cmd_db)

    def follow_opts(sp):
        sp.add_argument("--no-wait", action="store_true", help="print the job id and return")
        sp.add_argument("--timeout", type=float, default=None, help="stop waiting after N seconds")
        sp.add_argument("--key", default=None, help="idempotency key: the same key returns the same job")

    demo = sub.add_parser("demo", help="run a small job through the real queue")
    follow_opts(demo)
    demo.set_defaults(func=cmd_demo)

    sm = sub.add_parser("submit", help="submit any job kind with a JSON/YAML spec")
    sm.add_argument("kind")
    sm.add_argument("--spec", help="JSON, or @file.yaml")
    sm.add_argument("overrides", nargs="*", default=[], help="key=value")
    follow_opts(sm)
    sm.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list, show, cancel, wait for jobs")
    jobs.add_argument("action", choices=["list", "show", "cancel", "wait", "events"])
    jobs.add_argument("id", nargs="?", type=int)
    jobs.add_argument("--kind")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=30)
    jobs.add_argument("--offset", type=int, default=0)
    jobs.add_argument("--events", type=int, default=15, help="show: how many recent events")
    jobs.add_argument("--timeout", type=float, default=None)
    jobs.set_defaults(func=cmd_jobs)

    prep = sub.add_parser("prep", help="prepare a dataset (a file or a hub id) as a job")
    prep.add_argument("source", help="AG News CSV, JSONL/CSV/parquet with text,label, or a hub id")
    prep.add_argument("--test", help="the test split's source")
    prep.add_argument("--name", default="ag_news")
    prep.add_argument("--max-per-class", type=int)
    prep.add_argument("--tokenizer", help="model for token-length percentiles (e.g. smollm2-135m)")
    prep.add_argument("--skip-bad-rows", action="store_true")
    prep.add_argument("overrides", nargs="*", default=[], help="key=value (PrepSpec fields)")
    follow_opts(prep)
    prep.set_defaults(func=cmd_prep)

    tr = sub.add_parser("train", help="LoRA fine-tune on a prepared dataset")
    tr.add_argument("--dataset", type=int, required=True)
    tr.add_argument("--model", default="smollm2-135m")
    tr.add_argument("--backend", default="peft", choices=["peft", "torchtune"])
    tr.add_argument("overrides", nargs="*", default=[], help="key=value (TrainSpec fields)")
    follow_opts(tr)
    tr.set_defaults(func=cmd_train)

    cl = sub.add_parser("classify", help="classify a file (JSONL/CSV) or one --text")
    cl.add_argument("file", nargs="?")
    cl.add_argument("--text")
    cl.add_argument("--adapter", type=int)
    cl.add_argument("--model", default="smollm2-135m")
    cl.add_argument("--mode", default="score", choices=["score", "generate"])
    cl.add_argument("overrides", nargs="*", default=[], help="key=value (ClassifySpec fields)")
    follow_opts(cl)
    cl.set_defaults(func=cmd_classify)

    pr = sub.add_parser("predictions", help="a classify job's predictions")
    pr.add_argument("job", type=int)
    pr.add_argument("--jsonl", help="write all as JSONL to a file (- for stdout)")
    pr.add_argument("--offset", type=int, default=0)
    pr.add_argument("--limit", type=int, default=50)
    pr.set_defaults(func=cmd_predictions)

    ex = sub.add_parser("export", help="export an adapter: its PEFT folder, a merged checkpoint, or GGUF + Modelfile")
    ex.add_argument("adapter", type=int, help="adapter id (`newslora models list`)")
    ex.add_argument("--format", default="gguf", choices=["peft", "merged", "gguf"])
    ex.add_argument("--quant", choices=["f16", "q8_0"], help="gguf only (default f16)")
    ex.add_argument("--download", metavar="DIR", help="when it succeeds, download and unpack it into DIR")
    ex.add_argument("overrides", nargs="*", default=[], help="key=value (ExportSpec fields, e.g. verify_samples=100)")
    follow_opts(ex)
    ex.set_defaults(func=cmd_export)

    exs = sub.add_parser("exports", help="an adapter's exports; download one (tar.gz through the API)")
    exs.add_argument("action", choices=["list", "download"])
    exs.add_argument("id", type=int, help="list: the adapter id; download: the export id")
    exs.add_argument("--out", default=".", help="download: folder to write into")
    exs.add_argument("--archive", action="store_true", help="download: keep the tar.gz, do not unpack it")
    exs.set_defaults(func=cmd_exports)

    tk = sub.add_parser("tokens", help="API tokens (admin): create NAME [--admin] | list | revoke NAME_OR_ID")
    tk.add_argument("action", choices=["create", "list", "revoke"])
    tk.add_argument("name", nargs="?", help="create: the user; revoke: a user (all their tokens) or a token id")
    tk.add_argument("--admin", action="store_true", help="create: the new user is an admin")
    tk.set_defaults(func=cmd_tokens)

    for what in ("datasets", "models"):
        sp = sub.add_parser(what, help=f"list {what}")
        sp.add_argument("action", choices=["list"])
        sp.set_defaults(func=cmd_list_simple, what=what)

    ev = sub.add_parser("eval", help="stored evaluations")
    ev.add_argument("action", choices=["list", "show", "report"])
    ev.add_argument("id", nargs="?", type=int)
    ev.add_argument("--out", help="report: output folder")
    ev.set_defaults(func=cmd_eval)

    run = sub.add_parser("run", help="the main job from a preset in configs/")
    run.add_argument("config", help="e.g. configs/agnews-smollm2-quick.yaml")
    run.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. train.max_steps=20")
    follow_opts(run)
    run.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        return _print_usage_error(e)
    except ApiError as e:
        return _print_api_error(e, getattr(args, "kind", None) or {"run": "pipeline"}.get(args.command, args.command))
    except WaitTimeout as e:
        print(f"newslora: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("newslora: interrupted (jobs keep running; `newslora jobs list`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
