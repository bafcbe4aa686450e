"""llama.cpp beside newslora: the same AG News articles, the same adapter, classified by both in one run.

    python bench/peer_llamacpp.py                    # trains the quick preset's adapter (~2 min idle), 400 articles
    python bench/peer_llamacpp.py --adapter ~/.newslora/adapters/job-3      # a trained adapter instead
    python bench/peer_llamacpp.py --articles 40 --generate-articles 8 --train-steps 10   # a check that it runs

Needs llama-cpp-python (`make install-llamacpp`: compiled once per machine, then cached).

What runs:
- the adapter: `--adapter DIR`, or trained here with configs/agnews-smollm2-quick.yaml as `newslora run` trains
  it (its prep: a balanced 1,200-article training subset, 100 test articles a class; its train section);
  the articles are that preset's balanced test sample (the first --articles of it), read by both engines.
- the base model: the same, with no adapter (for llama.cpp: newslora's export of a zero LoRA, so the same
  writer makes both files; merging a zero delta leaves every weight as it is).
- newslora: score mode as a classify job runs it (`classify_items`: length-sorted batches of --batch-size,
  the shared prefix's KV cached, every label's log-likelihood; dtype auto = bf16 where the CPU has it; the
  adapter served merged), through bench/infer_throughput.py's `newslora_score`.
- llama.cpp (llama-cpp-python), from newslora's own GGUF export (`export_adapter`, format gguf) in f16 and
  q8_0, through workers/export/llamacpp.py's `LlamaCppClassifier`: newslora's token ids, the prompt prefix
  evaluated once and its KV kept, one decode an article; the label read from the logits (`first-token`:
  the argmax over the labels' first tokens, or full labels where first tokens collide; `full-label`: each
  label's whole log-likelihood, as newslora's score mode); and its generate mode (`generate`): greedy
  decoding with the export's Modelfile stops and num_predict, what `ollama run` does, on the first
  --generate-articles, its answer read with newslora's exact-one-label rule.
- the exports are checked as an export job checks them (400 articles or --articles, in llama.cpp; each as a
  fresh job would, the adapter path's own labels computed again): `exports` holds how long that took.

Engines run in interleaved rounds (each round a slice of the articles through every engine, the order
reversed every other round) so that other work on a shared CPU slows them alike; model loading and
warm-up are not timed. llama.cpp's threads spin-wait for each other, so it loses far more than torch on
an oversubscribed CPU (2 cores at load ~6: one thread 5x faster than two): unless --threads is given, its
thread count is chosen by timing as the export check chooses it (`threads` says what was chosen). The
1-minute load average is recorded before every engine's slice (`load_1m`; it counts this bench's own threads,
~2 on 2 cores), and the cores' worth of CPU other processes used during it (`others_cores`: /proc/stat's busy
time less this process's own); a run is a headline only when the load was under 0.5 before it started and
no slice saw other processes use over 0.1 of a core (`idle`). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.infer_throughput import newslora_score  # noqa: E402
from core.context import LocalContext  # noqa: E402
from core.settings import get_settings  # noqa: E402

PRESET = REPO / "configs" / "agnews-smollm2-quick.yaml"
QUANTS = ("f16", "q8_0")
IDLE_LOAD = 0.5  # a 1-minute load average above this before the run: not a headline
IDLE_OTHERS = 0.1  # other processes using more than this many cores during any slice: not a headline


def prepare(tmp: Path, train_steps: int | None):
    """The quick preset's pipeline spec and its prepared dataset folder."""
    from api_client.pipeline_config import load_pipeline_config
    from core.specs.pipeline import PipelineSpec
    from workers.data.prep import prepare_dataset
    overrides = [f"data_dir={get_settings().shared_data / 'ag_news'}"]
    if train_steps:
        overrides.append(f"train.max_steps={train_steps}")
    pipe = PipelineSpec.model_validate(load_pipeline_config(PRESET, overrides))
    ds = tmp / "dataset"
    prepare_dataset(pipe.prep, ds, LocalContext(work_dir=tmp))
    return pipe, ds


def train(pipe, ds: Path, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The preset's adapter, trained as `newslora run` trains it; (its folder, what training reported)."""
    from core.specs.train import TrainSpec
    from workers.train import train_adapter
    t0 = time.perf_counter()
    result = train_adapter(TrainSpec.model_validate(pipe.train_spec(1)), ds, tmp / "run",
                           LocalContext(work_dir=tmp))
    return Path(result.adapter_dir), {"steps": result.steps, "seconds": round(time.perf_counter() - t0, 1),
                                      "val_accuracy": result.metrics.val_accuracy,
                                      "tokens_per_s": result.metrics.tokens_per_s}


def zero_adapter(adapter, base_dir: Path, out: Path) -> Path:
    """A LoRA of the adapter's modules with B = 0 and the adapter's newslora.json: exported, the base model."""
    from peft import LoraConfig, PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    cfg = PeftConfig.from_pretrained(adapter.path)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                                    init_lora_weights=True)).save_pretrained(out)  # B = 0: a zero delta
    adapter.meta.save(out)
    return out


