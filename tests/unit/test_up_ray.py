"""dkv up --ray ADDRESS: what it refuses before its actors would fail to reach the store."""

from __future__ import annotations

import pytest

from dkv.services.settings import SettingsError
from dkv.services.up import check_ray_reachable


def test_a_loopback_store_is_refused_when_ray_nodes_run_on_other_machines():
    with pytest.raises(SettingsError, match=r"10\.0\.0\.7.*--host 10\.0\.0\.5"):
        check_ray_reachable("127.0.0.1", "10.0.0.5", ["10.0.0.5", "10.0.0.7"])
    with pytest.raises(SettingsError, match="localhost"):
        check_ray_reachable("localhost", "10.0.0.5", ["10.0.0.7"])
    # every node on this machine (by its address or a loopback one), or a store every node can reach: fine
    check_ray_reachable("127.0.0.1", "10.0.0.5", ["10.0.0.5", "127.0.0.1"])
    check_ray_reachable("10.0.0.5", "10.0.0.5", ["10.0.0.5", "10.0.0.7"])
    with pytest.raises(SettingsError, match="0.0.0.0"):  # the actors would be given 0.0.0.0:port
        check_ray_reachable("0.0.0.0", "10.0.0.5", ["10.0.0.7"])
    check_ray_reachable("store.example", "10.0.0.5", ["10.0.0.7"])
    check_ray_reachable("[::1]", "10.0.0.5", ["::1"])
