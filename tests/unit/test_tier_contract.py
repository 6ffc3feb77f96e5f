"""The StorageTier contract: every tier (device memory, host memory, Redis, Redis Cluster) passes this
one suite.

The device tier runs here as ``MemoryTier(device="cpu")``, the same code a GPU host runs on cuda.
"""

from __future__ import annotations

import os

import pytest
import torch

from dkv.kvstore import codec
from dkv.kvstore.entry import EntryKey
from dkv.kvstore.memory_tier import MemoryTier
from dkv.kvstore.tier import StorageTier
from dkv.testing import synthetic_entry

CAPACITY = 1 << 30
MiB = 1 << 20


def _make_tier(kind: str, request) -> StorageTier:
    if kind == "device":
        return MemoryTier("device", CAPACITY, device="cpu")
    if kind == "cpu":
        return MemoryTier("cpu", CAPACITY, device="cpu", pin=True)
    if kind == "redis":
        from dkv.kvstore.redis_tier import RedisTier

        return RedisTier("redis", CAPACITY, request.getfixturevalue("redis_url"))
    if kind == "redis-cluster":
        from dkv.kvstore.redis_tier import RedisTier

        return RedisTier("redis", CAPACITY, request.getfixturevalue("redis_cluster_url"), cluster=True)
    raise AssertionError(kind)


@pytest.fixture(
    params=[
        "device",
        "cpu",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("redis-cluster", marks=pytest.mark.redis),
    ]
)
def tier(request):
    t = _make_tier(request.param, request)
    try:
        yield t
    finally:
        t.close()


def key(i: int) -> EntryKey:
    return EntryKey("t", "model", "recipe", f"h{i}")


def entry_frames(seed: int = 0, **kw) -> list[bytes]:
    return codec.encode(synthetic_entry(seed=seed, **kw))


def as_bytes(frames) -> list[bytes]:
    return [bytes(f) for f in frames]


def nbytes(frames) -> int:
    return sum(len(f) for f in frames)


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_single_frame(tier):
    frames = [os.urandom(1000)]
    tier.put(key(0), frames)
    assert as_bytes(tier.get(key(0))) == frames


def test_round_trip_codec_entry_decodes(tier):
    entry = synthetic_entry(seq_len=300, num_layers=3, seed=7)
    frames = codec.encode(entry, max_frame_bytes=16 * 1024)
    assert len(frames) > 3  # header plus several data frames
    tier.put(key(1), frames)
    got = tier.get(key(1))
    assert as_bytes(got) == frames
    back = codec.decode(as_bytes(got))
    assert back.key == entry.key
    assert torch.equal(back.layers[2].keys, entry.layers[2].keys)


def test_round_trip_many_frames(tier):
    frames = [os.urandom(n) for n in (1, 17, 4096, 65536, 100_003, 1 << 20)] * 5
    tier.put(key(2), frames)
    got = tier.get(key(2))
    assert len(got) == len(frames)
    assert as_bytes(got) == frames


def test_round_trip_frames_of_exactly_4_mib(tier):
    frames = [os.urandom(4 * MiB) for _ in range(3)]
    tier.put(key(3), frames)
    got = tier.get(key(3))
    assert [len(f) for f in got] == [4 * MiB] * 3
    assert as_bytes(got) == frames
    assert tier.used_bytes() == 12 * MiB


def test_put_accepts_memoryviews(tier):
    frames = entry_frames(seed=3)
    tier.put(key(4), [memoryview(f) for f in frames])
    assert as_bytes(tier.get(key(4))) == frames
    assert tier.used_bytes() == nbytes(frames)


# -- misses, contains, remove --------------------------------------------------------------------


def test_get_missing_is_none(tier):
    assert tier.get(key(99)) is None
    assert tier.header_frame(key(99)) is None
    tier.put(key(1), [b"x" * 10])
    assert tier.get(key(99)) is None


def test_contains_before_and_after(tier):
    assert not tier.contains(key(5))
    tier.put(key(5), entry_frames(seed=5))
    assert tier.contains(key(5))
    assert not tier.contains(key(6))
    tier.remove(key(5))
    assert not tier.contains(key(5))