def export_gguf(adapter, quant: str, ds: Path, out: Path, *, verify: bool, n_verify: int) -> dict[str, Any]:
    """newslora's GGUF export of `adapter`, as an export job makes it (checked in llama.cpp when `verify`)."""
    from core.specs.export import ExportSpec
    from workers.export import ExportCheckFailed, export_adapter
    from workers.export import verify as export_verify
    export_verify._REFERENCE.clear()  # each export checked as a fresh job checks it: the adapter's labels too
    spec = ExportSpec(adapter_id=adapter.adapter_id, format="gguf", quant=quant, verify=verify,
                      verify_samples=n_verify, gguf_loader="llama.cpp")
    t0 = time.perf_counter()
    try:
        result = export_adapter(spec, adapter, out, LocalContext(work_dir=out.parent), dataset_dir=ds)
        v, seconds = result["verification"], time.perf_counter() - t0
    except ExportCheckFailed as e:  # reported; the file is made again unchecked, so the engines still run
        v, seconds = e.verification, time.perf_counter() - t0
        result = export_adapter(spec.model_copy(update={"verify": False}), adapter, out,
                                LocalContext(work_dir=out.parent), dataset_dir=ds)
    gguf = next(Path(result["path"]).glob("*.gguf"))
    return {"path": gguf, "bytes": gguf.stat().st_size, "job_seconds": round(seconds, 1),
            "verification": None if v is None else {k: v[k] for k in (
                "reloaded_with", "n", "agreement", "min_agreement", "passed", "export_accuracy", "adapter_accuracy",
                "seconds", "reference_seconds", "export_seconds", "reference")}}


def modelfile_parameters(path: Path) -> dict[str, list[str]]:
    """The PARAMETER lines of an export's Modelfile, as Ollama reads them: name -> values (stop repeats)."""
    params: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r'PARAMETER (\w+) (?:"(.*)"|(\S+))', line.strip())
        if m:
            params.setdefault(m[1], []).append(m[2] if m[2] is not None else m[3])
    return params


def llamacpp_score(clf, items: list[dict]) -> dict:
    t0 = time.perf_counter()
    labels = clf.classify(items)
    seconds = time.perf_counter() - t0
    return {"n": len(items), "seconds": seconds, "labels": labels,
            "correct": sum(labels[str(it["id"])] == it["label"] for it in items)}


def llamacpp_generate(clf, items: list[dict], *, max_new_tokens: int, stop: list[str]) -> dict:
    from workers.modeling.generation import parse_label
    t0 = time.perf_counter()
    responses = clf.generate(items, max_new_tokens=max_new_tokens, stop=stop)
    seconds = time.perf_counter() - t0
    labels = {iid: parse_label(text, clf.codec.label_names) for iid, text in responses.items()}
    return {"n": len(items), "seconds": seconds, "labels": labels,
            "correct": sum(labels[str(it["id"])] == it["label"] for it in items),
            "examples": [responses[str(it["id"])] for it in items[:2]]}


