"""The `newslora` CLI as a user runs it, on the embedded default (SQLite + embedded broker, no services)."""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.conftest import AG_NEWS_DIR, embedded_env, free_port, newslora_cli


@pytest.fixture
def cli_env(tmp_path):
    env = embedded_env(tmp_path / "home")
    yield env
    newslora(env, "down", timeout=60)


newslora = newslora_cli


def test_demo_starts_the_embedded_stack_and_a_second_terminal_sees_and_cancels(cli_env):
    r = newslora(cli_env, "demo")
    assert r.returncode == 0, r.stderr
    assert '"steps": 20' in r.stdout
    # "A second terminal": another process lists the job and cancels a long one started elsewhere.
    r = newslora(cli_env, "submit", "noop", "--spec", '{"steps": 500, "sleep_s": 0.05}', "--no-wait")
    assert r.returncode == 0, r.stderr
    long_id = int(r.stdout.strip())
    listed = newslora(cli_env, "jobs", "list")
    assert listed.returncode == 0 and "noop" in listed.stdout and "2 of 2" in listed.stdout
    deadline = time.monotonic() + 60
    while "running" not in newslora(cli_env, "jobs", "show", str(long_id)).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = newslora(cli_env, "jobs", "cancel", str(long_id))
    assert r.returncode == 0 and "running" in r.stdout
    r = newslora(cli_env, "jobs", "wait", str(long_id), "--timeout", "60")
    assert r.returncode == 1 and "cancelled" in r.stdout
    # Cancel of a finished job: a clear error and a non-zero exit.
    r = newslora(cli_env, "jobs", "cancel", str(long_id))
    assert r.returncode == 3 and "already cancelled" in r.stderr and "409" in r.stderr
    st = json.loads(newslora(cli_env, "status").stdout)
    assert st["api_up"] and st["processes"]["worker"]


def test_bad_input_exits_non_zero_with_a_clear_message(cli_env):
    assert newslora(cli_env, "up").returncode == 0
    r = newslora(cli_env, "jobs", "show", "4242")
    assert r.returncode == 3 and "no job with id 4242" in r.stderr
    r = newslora(cli_env, "submit", "bake")
    assert r.returncode == 3 and "unknown job kind" in r.stderr
    r = newslora(cli_env, "submit", "noop", "steps=-3")
    assert r.returncode == 3 and "greater than or equal to 0" in r.stderr
    r = newslora(cli_env, "submit", "noop", "--spec", "{not json")
    assert r.returncode != 0 and "not JSON" in r.stderr
    r = newslora(cli_env, "--no-start", "jobs", "list")
    assert r.returncode == 0  # the embedded API is up: --no-start just reuses it


def test_unreachable_api_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(NEWSLORA_HOME=str(tmp_path / "h"), NEWSLORA_API_URL=f"http://127.0.0.1:{free_port()}")
    r = newslora(env, "jobs", "list")
    assert r.returncode == 3 and "unreachable" in r.stderr


def test_two_homes_on_one_port_is_a_clear_error(cli_env, tmp_path):
    assert newslora(cli_env, "up").returncode == 0
    other = dict(cli_env, NEWSLORA_HOME=str(tmp_path / "other-home"))
    r = newslora(other, "jobs", "list")
    assert r.returncode == 3 and "serves NEWSLORA_HOME" in r.stderr


