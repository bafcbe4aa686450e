"""The whole OpenAI-compatible flow against a running newslora API, with the official `openai` package only.

    make demo                          # leaves the embedded API on http://127.0.0.1:8765 (single-user, loopback)
    .venv/bin/python examples/openai_sdk.py

1. upload a chat-format training file and a validation file (AG News articles, their labels as answers);
2. create a fine-tuning job and follow its events until it succeeds; list its checkpoints;
3. find the fine-tuned model in `models.list()`;
4. upload a batch of chat requests for it, restricted to the labels (`guided_choice`), poll it while the
   request counts rise, read the output file: a label and its log-probability for every `custom_id`;
5. one synchronous chat completion with the label probabilities (`logprobs`, `top_logprobs`).

Against a shared API: `--base-url http://host:8765/v1` and `OPENAI_API_KEY` (or `NEWSLORA_API_TOKEN`) set to
a newslora token. The sizes are small so that it runs in a few minutes on a CPU; raise them at will.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path

from openai import OpenAI

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SYSTEM = "Classify the news article as World, Sports, Business or Sci/Tech. Answer with the label only."


def ag_news(data: Path, split: str, n: int) -> list[tuple[str, str]]:
    """`n` (article, label) pairs, balanced over the labels: train.jsonl (text, label 0-3) or the original
    test.csv (class 1-4, title, description)."""
    per = {lab: [] for lab in LABELS}
    if split == "train":
        rows = ((json.loads(line)["text"], LABELS[int(json.loads(line)["label"])])
                for line in (data / "train.jsonl").open(encoding="utf-8"))
    else:
        rows = ((f"{title} {desc}", LABELS[int(cls) - 1])
                for cls, title, desc in csv.reader((data / "test.csv").open(encoding="utf-8")))
    for text, label in rows:
        if len(per[label]) < n // len(LABELS):
            per[label].append(text)
        if all(len(v) == n // len(LABELS) for v in per.values()):
            break
    return [(per[lab][i], lab) for i in range(n // len(LABELS)) for lab in LABELS]


def chat_file(pairs: list[tuple[str, str]]) -> io.BytesIO:
    lines = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                           {"role": "assistant", "content": label}]} for text, label in pairs]
    return io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())


def batch_file(model: str, pairs: list[tuple[str, str]]) -> io.BytesIO:
    lines = [{"custom_id": f"article-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": text}],
                       "guided_choice": LABELS, "logprobs": True, "top_logprobs": len(LABELS)}}
             for i, (text, _) in enumerate(pairs)]
    return io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())


def fine_tune(client: OpenAI, args) -> str:
    train = client.files.create(file=("train.jsonl", chat_file(ag_news(args.data, "train", args.train))),
                                purpose="fine-tune")
    valid = client.files.create(file=("valid.jsonl", chat_file(ag_news(args.data, "test", args.valid))),
                                purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=args.model, training_file=train.id, validation_file=valid.id, suffix="agnews", seed=args.seed,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": args.epochs,
                                                                         "batch_size": args.batch_size}}},
        extra_headers={"Idempotency-Key": f"example-ft-{train.id}"})
    print(f"fine-tuning job {job.id}: {job.status}")
    seen: set[str] = set()
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=50).data):
            if e.id not in seen:
                seen.add(e.id)
                data = f"  {json.dumps(e.data)}" if e.type == "metrics" and e.data else ""
                print(f"  [{e.level}] {e.message}{data}")
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(2)
    if job.status != "succeeded":
        sys.exit(f"fine-tuning job {job.id} {job.status}: {job.error}")
    for c in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        print(f"  checkpoint step {c.step_number}: {c.metrics.to_dict()}")
    return job.fine_tuned_model


def run_batch(client: OpenAI, model: str, args) -> None:
    pairs = ag_news(args.data, "test", args.batch)
    f = client.files.create(file=("batch.jsonl", batch_file(model, pairs)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(1)
        batch = client.batches.retrieve(batch.id)
        rc = batch.request_counts
        print(f"  batch {batch.id}: {batch.status} {rc.completed}/{rc.total} answered, {rc.failed} failed")
    if batch.status != "completed":
        sys.exit(f"batch {batch.id} {batch.status}: {batch.errors}")
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    gold = {f"article-{i}": label for i, (_, label) in enumerate(pairs)}
    right = 0
    for line in out:
        choice = line["response"]["body"]["choices"][0]
        right += choice["message"]["content"] == gold[line["custom_id"]]
    first = out[0]["response"]["body"]["choices"][0]
    p = math.exp(first["logprobs"]["content"][0]["logprob"])
    print(f"  {len(out)} answers, {right / len(out):.1%} correct; {out[0]['custom_id']} -> "
          f"{first['message']['content']} (p={p:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8765/v1"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/ag_news")
    ap.add_argument("--model", default="smollm2-135m", help="a base model preset, or a checkpoint folder")
    ap.add_argument("--train", type=int, default=400, help="training articles (balanced over the labels)")
    ap.add_argument("--valid", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=200, help="articles in the batch")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    # The key: a newslora token; the embedded API on loopback without tokens ignores it (single-user mode).
    key = os.environ.get("OPENAI_API_KEY") or os.environ.get("NEWSLORA_API_TOKEN") or "single-user"
    client = OpenAI(base_url=args.base_url, api_key=key)

    model = fine_tune(client, args)
    print(f"fine-tuned model: {model}")
    assert model in {m.id for m in client.models.list()}
    run_batch(client, model, args)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": "Shares rose after the bank's quarterly profit doubled."}],
        logprobs=True, top_logprobs=len(LABELS), extra_body={"guided_choice": LABELS})
    top = {t.token: round(math.exp(t.logprob), 3) for t in r.choices[0].logprobs.content[0].top_logprobs}
    print(f"chat completion: {r.choices[0].message.content}  {top}")


if __name__ == "__main__":
    main()
