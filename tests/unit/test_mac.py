"""dkv.kvstore.mac: keyed MACs over an entry's frames, whatever their layout."""

from __future__ import annotations

import pytest

from dkv.kvstore import codec
from dkv.kvstore.mac import EntryMac
from dkv.testing import synthetic_entry


@pytest.fixture(scope="module")
def frames():
    return codec.encode(synthetic_entry(seq_len=64, seed=1), max_frame_bytes=8192)


def test_the_tag_verifies_with_the_same_secret_only(frames):
    mac = EntryMac("cluster-secret")
    tag = mac.tag(frames)
    assert len(tag) == 64 and int(tag, 16) >= 0
    assert mac.verify(frames, tag)
    assert EntryMac("cluster-secret").verify([memoryview(f) for f in frames], tag)  # views are the same bytes
    assert not EntryMac("another-secret").verify(frames, tag)
    assert not mac.verify(frames, "")
    assert not mac.verify(frames, "00" * 32)


def test_any_change_to_any_frame_or_their_order_fails(frames):
    mac = EntryMac(b"\x00" * 100)  # any length, bytes too
    tag = mac.tag(frames)
    flipped = [bytearray(f) for f in frames]
    flipped[-1][-1] ^= 1
    # the same bytes cut into frames differently: each frame is length-prefixed
    recut = [frames[0] + frames[1][:10], frames[1][10:], *frames[2:]]
    for other in (flipped, frames[::-1], frames[:-1], [*frames, b""], recut):
        assert not mac.verify(other, tag)


def test_an_empty_secret_is_refused_and_the_secret_is_not_kept():
    with pytest.raises(ValueError, match="empty"):
        EntryMac("")
    mac = EntryMac("s3cr3t-value")
    assert "s3cr3t" not in repr(mac) and "s3cr3t" not in str(vars(mac))