def _busy_s() -> float:
    """CPU seconds every process on the machine has spent busy since boot (/proc/stat's first line)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_mark() -> tuple[float, float, float]:
    return time.perf_counter(), _busy_s(), time.process_time()


def others_cores_since(mark: tuple[float, float, float]) -> float:
    """Cores' worth of CPU that other processes used since `mark`: the machine's busy time less this process's
    own (torch's and llama.cpp's threads included). The load average cannot tell: it counts this bench's own
    threads (~2 on 2 cores while it runs)."""
    wall0, busy0, own0 = mark
    wall = time.perf_counter() - wall0
    return max(0.0, (_busy_s() - busy0) - (time.process_time() - own0)) / max(wall, 1e-9)


def total(parts: list[dict], loads: list[float], others: list[float],
          reference: dict[str, str | None] | None) -> dict:
    """One engine's figures over its slices; `reference`: newslora's labels, for the share that agree."""
    n, seconds, correct = (sum(p[k] for p in parts) for k in ("n", "seconds", "correct"))
    labels = {k: v for p in parts for k, v in p["labels"].items()}
    out = {"n": n, "seconds": round(seconds, 2), "items_per_s": round(n / seconds, 2),
           "accuracy": round(correct / n, 4), "load_1m": [round(x, 2) for x in loads],
           "others_cores": [round(x, 3) for x in others]}
    if reference is not None:
        out["labels_equal_newslora"] = round(sum(labels[i] == reference.get(i) for i in labels) / n, 4)
    if any(None in p["labels"].values() or "examples" in p for p in parts):
        out["answered_one_label"] = round(sum(v is not None for v in labels.values()) / n, 4)
        out["examples"] = parts[0].get("examples", [])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--articles", type=int, default=400, help="test articles (the preset's balanced sample)")
    ap.add_argument("--generate-articles", type=int, default=100,
                    help="of those, the first N through llama.cpp's generate mode (0: skip it)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: chosen by timing, "
                                                              "as the export check chooses them)")
    ap.add_argument("--adapter", type=Path, default=None, help="a trained adapter folder (PEFT files + "
                                                               "newslora.json); default: train the quick preset's")
    ap.add_argument("--train-steps", type=int, default=None, help="train.max_steps when training here "
                                                                  "(default: the preset's one epoch)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--batch-size", type=int, default=None, help="newslora score-mode batch (default: the preset's)")
    ap.add_argument("--dtype", default="auto", help="newslora dtype (auto = bf16 where the CPU has it)")
    ap.add_argument("--label-modes", default="first-token",
                    help="llama.cpp's label readings, comma-separated: first-token, full-label")
    ap.add_argument("--skip-base", action="store_true", help="the adapter only")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep the dataset, the trained adapter "
                    "(WORK_DIR/run/adapter, for --adapter next time) and the exports here (default: a temporary "
                    "folder); it must not hold an earlier run's")
    ap.add_argument("--no-verify", action="store_true", help="export without the export job's llama.cpp check")
    args = ap.parse_args()
    modes = [m.strip() for m in args.label_modes.split(",") if m.strip()]

    load_before = [round(x, 2) for x in os.getloadavg()]
    print(f"load average before (1, 5, 15 min): {load_before}", file=sys.stderr)
    if load_before[0] > IDLE_LOAD:
        print(f"the machine is not idle (1-min load {load_before[0]} > {IDLE_LOAD}): do not quote this run as a "
              f"headline", file=sys.stderr)
    from workers.export.llamacpp import LlamaCppClassifier, llamacpp_version
    from workers.inference.classify import AdapterRef, get_engine, load_items
    from core.specs.classify import ClassifySpec
    from workers.modeling.registry import resolve_model
    if llamacpp_version() is None:
        sys.exit("llama-cpp-python is not installed: make install-llamacpp")

    with tempfile.TemporaryDirectory(prefix="newslora-peer-") as tmp_name:
        tmp = Path(tmp_name)
        if args.work_dir is not None:  # kept: the trained adapter (run/adapter) and the exports
            tmp = args.work_dir
            tmp.mkdir(parents=True, exist_ok=True)
        pipe, ds = prepare(tmp, args.train_steps)
        items = [{k: it[k] for k in ("id", "text", "label")}  # what a classify job's inline items hold
                 for it in load_items(ClassifySpec(dataset_id=1, split="test", limit=args.articles), ds)[0]]
        training = None
        if args.adapter is None:
            print("training the quick preset's adapter ...", file=sys.stderr)
            adapter_dir, training = train(pipe, ds, tmp)
        else:
            adapter_dir = args.adapter
        adapter = AdapterRef(1, adapter_dir)
        meta = adapter.meta
        base_dir = resolve_model(meta.base_model)
        models = {"adapter": adapter}
        if not args.skip_base:
            models["base"] = AdapterRef(2, zero_adapter(adapter, base_dir, tmp / "zero-adapter"))
        exports: dict[str, dict[str, Any]] = {}
        for which, ref in models.items():
            for quant in QUANTS:
                print(f"exporting the {which} as GGUF {quant} ...", file=sys.stderr)
                exports[f"{which}_{quant}"] = export_gguf(ref, quant, ds, tmp / f"export-{which}-{quant}",
                                                          verify=which == "adapter" and not args.no_verify,
                                                          n_verify=len(items))

        # the engines, loaded and warmed up (not timed)
        batch_size = args.batch_size or pipe.classify.batch_size
        prompt = {"label_names": list(meta.label_names), "instruction": meta.instruction, "template": meta.template}
        engine = get_engine(str(base_dir), dtype=args.dtype)
        clfs: dict[str, Any] = {}
        runs: dict[str, dict[str, Any]] = {}  # run name -> (what, which model, how)
        for which in models:
            runs[f"{which}/newslora_score"] = {"engine": "newslora", "model": which}
            for quant in QUANTS:
                clf = clfs[f"{which}_{quant}"] = LlamaCppClassifier(
                    exports[f"{which}_{quant}"]["path"], base_dir, threads=args.threads, **prompt,
                    mode="first-token")
                clf.classify(items[:2])
                for mode in modes:
                    runs[f"{which}/llamacpp_{quant}_{mode}"] = {"engine": "llamacpp", "model": which,
                                                               "quant": quant, "mode": mode}
                if args.generate_articles:
                    runs[f"{which}/llamacpp_{quant}_generate"] = {"engine": "llamacpp", "model": which,
                                                                  "quant": quant, "mode": "generate"}
        for which, ref in models.items():
            newslora_score(engine, items[:8], adapter=ref if which == "adapter" else None, batch_size=batch_size,
                           **prompt)  # the adapter's merge and the prefix's KV, untimed
        # generate mode as `ollama run` runs the export: the Modelfile's stops, num_predict and temperature
        modelfile = modelfile_parameters(exports[f"adapter_{QUANTS[0]}"]["path"].parent / "Modelfile")
        stop, num_predict = modelfile.get("stop", []), int(modelfile.get("num_predict", ["16"])[0])
        if float(modelfile.get("temperature", ["0"])[0]) != 0:
            sys.exit(f"the export's Modelfile sets temperature {modelfile['temperature'][0]}: this bench times "
                     f"greedy generation only")
        n_gen = min(args.generate_articles, len(items))

        parts: dict[str, list[dict]] = {name: [] for name in runs}
        loads: dict[str, list[float]] = {name: [] for name in runs}
        others: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.rounds):
            lo, hi = r * len(items) // args.rounds, (r + 1) * len(items) // args.rounds
            glo, ghi = r * n_gen // args.rounds, (r + 1) * n_gen // args.rounds
            names = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in names:
                run = runs[name]
                if run["engine"] == "llamacpp" and run["mode"] == "generate" and ghi <= glo:
                    continue
                loads[name].append(os.getloadavg()[0])
                mark = cpu_mark()
                if run["engine"] == "newslora":
                    parts[name].append(newslora_score(engine, items[lo:hi], batch_size=batch_size, **prompt,
                                                      adapter=adapter if run["model"] == "adapter" else None))
                else:
                    clf = clfs[f"{run['model']}_{run['quant']}"]
                    if run["mode"] == "generate":
                        parts[name].append(llamacpp_generate(clf, items[glo:ghi], stop=stop,
                                                             max_new_tokens=num_predict))
                    else:
                        clf.use_mode(run["mode"])
                        run["reading"] = clf.mode  # first tokens that collide are read as full labels
                        parts[name].append(llamacpp_score(clf, items[lo:hi]))
                others[name].append(others_cores_since(mark))
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
        for name, run in runs.items():
            if run["engine"] == "llamacpp":  # with --threads unset, every choice of this GGUF's classifier
                run["threads"] = clfs[f"{run['model']}_{run['quant']}"].threads_used()
        for clf in clfs.values():
            clf.close()

    results: dict[str, dict[str, Any]] = {}
    for which in models:
        own = {k: v for p in parts[f"{which}/newslora_score"] for k, v in p["labels"].items()}
        res = {name.split("/", 1)[1]: total(parts[name], loads[name], others[name],
                                             None if runs[name]["engine"] == "newslora" else own) | {k: runs[name][k] for k in ("reading", "threads")
                                                          if k in runs[name]}
               for name in runs if runs[name]["model"] == which}
        ours = res["newslora_score"]
        peers = {k: v for k, v in res.items() if k.startswith("llamacpp_")}
        fastest = max((k for k in peers), key=lambda k: peers[k]["items_per_s"])
        res["newslora_vs_llamacpp"] = {k: {"items_per_s_ratio": round(ours["items_per_s"] / v["items_per_s"], 2),
                                           "accuracy_points": round(100 * (ours["accuracy"] - v["accuracy"]), 2)}
                                       for k, v in peers.items()}
        res["llamacpp_fastest"] = fastest
        res["newslora_vs_llamacpp_fastest"] = res["newslora_vs_llamacpp"][fastest]["items_per_s_ratio"]
        results[which] = res

    load_after = [round(x, 2) for x in os.getloadavg()]
    print(f"load average after (1, 5, 15 min): {load_after}", file=sys.stderr)
    all_others = [x for v in others.values() for x in v]
    print(json.dumps({
        "model": meta.base_model, "articles": len(items), "generate_articles": n_gen, "rounds": args.rounds,
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "llamacpp_threads": args.threads or "chosen by timing",
        "llama_cpp_python": llamacpp_version(), "newslora_dtype": str(engine.torch_dtype).replace("torch.", ""),
        "newslora_batch_size": batch_size, "label_modes": modes,
        "generate": {"stop": stop, "num_predict": num_predict, "temperature": 0, "from": "the export's Modelfile"},
        "adapter": str(args.adapter) if args.adapter else "trained here: " + PRESET.name, "training": training,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "others_cores_max": round(max(all_others), 3),
        "idle": load_before[0] <= IDLE_LOAD and max(all_others) <= IDLE_OTHERS,
        "exports": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in exports.items()},
        **results,
    }, indent=2))


if __name__ == "__main__":
    main()
