"""Device-memory and host-memory tiers.

The device tier holds frames as uint8 torch tensors on ``cuda`` on a GPU host (``cpu`` in tests,
so the same code runs here). The host tier holds them in host memory: pinned tensors when CUDA
is present (fast copies to the GPU), otherwise the frame objects exactly as they arrived, so a
Get can send the very bytes a Put received without copying them (see ``services.wire``).
"""

from __future__ import annotations

import threading
import warnings

import torch

from dkv.kvstore.entry import EntryKey
from dkv.kvstore.tier import Frames, StorageTier, frames_nbytes


class MemoryTier(StorageTier):
    """Frames as uint8 tensors on ``device``; ``pin`` pins host tensors (only with CUDA)."""

    def __init__(self, name: str, capacity_bytes: int, device: str = "cpu", pin: bool = False):
        super().__init__(name, capacity_bytes)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"tier {name}: device {device!r} asked for but CUDA is not available; use cpu")
        self.pin = pin and torch.cuda.is_available() and self.device.type == "cpu"
        self._entries: dict[EntryKey, list[torch.Tensor | bytes | memoryview]] = {}
        self._used = 0
        self._lock = threading.Lock()

    def _hold(self, frame: bytes | memoryview) -> torch.Tensor | bytes | memoryview:
        if self.device.type == "cpu" and not self.pin:
            return frame  # immutable: keep the caller's object, no copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer; we copy it right away
            t = torch.frombuffer(frame, dtype=torch.uint8)
        return t.pin_memory() if self.pin else t.to(self.device)

    @staticmethod
    def _view(held: torch.Tensor | bytes | memoryview) -> bytes | memoryview:
        return held.cpu().numpy().data if isinstance(held, torch.Tensor) else held

    def put(self, key: EntryKey, frames: Frames) -> None:
        held = [self._hold(f) for f in frames]
        size = frames_nbytes(frames)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._used -= _nbytes(old)
            self._entries[key] = held
            self._used += size

    def get(self, key: EntryKey) -> list[bytes | memoryview] | None:
        held = self._entries.get(key)
        return None if held is None else [self._view(h) for h in held]

    def header_frame(self, key: EntryKey) -> bytes | memoryview | None:
        held = self._entries.get(key)
        return self._view(held[0]) if held else None

    def contains(self, key: EntryKey) -> bool:
        return key in self._entries

    def remove(self, key: EntryKey) -> bool:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is None:
                return False
            self._used -= _nbytes(old)
            return True

    def keys(self) -> list[EntryKey]:
        return list(self._entries)

    def used_bytes(self) -> int:
        return self._used

    def audit(self) -> dict[EntryKey, int]:
        """Nothing to repair in process memory; the sizes, without copying anything off the device."""
        with self._lock:
            return {key: _nbytes(held) for key, held in self._entries.items()}

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0


def _nbytes(held: list) -> int:
    return sum(h.numel() if isinstance(h, torch.Tensor) else len(h) for h in held)
