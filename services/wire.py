"""Between domain objects and gRPC messages.

Put and Get carry ``dkv.v1.Frame`` messages (one ``bytes data = 1`` field). They are encoded and
parsed here without protobuf objects, which would copy every 4 MiB payload two more times; the
bytes on the wire are exactly the ``Frame`` message, so any protobuf client interoperates.

Summaries and Select replies carry an xxh3-64 checksum of the key the client asked for and of
every field, walked in a fixed order (so any client can compute it, whatever its protobuf library
does with map order): little-endian u64 lengths before strings and bytes, u32 scalars, and each
tensor as name, dtype, shape (u64 each) and data.

Only the tensor helpers need torch, and they import it themselves: the client imports this
module for recipes where torch is not installed (``pip install dkv``).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

from dkv.kvstore.errors import InvalidEntry
from dkv.kvstore.recipe import Recipe
from dkv.services.pb import common_pb2, store_pb2

if TYPE_CHECKING:
    import torch

_FRAME_TAG = 0x0A  # field 1, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(view) or shift > 63:
            raise ValueError("truncated varint")
        b = view[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _address(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0]


def frame_message(frame: bytes | memoryview) -> bytes:
    """Serialize ``Frame{data=frame}``.

    When ``frame`` is the data of a ``Frame`` message we received (``parse_frame_message``
    returns a view into it), that message is returned as it is: no copy.
    """
    prefix = bytes((_FRAME_TAG,)) + _varint(len(frame))
    whole = frame.obj if isinstance(frame, memoryview) else None
    if (
        isinstance(whole, bytes)
        and len(whole) == len(prefix) + len(frame)
        and len(frame)
        and whole.startswith(prefix)
        and _address(frame) == _address(whole) + len(prefix)
    ):
        return whole
    return b"".join([prefix, frame])


def parse_frame_message(message: bytes) -> memoryview | None:
    """The ``data`` of a serialized ``Frame`` (a zero-copy view), or None if it is not one.

    Never raises: a malformed message must become INVALID_ARGUMENT in the servicer, not a
    deserialization failure that gRPC reports as INTERNAL.
    """
    view = memoryview(message)
    data = view[0:0]
    i = 0
    try:
        while i < len(view):
            key, i = _read_varint(view, i)
            field, wire_type = key >> 3, key & 7
            if field == 0:
                return None  # field number 0 is illegal in protobuf
            if wire_type == 0:
                _, i = _read_varint(view, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            elif wire_type == 2:
                length, i = _read_varint(view, i)
                if i + length > len(view):
                    return None
                if field == 1:
                    data = view[i : i + length]
                i += length
            else:
                return None
    except ValueError:
        return None
    return data if i == len(view) else None


def recipe_to_proto(recipe: Recipe) -> common_pb2.Recipe:
    return common_pb2.Recipe(
        method=recipe.method,
        ratio=recipe.ratio,
        budget=recipe.budget,
        quant=recipe.quant,
        chunk_size=recipe.chunk_size,
        chunked=recipe.chunked,
        params=dict(recipe.params),
    )


def recipe_from_proto(msg: common_pb2.Recipe) -> Recipe:
    """Raises ``InvalidEntry`` naming the bad field."""
    return Recipe(
        method=msg.method or "full",
        ratio=msg.ratio,
        budget=msg.budget,
        quant=msg.quant or "none",
        chunk_size=msg.chunk_size or 256,
        chunked=msg.chunked,
        params=tuple(msg.params.items()),
    )


def tensor_to_proto(t: torch.Tensor) -> store_pb2.Tensor:
    import torch

    from dkv.kvstore.codec import DTYPE_NAMES

    flat = t.detach().cpu().contiguous()
    return store_pb2.Tensor(
        dtype=DTYPE_NAMES[flat.dtype], shape=list(flat.shape), data=flat.reshape(-1).view(torch.uint8).numpy().tobytes()
    )


def tensor_from_proto(msg: store_pb2.Tensor) -> torch.Tensor:
    """Raises ``InvalidEntry`` when the dtype is unknown or the bytes do not match the shape."""
    import torch

    from dkv.kvstore.codec import DTYPES

    if msg.dtype not in DTYPES:
        raise InvalidEntry(f"tensor dtype {msg.dtype!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[msg.dtype]
    numel = 1
    for d in msg.shape:
        numel *= d
    if any(d < 0 for d in msg.shape) or numel * dtype.itemsize != len(msg.data):
        raise InvalidEntry(
            f"tensor of shape {list(msg.shape)} {msg.dtype} needs {numel * dtype.itemsize} bytes, got {len(msg.data)}"
        )
    if numel == 0:
        return torch.empty(tuple(msg.shape), dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(tuple(msg.shape))


def _text(h, text: str) -> None:
    data = text.encode()
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _tensor_digest(h, name: str, t: store_pb2.Tensor) -> None:
    _text(h, name)
    _text(h, t.dtype)
    h.update(struct.pack(f"<Q{len(t.shape)}q", len(t.shape), *t.shape))
    h.update(struct.pack("<Q", len(t.data)))
    h.update(t.data)


def summary_checksum(key: str, s: store_pb2.LayerSummary) -> int:
    """The checksum of a ``LayerSummary`` sent for ``key`` (see the module docstring)."""
    import xxhash  # not needed by the light client (recipes only)

    h = xxhash.xxh3_64()
    _text(h, key)
    h.update(struct.pack("<6I", s.layer, s.seq_len, s.num_layers, s.num_kv_heads, s.head_dim, s.page_size))
    for name in ("head_counts", "page_min", "page_max"):
        _tensor_digest(h, name, getattr(s, name))
    return h.intdigest()


def pages_checksum(key: str, p: store_pb2.LayerPages) -> int:
    """The checksum of a ``LayerPages`` sent for ``key`` (see the module docstring)."""
    import xxhash  # not needed by the light client (recipes only)

    h = xxhash.xxh3_64()
    _text(h, key)
    h.update(struct.pack(f"<IQ{len(p.pages)}I", p.layer, len(p.pages), *p.pages))
    _text(h, p.tier)
    h.update(struct.pack("<Q", len(p.tensors)))
    for name in sorted(p.tensors):
        _tensor_digest(h, name, p.tensors[name])
    return h.intdigest()
