"""examples/openai_sdk.py runs end to end against the embedded default's API (single-user, loopback, no
token: what `make demo` leaves running), here with the tiny seeded model and small sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_openai_sdk_example_runs_the_whole_flow(stack_factory, tiny_model_dir, ag_news_dir):
    st = stack_factory(NEWSLORA_MODEL_ROOTS=json.dumps([str(Path(tiny_model_dir).parent)]))
    assert "NEWSLORA_API_TOKEN" not in st.env and "DATABASE_URL" not in st.env
    st.start_api()
    st.start_worker()
    r = subprocess.run([sys.executable, str(REPO / "examples" / "openai_sdk.py"), "--base-url", f"{st.url}/v1",
                        "--data", str(ag_news_dir), "--model", str(tiny_model_dir), "--train", "32", "--valid", "8",
                        "--batch-size", "8", "--batch", "20"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={k: v for k, v in st.env.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "fine-tuned model: ft:tiny-llama:newslora:agnews:" in out
    assert "checkpoint step 4" in out and "20 answers" in out and "chat completion: " in out
