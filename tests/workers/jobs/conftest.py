"""Helpers of the job-runner tests."""
from __future__ import annotations

import json
from pathlib import Path

from db import jobs as jobq
from db.session import session_scope

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
TOPICS = ["leaders met to discuss the ceasefire", "the striker scored twice in the final",
          "stocks fell as the central bank raised rates", "a new chip doubles battery life"]


def make_prep_job(tmp_path: Path) -> int:
    """A queued prep job of 40 short labelled news lines (a JSONL file under tmp_path), in the current store."""
    src = tmp_path / "news.jsonl"
    src.write_text("".join(json.dumps({"text": f"{TOPICS[i % 4]} (story {i})", "label": LABELS[i % 4]}) + "\n"
                           for i in range(40)))
    with session_scope() as s:
        return jobq.create_job(session=s, kind="prep", queue="cpu", spec={
            "train": {"path": str(src)}, "test": None, "validation_fraction": 0.25}).id
