"""A Redis Cluster master killed under load (``python -m dkv.loadtest.failover`` runs a longer one):
its replica takes its slots over; reads miss only while the slots move, never return wrong bytes."""

from __future__ import annotations

import pytest

from dkv.loadtest import failover

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(180)]


def test_a_master_killed_under_load_costs_misses_of_its_slots_while_they_move_never_wrong_bytes():
    report = failover.run(before_s=2.0, after_s=5.0)
    assert report.written_before_kill >= 50 and report.entries_written > report.written_before_kill
    assert report.wrong_bytes == 0 and report.corrupt == 0
    assert report.misses_before_kill == 0 and report.misses_after_failover == 0
    assert report.misses_during_failover > 0  # the killed master's slots were read while they moved ...
    assert report.misses_during_failover_on_other_masters == 0  # ... and only those slots missed
    assert report.recovery_s < 20  # cluster-node-timeout 1 s: a replica takes over in a few seconds
    # written before the kill: read back after it, but for what Redis had not yet replicated
    assert report.read_back_after_failover + report.lost_in_failover == report.written_before_kill
    assert report.lost_in_failover <= report.written_before_kill // 100
    assert report.ok
