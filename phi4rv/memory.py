"""Memory free for new allocations, read before a large one (weights, a KV cache, a stage)."""

from __future__ import annotations

from pathlib import Path

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
