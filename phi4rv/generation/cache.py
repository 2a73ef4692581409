"""KV memory for generation: a fixed set of slots, each holding one sequence at its own length.

The decoder sees any cache through two calls (`update`, `advance`, see `model.decoder.Cache`);
`SlotCache` adds `bind` (which slots the next forward runs) so that sequences of different
lengths, joining and leaving at any step, share one preallocated block. A paged cache would
implement the same calls over pages instead of rows.
"""

from __future__ import annotations

import torch

from phi4rv.config import DecoderConfig
from phi4rv.memory import available_memory

PREFILL_BYTES = 768 * 2**20  # activations one prefill forward may hold (`Core` chunks longer prompts); left free beside a new KV cache


def prefill_bytes(cfg: DecoderConfig, tokens: int) -> int:
    """The activations a prefill forward of `tokens` positions holds at its peak, a bound: 12
    bytes per (2 x hidden + 3 x intermediate) elements a position (in a block's MLP: its input,
    the normed input, gate_up and the activation). Measured at Phi-4's widths, 2048 positions
    after none: 6.4 bytes under w8a8 (its products come out in fp32), 3.0 in bf16 and int4; the
    15B server's 8164-token prompt, in 2048-position chunks after up to 6144 cached ones: ~10.
    The 15B: 750 KiB a position."""
    return tokens * (2 * cfg.hidden_size + 3 * cfg.intermediate_size) * 12


def prefill_tokens(cfg: DecoderConfig) -> int:
    """Positions one prefill forward takes, all rows together: 1048 on the 15B."""
    return max(1, PREFILL_BYTES // prefill_bytes(cfg, 1))


class KVCacheTooLarge(ValueError):
    """The KV cache asked for does not fit in the memory available; says what would."""

    def __init__(self, slots: int, slot_len: int, per_position: int, free: int, reserve: int = 0):
        room = max(free - PREFILL_BYTES - reserve, 0)
        self.fit_slots = room // (per_position * (slot_len + 1))  # sequences of this length
        self.fit_len = max(room // (per_position * slots) - 1, 0)  # positions for this many sequences
        gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
        caches = f" and {gb(reserve)} of caches" if reserve else ""
        self.head = (f"not enough memory for the KV cache: {slots} sequence(s) x {slot_len} positions need "
                     f"~{gb(slots * (slot_len + 1) * per_position + PREFILL_BYTES + reserve)} with a prefill's activations"
                     f"{caches}, {gb(free)} available")
        super().__init__(self.hint(f"{{}} sequence(s) of {slot_len} positions", f"{slots} sequence(s) of {{}} positions"))

    def hint(self, fewer: str, shorter: str) -> str:
        """The message, with what would fit phrased by `fewer` and `shorter` (templates of a number)."""
        options = [t.format(n) for t, n in ((fewer, self.fit_slots), (shorter, self.fit_len)) if n > 0]
        return f"{self.head}; " + (" or ".join(options) + " would fit" if options else "nothing fits: free memory")


def check_fits(cfg: DecoderConfig, slots: int, slot_len: int, dtype: torch.dtype, free: int | None, reserve: int = 0) -> None:
    """Raises KVCacheTooLarge unless `slots` x `slot_len` positions, a prefill's activations and
    `reserve` bytes (caches that grow beside it) fit in `free` bytes (None: unknown, not checked)."""
    per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    if free is not None and slots * (slot_len + 1) * per_position + PREFILL_BYTES + reserve > free:
        raise KVCacheTooLarge(slots, slot_len, per_position, free, reserve)


class SlotCache:
    """Keys/values for `slots` sequences: [slots, kv_heads, slot_len, head_dim] per layer."""

    def __init__(self, cfg: DecoderConfig, slots: int, slot_len: int, device, dtype, reserve: int = 0):
        # One spare position, never written: a view of a slot's first positions is then never the
        # whole slot, so the compiled step sees one memory layout (a contiguous view would compile
        # a graph of its own, mid-generation).
        shape = (slots, cfg.num_key_value_heads, slot_len + 1, cfg.head_dim)
        check_fits(cfg, slots, slot_len, dtype, available_memory(torch.device(device)), reserve)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.lengths = [0] * slots
        self.slot_len = slot_len
        self.device = device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def bind(self, slots: list[int], new: list[int] | None = None) -> None:
        """The next forward runs these slots' rows; `new[i]` tokens are written for row i (its real
        length in a right-padded batch; default: the whole step)."""
        self.slots = slots
        self.rows = torch.tensor(slots, device=self.device)
        self.starts = torch.tensor([self.lengths[s] for s in slots], device=self.device)
        self.new = new
        # Consecutive slots are read as a view; any other set is gathered (a copy).
        first = slots[0]
        self.span = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        end = max(self.lengths[s] for s in self.slots) + t
        if end > self.slot_len:
            raise ValueError(f"KV cache slot full: {end} > {self.slot_len} positions")
        pos = self.starts[:, None] + torch.arange(t, device=self.device)  # [B, T]
        self.k[layer][self.rows[:, None], :, pos] = k.transpose(1, 2)
        self.v[layer][self.rows[:, None], :, pos] = v.transpose(1, 2)
        if self.span is not None:
            return self.k[layer][self.span, :, :end], self.v[layer][self.span, :, :end]
        return self.k[layer][self.rows, :, :end], self.v[layer][self.rows, :, :end]

    def advance(self, n: int) -> None:
        for i, s in enumerate(self.slots):
            self.lengths[s] += n if self.new is None else self.new[i]

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Moves a sequence's keys/values from slot `src` to the free slot `dst`."""
        n = self.lengths[src]
        for t in self.k + self.v:
            t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def copy_prefix(self, slot: int, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Start `slot` with stored keys/values ([kv_heads, n, head_dim] per layer) of a prompt prefix."""
        n = k[0].shape[1]
        for layer in range(len(self.k)):
            self.k[layer][slot, :, :n] = k[layer]
            self.v[layer][slot, :, :n] = v[layer]
        self.lengths[slot] = n

    def read_prefix(self, slot: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [t[slot, :, :n].clone() for t in self.k], [t[slot, :, :n].clone() for t in self.v]

    def decode_mask(self) -> torch.Tensor | None:
        """[B, 1, 1, S] for one new token per bound slot; None when every row has the same length."""
        lengths = self.starts + 1
        if bool((lengths == lengths[0]).all()):
            return None
        k_pos = torch.arange(int(lengths.max()), device=self.device)
        return (k_pos[None, :] < lengths[:, None])[:, None, None, :]