def test_remove_is_idempotent_and_frees_bytes_exactly(tier):
    a, b = entry_frames(seed=1), [os.urandom(12345), os.urandom(777)]
    tier.put(key(1), a)
    tier.put(key(2), b)
    assert tier.used_bytes() == nbytes(a) + nbytes(b)
    assert tier.remove(key(1)) is True
    assert tier.used_bytes() == nbytes(b)
    assert tier.get(key(1)) is None
    assert tier.remove(key(1)) is False
    assert tier.used_bytes() == nbytes(b)
    assert tier.remove(key(2)) is True
    assert tier.used_bytes() == 0
    assert tier.remove(key(42)) is False
    assert tier.used_bytes() == 0


# -- accounting -------------------------------------------------------------------------------------


def test_used_bytes_is_sum_of_frame_lengths(tier):
    assert tier.used_bytes() == 0
    expected = 0
    for i in range(5):
        frames = entry_frames(seed=i, seq_len=64 * (i + 1)) + [os.urandom(1000 * i + 1)]
        tier.put(key(i), frames)
        expected += nbytes(frames)
        assert tier.used_bytes() == expected


def test_put_same_key_replaces_and_counts_once(tier):
    first = [os.urandom(5000), os.urandom(6000)]
    second = [os.urandom(300), os.urandom(400), os.urandom(500)]
    other = [os.urandom(77)]
    tier.put(key(9), other)
    tier.put(key(1), first)
    assert tier.used_bytes() == nbytes(first) + nbytes(other)
    tier.put(key(1), second)
    assert as_bytes(tier.get(key(1))) == second
    assert tier.used_bytes() == nbytes(second) + nbytes(other)
    tier.put(key(1), second)
    assert tier.used_bytes() == nbytes(second) + nbytes(other)
    assert sorted(tier.keys()) == [key(1), key(9)]
    assert tier.remove(key(1)) is True
    assert tier.used_bytes() == nbytes(other)


def test_keys_lists_exactly_what_is_stored(tier):
    assert tier.keys() == []
    for i in range(6):
        tier.put(key(i), [os.urandom(100 + i)])
    tier.remove(key(2))
    tier.put(key(4), [os.urandom(5)])  # replace: still listed once
    assert sorted(tier.keys()) == [key(i) for i in (0, 1, 3, 4, 5)]
    assert len(tier.keys()) == 5
    assert all(isinstance(k, EntryKey) for k in tier.keys())


def test_keys_round_trip_full_key_parts(tier):
    k = EntryKey("tenant-A", "org.model_v1.2", "abcdef0123456789", "c0ffee" * 8)
    tier.put(k, [b"payload"])
    assert tier.keys() == [k]
    assert tier.contains(k)
    assert as_bytes(tier.get(k)) == [b"payload"]


# -- header and batch ------------------------------------------------------------------------------


def test_header_frame_is_frame_zero(tier):
    frames = entry_frames(seed=11)
    tier.put(key(1), frames)
    header = tier.header_frame(key(1))
    assert bytes(header) == frames[0]
    assert codec.parse_header(bytes(header)).total_frames == len(frames)


def test_batch_contains_counts_leading_present(tier):
    a, b, c, missing = key(1), key(2), key(3), key(4)
    for k in (a, b, c):
        tier.put(k, [os.urandom(64)])
    assert tier.batch_contains([a, b, missing, c]) == 2
    assert tier.batch_contains([a, b, c]) == 3
    assert tier.batch_contains([missing, a, b, c]) == 0
    assert tier.batch_contains([]) == 0
    assert tier.batch_contains(iter([c, a])) == 2


# -- close ---------------------------------------------------------------------------------------------


def test_close_releases_and_is_idempotent(tier):
    tier.put(key(1), [os.urandom(128)])
    assert tier.close() is None
    tier.close()  # second close: no error


def test_audit_reports_the_bytes_of_every_entry_held(tier):
    assert tier.audit() == {}
    frames = {key(i): entry_frames(seed=i, seq_len=32 + i) for i in range(3)}
    for k, f in frames.items():
        tier.put(k, f)
    tier.remove(key(1))
    assert tier.audit() == {k: nbytes(f) for k, f in frames.items() if k != key(1)}
    assert tier.used_bytes() == sum(tier.audit().values())
