"""A short chaos soak (``make soak`` runs the long one): Redis and the store killed and restarted
under load; every answer is checked against the golden one, and none fails while only they are down."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]


def test_short_soak_gives_no_wrong_answer_and_recovers_from_every_fault(tmp_path):
    report_path = tmp_path / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dkv.loadtest.soak",
            "--duration",
            "40",
            "--interval",
            "10",
            "--faults",
            "redis,store",
            "--documents",
            "1",
            "--json",
            str(report_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["wrong_answers"] == 0 and report["correct"] > 0
    assert sum(report["faults_injected"].values()) >= 2
    assert report["faults_recovered"] == sum(report["faults_injected"].values()) and not report["unrecovered"]
    assert not {"none", "redis", "store"} & set(report["failed_during_fault"])  # the store is only a cache