def test_classify_one_text_prints_label_and_probabilities(cli_env, tiny_model_dir):
    r = newslora(cli_env, "classify", "--model", str(tiny_model_dir), "--text", "Stocks rallied as the Fed held rates",
                 "dtype=fp32", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    labels = {"World", "Sports", "Business", "Sci/Tech"}
    assert lines[0] in labels
    probs = {ln.split()[0]: float(ln.split()[1]) for ln in lines[1:5]}
    assert set(probs) == labels and abs(sum(probs.values()) - 1) < 0.01
    r = newslora(cli_env, "classify", "--model", str(tiny_model_dir), "--text", "   ", "dtype=fp32", timeout=300)
    assert r.returncode != 0 and "empty" in r.stderr.lower()


def test_run_refuses_a_bad_stage_setting_at_once(cli_env):
    """Nothing is started or submitted: the stage specs are checked first (they used to hang at 0%)."""
    quick = ["run", "configs/agnews-smollm2-quick.yaml", f"data_dir={AG_NEWS_DIR}"]
    t0 = time.monotonic()
    r = newslora(cli_env, *quick, "train.lora.rank=-5")
    assert time.monotonic() - t0 < 5
    assert (r.returncode, r.stderr) == (2, "newslora: train.lora.rank: Input should be greater than or equal to 1\n")
    r = newslora(cli_env, *quick, "train.lerning_rate=1e-4")
    assert (r.returncode, r.stderr) == (
        2, "newslora: unknown key train.lerning_rate; did you mean train.learning_rate?\n")
    assert not json.loads(newslora(cli_env, "status").stdout)["api_up"]


def test_overrides_go_anywhere_among_the_options():
    from api_client.cli import build_parser
    args = build_parser().parse_args(["prep", "news.csv", "--name", "x", "seed=1", "--test", "t.csv", "on_bad_rows=skip"])
    assert (args.source, args.name, args.test, args.overrides) == ("news.csv", "x", "t.csv", ["seed=1", "on_bad_rows=skip"])
    args = build_parser().parse_args(["run", "c.yaml", "train.max_steps=3", "--no-wait", "eval_limit=4"])
    assert (args.config, args.no_wait, args.overrides) == ("c.yaml", True, ["train.max_steps=3", "eval_limit=4"])
    args = build_parser().parse_args(["classify", "--text", "Stocks fell", "--adapter", "2", "dtype=fp32"])
    assert (args.text, args.adapter) == ("Stocks fell", 2) and "dtype=fp32" in [args.file, *args.overrides]


def test_prep_of_a_csv_with_its_own_labels_and_clear_errors(cli_env, tmp_path):
    topics = ["Weather", "Art", "Biology", "Chess", "Dance", "Economy", "Film", "Gardening", "History", "Islands",
              "Jazz", "Knitting", "Law", "Music", "Nutrition"]
    f = tmp_path / "topics.csv"
    f.write_text("text,label\n" + "".join(f"Story {i} on {t},{t}\n" for i in range(3) for t in topics))
    # A key at the wrong level: refused before anything starts, with the nested key to use.
    r = newslora(cli_env, "prep", str(f), "text_columns=[body]")
    assert (r.returncode, r.stderr) == (
        2, "newslora: unknown key text_columns; did you mean train.text_columns or test.text_columns or validation.text_columns?\n")
    # Overrides after options; 15 string labels, no label_names: taken from the data, sorted.
    r = newslora(cli_env, "prep", str(f), "--name", "topics", "validation_fraction=0", "--timeout", "120",
                 timeout=180)
    assert r.returncode == 0, r.stderr
    job_id = r.stderr.split("submitted prep job ")[1].split()[0]
    events = [json.loads(line) for line in newslora(cli_env, "jobs", "events", job_id).stdout.splitlines()]
    found = next(e for e in events if "label_names not given" in e["message"])
    assert found["metrics"]["label_names"] == sorted(topics)
    assert "using the 15 labels found in the data, sorted: Art, Biology, Chess" in found["message"]
    shown = newslora(cli_env, "jobs", "show", job_id).stdout
    assert '"label_source": "data"' in shown and '"Weather": 14' in shown  # meta.json's label_map
    # A bad value comes back from the API as `field: message`, not as JSON.
    r = newslora(cli_env, "prep", str(f), "--name", "topics", "validation_fraction=2")
    assert (r.returncode, r.stderr) == (3, "newslora: validation_fraction: Input should be less than 1 (HTTP 422)\n")
