"""Entry <-> bytes: a versioned header frame, then layer-major data frames of at most 4 MiB.

Every frame is a 40-byte little-endian head followed by its payload::

    magic     4s   b"DKVF"
    version   u16  FORMAT_VERSION (3); formats 1 and 2 still read
    kind      u8   0 = header (JSON payload), 1 = data
    flags     u8   0
    entry_id  8s   blake2b-64 of the header payload: ties every data frame to its header
    seq       u32  frame index; the header is 0
    total     u32  number of frames, header included
    length    u32  payload bytes
    reserved  u32  0
    checksum  u64  xxh3-64 of the first 32 bytes of the head and the payload

The data frames carry the entry's tensors back to back, layer by layer, as the header's tensor
table describes (offset and byte count of each): the stored form of each layer
(``kvstore.entry.pack_layer``: positions as a bitmap or int16 offsets, 8-bit page bound codes,
one bit width per row for K and V). The header also holds the xxh3-128 of all the
data, so ``entry_id`` differs between entries that differ anywhere, and the whole is checked too. No pickle: the header is JSON and tensors are
raw little-endian bytes. Any truncated, reordered, foreign or corrupted frame fails ``CorruptEntry``.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import xxhash

from dkv.kvstore.entry import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    STORED_FIELDS,
    CompressedKV,
    Identity,
    Recipe,
    unpack_layer,
)
from dkv.kvstore.errors import CorruptEntry, EntryTooLarge, InvalidEntry

MAGIC = b"DKVF"
HEAD = struct.Struct("<4sHBB8sIIII")  # everything the checksum covers
FRAME_HEAD_BYTES = HEAD.size + 8
FRAME_LIMIT = 4 << 20  # the largest frame accepted
# The frame size written by default. Redis (jemalloc) stores a value of exactly 4 MiB in its 5 MiB
# size class (+25% memory, measured on Redis 7.0); 4 KiB less keeps it in the 4 MiB class.
MAX_FRAME_BYTES = FRAME_LIMIT - 4096
KIND_HEADER, KIND_DATA = 0, 1
MAX_HEADER_BYTES = 1 << 20
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    layer: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class EntryHeader:
    """Everything about an entry except its tensor bytes; what the store indexes and ranks by."""

    identity: Identity
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    importance: float
    derived: tuple[str, ...]
    tensors: tuple[TensorSpec, ...]
    data_bytes: int
    data_xxh3: str
    total_frames: int
    entry_id: bytes
    format_version: int = FORMAT_VERSION

    @property
    def key(self):
        return self.identity.key

    def kept_tokens_per_layer(self) -> list[int]:
        """Kept (token, KV head) rows of each layer."""
        kept = [0] * self.num_layers
        for t in self.tensors:
            if t.name == "scores":  # one per row in every format
                kept[t.layer] = t.shape[0]
        return kept


@dataclass(frozen=True)
class Frame:
    kind: int
    version: int
    entry_id: bytes
    seq: int
    total: int
    payload: memoryview


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")


def _frame(kind: int, entry_id: bytes, seq: int, total: int, pieces: list) -> bytes:
    length = sum(len(p) for p in pieces)
    head = HEAD.pack(MAGIC, FORMAT_VERSION, kind, 0, entry_id, seq, total, length, 0)
    h = xxhash.xxh3_64(head)
    for p in pieces:
        h.update(p)
    return b"".join([head, struct.pack("<Q", h.intdigest()), *pieces])


def _layout(sizes: list[int], payload_max: int) -> list[list[tuple[int, int, int]]]:
    """Pieces (buffer, start, end) of each data frame, filling frames in order.

    A tensor that fits in one frame but not in the rest of the current one starts a new frame,
    so decoding can take it as a zero-copy view; larger tensors span whole frames.
    """
    frames: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = payload_max
    for i, n in enumerate(sizes):
        if current and room < n <= payload_max:
            frames.append(current)
            current, room = [], payload_max
        pos = 0
        while pos < n:
            take = min(room, n - pos)
            current.append((i, pos, pos + take))
            pos += take
            room -= take
            if room == 0:
                frames.append(current)
                current, room = [], payload_max
    if current:
        frames.append(current)
    return frames


def encode(entry: CompressedKV, max_frame_bytes: int = MAX_FRAME_BYTES) -> list[bytes]:
    """Frames of ``entry``: the header frame first, then the data frames."""
    payload_max = max_frame_bytes - FRAME_HEAD_BYTES
    if payload_max < 1024 or max_frame_bytes > FRAME_LIMIT:
        raise ValueError(f"max_frame_bytes {max_frame_bytes} must be in [{1024 + FRAME_HEAD_BYTES}, {FRAME_LIMIT}]")
    specs, buffers, offset = [], [], 0
    ident = entry.identity
    for li, layer in enumerate(entry.stored_layers()):
        for name, t in layer.items():
            buf = _tensor_bytes(t)
            specs.append([li, name, DTYPE_NAMES[t.dtype], list(t.shape), offset, len(buf)])
            buffers.append(buf)
            offset += len(buf)
    layout = _layout([len(b) for b in buffers], payload_max)
    data_hash = xxhash.xxh3_128()
    for buf in buffers:
        data_hash.update(buf)
    header = {
        "format_version": FORMAT_VERSION,
        "identity": {
            "tenant": ident.tenant,
            "model_fingerprint": ident.model_fingerprint,
            "recipe": ident.recipe.to_dict(),
            "chunk_hashes": list(ident.chunk_hashes),
            "seq_len": ident.seq_len,
            "start": ident.start,
        },
        "num_layers": entry.num_layers,
        "num_kv_heads": entry.num_kv_heads,
        "head_dim": entry.head_dim,
        "page_size": entry.page_size,
        "importance": entry.importance,
        "derived": list(entry.derived),
        "tensors": specs,
        "data_bytes": offset,
        "data_xxh3": data_hash.hexdigest(),
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if len(header_bytes) > min(payload_max, MAX_HEADER_BYTES):
        raise EntryTooLarge(f"entry header is {len(header_bytes)} bytes; at most {min(payload_max, MAX_HEADER_BYTES)}")
    entry_id = hashlib.blake2b(header_bytes, digest_size=8).digest()
    total = 1 + len(layout)
    frames = [_frame(KIND_HEADER, entry_id, 0, total, [header_bytes])]
    for seq, pieces in enumerate(layout, start=1):
        frames.append(_frame(KIND_DATA, entry_id, seq, total, [buffers[b][lo:hi] for b, lo, hi in pieces]))
    return frames


def stored_nbytes(header: EntryHeader, header_frame: bytes | memoryview) -> int:
    """Bytes of all the frames of the entry whose header frame is ``header_frame``."""
    return len(header_frame) + header.data_bytes + FRAME_HEAD_BYTES * (header.total_frames - 1)


def parse_frame(frame: bytes | memoryview) -> Frame:
    """Check one frame's head and checksum; raise ``CorruptEntry`` if anything is off."""
    view = memoryview(frame).cast("B")
    if len(view) < FRAME_HEAD_BYTES:
        raise CorruptEntry(f"frame of {len(view)} bytes is shorter than the {FRAME_HEAD_BYTES}-byte frame head")
    if len(view) > FRAME_LIMIT:
        raise CorruptEntry(f"frame of {len(view)} bytes is over the {FRAME_LIMIT}-byte frame limit")
    magic, version, kind, _flags, entry_id, seq, total, length, _ = HEAD.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry(f"frame magic {bytes(magic)!r} is not {MAGIC!r}: not a dkv frame")
    if version not in READABLE_VERSIONS:
        raise CorruptEntry(
            f"frame format version {version}; this store reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if length != len(view) - FRAME_HEAD_BYTES:
        raise CorruptEntry(f"frame says {length} payload bytes but carries {len(view) - FRAME_HEAD_BYTES}: truncated")
    (checksum,) = struct.unpack_from("<Q", view, HEAD.size)
    h = xxhash.xxh3_64(view[: HEAD.size])
    h.update(view[FRAME_HEAD_BYTES:])
    if h.intdigest() != checksum:
        raise CorruptEntry(f"frame {seq} failed its checksum: corrupted in transit or at rest")
    if kind not in (KIND_HEADER, KIND_DATA) or (kind == KIND_HEADER) != (seq == 0) or not seq < total:
        raise CorruptEntry(f"frame kind {kind}, seq {seq}, total {total} are inconsistent")
    return Frame(kind, version, bytes(entry_id), seq, total, view[FRAME_HEAD_BYTES:])


def parse_header(frame: bytes | memoryview) -> EntryHeader:
    """Parse and check the header frame (frame 0)."""
    f = parse_frame(frame)
    if f.kind != KIND_HEADER:
        raise CorruptEntry(f"expected the header frame first, got data frame {f.seq}")
    if len(f.payload) > MAX_HEADER_BYTES:
        raise InvalidEntry(f"entry header of {len(f.payload)} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if hashlib.blake2b(f.payload, digest_size=8).digest() != f.entry_id:
        raise CorruptEntry("the header frame's entry_id is not the hash of its payload: the header was altered")
    try:
        h = json.loads(bytes(f.payload))
        ident = h["identity"]
        identity = Identity(
            model_fingerprint=ident["model_fingerprint"],
            recipe=Recipe.from_dict(ident["recipe"]),
            chunk_hashes=tuple(ident["chunk_hashes"]),
            seq_len=int(ident["seq_len"]),
            tenant=ident["tenant"],
            start=int(ident["start"]),
        )
        identity.key  # noqa: B018  the property validates every key part
        specs = tuple(
            TensorSpec(int(a), str(b), str(c), tuple(int(x) for x in d), int(e), int(g))
            for a, b, c, d, e, g in h["tensors"]
        )
        header = EntryHeader(
            identity=identity,
            num_layers=int(h["num_layers"]),
            num_kv_heads=int(h["num_kv_heads"]),
            head_dim=int(h["head_dim"]),
            page_size=int(h["page_size"]),
            importance=float(h["importance"]),
            derived=tuple(str(x) for x in h["derived"]),
            tensors=specs,
            data_bytes=int(h["data_bytes"]),
            data_xxh3=str(h["data_xxh3"]),
            total_frames=f.total,
            entry_id=f.entry_id,
            format_version=int(h["format_version"]),
        )
        if header.format_version != f.version:
            raise InvalidEntry(f"format_version {h['format_version']} in a frame of format version {f.version}")
    except InvalidEntry:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as e:
        raise InvalidEntry(f"entry header is malformed: {type(e).__name__}: {str(e)[:200]}") from e
    _check_tensor_table(header)
    return header


def _check_tensor_table(h: EntryHeader) -> None:
    if not 1 <= h.num_layers <= 4096:
        raise InvalidEntry(f"num_layers {h.num_layers} must be in [1, 4096]")
    pos = 0
    seen = set()
    for t in h.tensors:
        where = f"tensor {t.name!r} of layer {t.layer}"
        if t.name not in STORED_FIELDS:
            raise InvalidEntry(f"{where}: unknown tensor name; expected one of {STORED_FIELDS}")
        if not 0 <= t.layer < h.num_layers or (t.layer, t.name) in seen:
            raise InvalidEntry(f"{where}: layer out of range or tensor repeated")
        if t.dtype not in DTYPES:
            raise InvalidEntry(f"{where}: dtype {t.dtype!r} is not one of {sorted(DTYPES)}")
        if any(d < 0 for d in t.shape) or len(t.shape) > 2:
            raise InvalidEntry(f"{where}: shape {t.shape} must have 1-2 non-negative dims")
        numel = 1
        for d in t.shape:
            numel *= d
        if numel * DTYPES[t.dtype].itemsize != t.nbytes or t.offset != pos:
            raise InvalidEntry(
                f"{where}: {t.nbytes} bytes at offset {t.offset} do not match shape {t.shape} {t.dtype} at offset {pos}"
            )
        seen.add((t.layer, t.name))
        pos += t.nbytes
    if pos != h.data_bytes:
        raise InvalidEntry(f"tensor table covers {pos} bytes but data_bytes is {h.data_bytes}")
    payload_max = FRAME_LIMIT - FRAME_HEAD_BYTES
    data_frames = h.total_frames - 1
    if not -(-h.data_bytes // payload_max) <= data_frames <= h.data_bytes:
        raise InvalidEntry(
            f"{data_frames} data frames cannot carry {h.data_bytes} data bytes "
            f"(each frame carries 1 to {payload_max} bytes)"
        )


class FrameAssembler:
    """Checks frames as they stream in: header first, then data frames in order, same entry.

    ``add`` raises ``CorruptEntry`` on the first bad frame; ``finish`` returns the header and the
    frames once all arrived. Nothing is decoded into tensors here.
    """

    def __init__(self, max_entry_bytes: int | None = None, on_header=None):
        """``on_header(header, header_frame)`` runs once the header is parsed, before any size check
        or data frame: a caller refuses a stream (tenant, quota, memory) before reading what it carries."""
        self.max_entry_bytes = max_entry_bytes
        self.on_header = on_header
        self.header: EntryHeader | None = None
        self.frames: list[bytes | memoryview] = []
        self.data_received = 0
        self._data_hash = xxhash.xxh3_128()

    def add(self, frame: bytes | memoryview) -> None:
        if self.header is None:
            self.header = parse_header(frame)
            if self.on_header is not None:
                self.on_header(self.header, frame)
            if self.max_entry_bytes is not None and self.header.data_bytes > self.max_entry_bytes:
                raise EntryTooLarge(
                    f"entry of {self.header.data_bytes} bytes is over the limit of {self.max_entry_bytes} bytes"
                )
            self.frames.append(frame)
            return
        f = parse_frame(frame)
        expected = len(self.frames)
        if f.entry_id != self.header.entry_id or f.version != self.header.format_version:
            raise CorruptEntry(f"frame {f.seq} belongs to another entry")
        if f.seq != expected or f.total != self.header.total_frames:
            raise CorruptEntry(
                f"frame {f.seq} of {f.total} arrived where frame {expected} of "
                f"{self.header.total_frames} was expected: reordered, duplicated or lost"
            )
        self.data_received += len(f.payload)
        if self.data_received > self.header.data_bytes:
            raise CorruptEntry(
                f"{self.data_received} data bytes received; the header announced {self.header.data_bytes}"
            )
        self._data_hash.update(f.payload)
        self.frames.append(frame)

    def finish(self) -> tuple[EntryHeader, list[bytes | memoryview]]:
        if self.header is None:
            raise CorruptEntry("no frames received: the stream must start with the header frame")
        if len(self.frames) != self.header.total_frames or self.data_received != self.header.data_bytes:
            raise CorruptEntry(
                f"stream ended after {len(self.frames)} of {self.header.total_frames} frames "
                f"({self.data_received} of {self.header.data_bytes} data bytes): truncated"
            )
        if self._data_hash.hexdigest() != self.header.data_xxh3:
            raise CorruptEntry(
                "the data frames pass their checksums but not the entry's: frames of another entry were mixed in"
            )
        return self.header, self.frames


def check_frames(
    frames: Iterable[bytes | memoryview], max_entry_bytes: int | None = None
) -> tuple[EntryHeader, list[bytes | memoryview]]:
    """Verify a whole frame sequence; return its header and the frames."""
    asm = FrameAssembler(max_entry_bytes)
    for f in frames:
        asm.add(f)
    return asm.finish()


def entries_of(frames: Iterable[bytes | memoryview]) -> Iterator[list]:
    """The frames of several entries sent one after another, one list per entry (a header frame,
    sequence 0, starts the next); each list is for ``decode``, which checks it."""
    group: list = []
    for frame in frames:
        view = memoryview(frame).cast("B")
        if len(view) < FRAME_HEAD_BYTES:
            raise CorruptEntry(f"frame of {len(view)} bytes is shorter than the {FRAME_HEAD_BYTES}-byte frame head")
        seq = HEAD.unpack_from(view)[5]
        if seq == 0 and group:
            yield group
            group = []
        group.append(frame)
    if group:
        yield group


def decode(frames: Iterable[bytes]) -> CompressedKV:
    """Frames -> entry. Checks every frame, then every tensor (``CompressedKV.validate``).

    Tensors that lie inside one frame are read-only zero-copy views of it (entries are
    immutable); tensors that span frames are copied together.
    """
    return decode_checked(*check_frames(frames))


def decode_checked(header: EntryHeader, checked: Sequence[bytes | memoryview]) -> CompressedKV:
    """``decode`` of frames that ``check_frames`` or a ``FrameAssembler`` already verified."""
    payloads = [memoryview(f)[FRAME_HEAD_BYTES:] for f in checked[1:]]
    starts = list(itertools.accumulate((len(p) for p in payloads), initial=0))
    layers: list[dict] = [{} for _ in range(header.num_layers)]
    for t in header.tensors:
        layers[t.layer][t.name] = _tensor_at(payloads, starts, t)
    ident = header.identity
    if not 1 <= header.page_size <= 4096:
        raise InvalidEntry(f"page_size {header.page_size} must be in [1, 4096]")
    entry = CompressedKV(
        identity=ident,
        layers=[
            unpack_layer(fields, ident.start, ident.seq_len, header.page_size, f"layer {i}")
            for i, fields in enumerate(layers)
        ],
        num_kv_heads=header.num_kv_heads,
        head_dim=header.head_dim,
        page_size=header.page_size,
        importance=header.importance,
        derived=header.derived,
        format_version=header.format_version,
    )
    entry.validate()
    return entry


def _tensor_at(payloads: list[memoryview], starts: list[int], t: TensorSpec) -> torch.Tensor:
    dtype = DTYPES[t.dtype]
    if t.nbytes == 0:
        return torch.empty(t.shape, dtype=dtype)
    f = bisect.bisect_right(starts, t.offset) - 1
    lo = t.offset - starts[f]
    buf: memoryview | bytearray
    if lo + t.nbytes <= len(payloads[f]):
        buf, offset = payloads[f], lo
    else:
        buf, offset, pos = bytearray(t.nbytes), 0, 0
        while pos < t.nbytes:
            piece = payloads[f][lo : lo + t.nbytes - pos]
            buf[pos : pos + len(piece)] = piece
            pos += len(piece)
            f, lo = f + 1, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: entries are immutable
        flat = torch.frombuffer(buf, dtype=dtype, count=t.nbytes // dtype.itemsize, offset=offset)
    return flat.reshape(t.shape)
