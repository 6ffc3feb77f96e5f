"""The end-of-run summary of the load test: what failed it, and the text printed (no locust import here)."""

from __future__ import annotations

TTFT = "ttft"  # method of the time-to-first-token rows


def problems(summary: dict) -> list[str]:
    """Why the run fails: failed calls, task exceptions, nothing done, a p99 over the bound."""
    out = []
    if summary["failures"]:
        out.append(f"{summary['failures']} failed calls")
    if summary["exceptions"]:
        out.append(f"{summary['exceptions']} task exceptions")
    if not summary["requests"]:
        out.append("no call completed")
    bound = summary["p99_bound_ms"]
    for r in summary["rows"]:
        if bound is not None and r["requests"] and r["p99_ms"] > bound:
            out.append(f"p99 of {r['name']} is {r['p99_ms']:.0f} ms > --p99-ms {bound:.0f}")
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_summary(summary: dict) -> str:
    lines = [
        f"dkv load test: scenario {summary['scenario']}, {summary['users']} users, "
        f"{summary['duration_s']:.0f} s, {summary['requests']} calls, {summary['rps']:.2f} calls/s, "
        f"{summary['failures']} failures",
        f"{'name':<16}{'calls':>8}{'fails':>7}{'rps':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'avg bytes':>11}",
    ]
    for r in summary["rows"]:
        lines.append(
            f"{r['name']:<16}{r['requests']:>8}{r['failures']:>7}{r['rps']:>8.2f}{r['p50_ms']:>9.0f}"
            f"{r['p95_ms']:>9.0f}{r['p99_ms']:>9.0f}{r['max_ms']:>9.0f}{r['avg_bytes']:>11.0f}"
        )
    if summary["key_space"]:
        k = summary["key_space"]
        lines.append(
            f"store users: Get hit rate {_pct(summary['get_hit_rate'])}, Lookup hit rate "
            f"{_pct(summary['lookup_hit_rate'])}; {k['keys']} keys x {k['mean_entry_bytes'] / 1e6:.2f} MB = "
            f"{k['keys'] * k['mean_entry_bytes'] / max(1, k['store_capacity_bytes']):.1f}x the store's "
            f"{k['store_capacity_bytes'] / 2**20:.0f} MiB; {summary['bytes_put'] / 1e6:.0f} MB put"
        )
    c = summary["generate_cache"]
    if c["hit"] + c["partial"] + c["miss"]:
        lines.append(
            f"generate: cache hit {c['hit']}, partial {c['partial']}, miss {c['miss']}; context tokens "
            f"found cached {_pct(c['prefix_tokens_reused'])}"
        )
    if summary["store"]:
        s = summary["store"]
        tiers = ", ".join(
            f"{t['name']} {t['entries']} entries {t['used_bytes'] / 2**20:.0f}/{t['capacity_bytes'] / 2**20:.0f} MiB"
            for t in s["tiers"]
        )
        lines.append(
            f"store: {s['puts']} puts, {s['evictions']} evictions, {s['demotions']} demotions, "
            f"{s['promotions']} promotions, {s['checksum_failures']} checksum failures; {tiers}"
        )
    return "\n".join(lines)
