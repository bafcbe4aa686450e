"""The soak under faults (tests/reliability/soak.py) for two minutes, as CI runs it: three clients, a fault
about every 10 s (each of the five types two or three times), then every invariant over the whole history.

Slow (about five minutes with setup and drain on two cores) but part of the normal suite. The ten-minute
runs with eight clients are `python -m tests.reliability.soak` (docs/reliability.md).
"""
from __future__ import annotations

import json

import pytest

from tests.reliability.soak import SoakConfig, format_report, run_soak

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def test_two_minute_soak_under_faults_every_invariant_holds(tmp_path, tiny_model_dir):
    cfg = SoakConfig(out=tmp_path / "soak", minutes=2, clients=3, fault_every=10, seed=27, drain_s=300,
                     min_faults_per_type=2, disk_mb=256, model_dir=tiny_model_dir)
    report = run_soak(cfg)
    table = format_report(report)
    print(table)
    assert report["ok"], table
    # The run did what it says: work of every kind, and the faults met it.
    jobs = report["jobs"]
    for kind in ("classify", "classify (shard)", "prep", "train", "evaluate", "export"):
        assert sum(jobs.get(kind, {}).values()) > 0, (kind, json.dumps(jobs))
    assert report["items"]["stored"] > 0 and report["items"]["duplicates"] == 0 and report["items"]["lost"] == 0
    assert sum(report["faults"].values()) >= 10, report["faults"]
