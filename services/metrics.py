"""Prometheus metrics of the dkv services: ``dkv_`` names, base units (seconds, bytes), ``tier`` labels.

Each server owns a ``Metrics`` (its own registry, so several servers in one process, as in tests,
never mix) and serves it on ``metrics_port`` at ``/metrics``. Every server records RPC latency
by method and status code; the store exports its tiers' state at scrape time; prefill, decode and
the gateway count tokens and time what their users wait for.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The registry of one server and the RPC latency histogram every server has."""

    def __init__(self, service: str):
        self.service = service
        self.registry = CollectorRegistry()
        self.rpc_duration = Histogram(
            "dkv_rpc_duration_seconds",
            "Time to serve one RPC, from its start to its last message.",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_duration.labels(self.service, method, code).observe(seconds)

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, help, labels, registry=self.registry)

    def histogram(self, name: str, help: str, buckets, labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, help, labels, buckets=buckets, registry=self.registry)

    def gauge(self, name: str, help: str, read: Callable[[], float]) -> Gauge:
        """A gauge read at scrape time from ``read()``."""
        gauge = Gauge(name, help, registry=self.registry)
        gauge.set_function(read)
        return gauge

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP; returns the port (``port`` 0 picks a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class StoreCollector:
    """Exports a ``TieredStore``'s tiers and counters at scrape time, so they can never drift."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        stats = self.store.stats()
        used = GaugeMetricFamily("dkv_store_used_bytes", "Bytes of entries held, per tier.", labels=["tier"])
        capacity = GaugeMetricFamily("dkv_store_capacity_bytes", "Byte capacity, per tier.", labels=["tier"])
        entries = GaugeMetricFamily("dkv_store_entries", "Entries held, per tier.", labels=["tier"])
        healthy = GaugeMetricFamily(
            "dkv_store_tier_healthy", "1 when the tier answers, 0 while it is down.", labels=["tier"]
        )
        hits = CounterMetricFamily("dkv_store_hits", "Gets served, per tier that held the entry.", labels=["tier"])
        errors = CounterMetricFamily(
            "dkv_store_tier_errors",
            "Failed tier operations (a Redis error is tier=redis); the store carries on with the other tiers.",
            labels=["tier"],
        )
        for tier in stats.tiers:
            used.add_metric([tier.name], tier.used_bytes)
            capacity.add_metric([tier.name], tier.capacity_bytes)
            entries.add_metric([tier.name], tier.entries)
            healthy.add_metric([tier.name], 1 if tier.healthy else 0)
            hits.add_metric([tier.name], tier.hits)
            errors.add_metric([tier.name], tier.errors)
        yield from (used, capacity, entries, healthy, hits, errors)
        tenant_used = GaugeMetricFamily(
            "dkv_store_tenant_used_bytes", "Bytes of one tenant's entries, per tier.", labels=["tenant", "tier"]
        )
        tenant_entries = GaugeMetricFamily(
            "dkv_store_tenant_entries", "One tenant's entries, per tier.", labels=["tenant", "tier"]
        )
        quota = GaugeMetricFamily(
            "dkv_store_tenant_quota_bytes", "Bytes one tenant may hold, per tier (0: no quota).", labels=["tier"]
        )
        over_quota = CounterMetricFamily(
            "dkv_store_tenant_over_quota",
            "Puts refused because the tenant was at its quota (RESOURCE_EXHAUSTED).",
            labels=["tenant"],
        )
        for tier in stats.tiers:
            quota.add_metric([tier.name], tier.quota_bytes)
        for view in stats.tenants:
            for tier in view.tiers:
                tenant_used.add_metric([view.tenant, tier.name], tier.used_bytes)
                tenant_entries.add_metric([view.tenant, tier.name], tier.entries)
            over_quota.add_metric([view.tenant], view.over_quota)
        yield from (tenant_used, tenant_entries, quota, over_quota)
        for name, value, help in (
            ("misses", stats.misses, "Gets of an entry no tier holds."),
            ("evictions", stats.evictions, "Entries dropped from the last tier to make room."),
            ("demotions", stats.demotions, "Entries moved one tier down to make room."),
            ("promotions", stats.promotions, "Entries moved up to the fastest tier on a hit."),
            (
                "checksum_failures",
                stats.checksum_failures,
                "Entries whose bytes failed their checksum: served as a miss and deleted.",
            ),
            ("puts", stats.puts, "Entries stored."),
            ("rejected_puts", stats.rejected_puts, "Puts refused (invalid, too large, over quota, no room)."),
            (
                "lost",
                stats.lost,
                "Entries a tier lost behind the store's back (Redis eviction or flush), found by a read or an audit.",
            ),
        ):
            yield CounterMetricFamily(f"dkv_store_{name}", help, value=value)
