"""Memory: what is free for a large allocation (weights, a KV cache, a stage), and a cache bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device` (MemAvailable on CPU), None if unknown."""
    if device.type == "cuda":  # what the driver has free, and what torch's allocator holds unused
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class ByteLRU:
    """Values by key within `max_bytes` (each value's size is given when it is put), the least
    recently used out first. Not locked: a cache shared by threads locks around it."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Any | None:
        """The value (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key][0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        """Keeps `value` unless the key is already there or it alone is larger than `max_bytes`."""
        if key in self._entries or size > self.max_bytes:
            return
        while self.nbytes + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.nbytes -= old
        self._entries[key] = (value, size)
        self.nbytes += size
