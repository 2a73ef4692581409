"""Quantized linear layers: int8 per output channel, int4 in groups along the input.

Three modes (`--quantize`):
- `int8`, `int4`: weight-only. The matmuls are PyTorch's own weight-only kernels
  (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int4pack_mm` on
  CUDA); activations stay in the compute dtype.
- `w8a8`: int8 weights as `int8`, and each token's activations quantized to int8 on the fly (one
  absmax scale per row) so the product is an integer matmul, as llama.cpp's Q8_0 does with its
  blocks of 32. At the 15B's size on this CPU it decodes 1.6-2.4x faster than `int8` and reaches
  the first token ~7x sooner, for about twice int8's drift (bench/README.md). Same stored tensors as
  `int8`. On CPU the weight is held in oneDNN's own blocked layout (`onednn.qlinear_prepack`, what
  inductor's x86 int8 path uses) and multiplied by `onednn.qlinear_pointwise`: at the 15B's widths
  1.1-1.3x `torch._int_mm`'s speed at one row and 1.6-2.3x at 4-16 rows (bench/int8_backend.py);
  elsewhere `torch._int_mm`. Both give the same values (exact int32 sums, the same two fp32 scalings).
torchao 0.18's eager int8 path was 10x slower here, so torchao is not used.

What is quantized (`quantize_modules`):
- every linear layer of the decoder's blocks (qkv, o, gate_up, down): in the mode's format;
- the LM head: int8 weights with int8 activations (`w8a8`) under every mode. It is the largest
  matrix read for every token (1 GB in bf16 at the 15B's size), where the integer matmul is
  fastest; quantizing its input moved the trained toy's KL by <1e-5 nats. Its rows rank 100k
  tokens against each other, so its weights stay at 8 bits under int4 too (int4 there moves
  greedy choices for 0.26 GB saved; llama.cpp's Q4_K_M keeps it at 6 bits);
- the embedding table stays in the compute dtype: one row is gathered per token, so it costs
  memory (1 GB) but no bandwidth, and quantizing it buys no speed;
- the vision tower and projector stay in the compute dtype unless `vision=True` (they run once
  per image, compute-bound, and are 3 % of the weights).

A layer whose input width is not a multiple of 32 (SigLIP's fc2, 4304) or whose output width is not
a multiple of 16 cannot use the int4 kernel and is quantized to int8 instead.

Backward (QLoRA, `phi4rv.lora.QLoRALinear`): the weight-only kernels have no autograd formula, so
when the input needs a gradient the matmul runs inside `WeightOnlyMatmul`, whose backward is
grad_x = grad_y @ W with W rebuilt a block at a time (at most `DEQUANT_BLOCK_ELEMENTS` values in the compute
dtype: never a full-precision copy of a large matrix). int8 rebuilds rows (q * scale); int4 on CPU
with an output width that is a multiple of 64 (every 15B decoder layer) reads rows from the
kernel's packed tiles; elsewhere (CUDA's tiled layout, other widths) it rebuilds columns by running
the forward kernel on rows of the identity (I[k0:k1] @ W^T = W[:, k0:k1]^T), so no undocumented
layout is decoded, at in x in x out extra multiply-adds per backward (in_features / tokens of the
gradient matmul's own cost).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZE_MODES = ("int8", "int4", "w8a8")
INT4_GROUP = 128
_ROWS_PER_CHUNK = 1024  # quantize this many output rows at a time: bounded fp32 temporaries
_CPU_INT4_TILE = 64  # rows per tile of the CPU int4 layout (when the output width is a multiple of it)
DEQUANT_BLOCK_ELEMENTS = 1 << 24  # largest piece of a dequantized weight the backward or export holds (32 MB in bf16)


_ONEDNN_QLINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
_PREPACKED: weakref.WeakValueDictionary[int, Int8Linear] = weakref.WeakValueDictionary()


def _onednn_qlinear(qx: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """fp32 (qx - 128) @ q.T * scale for uint8 qx [m, in] and the layer's prepacked q."""
    return torch.ops.onednn.qlinear_pointwise(qx, 1.0, 128, layer.qweight, layer._weight_scales, layer._zero_points,
                                              None, 1.0, 0, torch.float32, "none", [], "")


@torch.library.custom_op("phi4rv::onednn_qlinear", mutates_args=())
def onednn_qlinear(qx: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """The same product for compiled code, which cannot trace oneDNN's opaque tensors: the layer is named by a key."""
    return _onednn_qlinear(qx, _PREPACKED[key])


@onednn_qlinear.register_fake
def _(qx, key, out_features):
    return qx.new_empty(qx.shape[0], out_features, dtype=torch.float32)


def check_mode(mode: str | None) -> str | None:
    if mode in (None, "", "none"):
        return None
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown --quantize value {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    return mode


def stored_format(mode: str) -> str:
    """The tensors a pre-quantized folder holds for `mode`: w8a8 keeps int8's (it differs only in
    how activations are handled at run time), so a folder of either loads as the other."""
    return "int8" if mode == "w8a8" else mode


def int4_group_size(in_features: int) -> int | None:
    for g in (INT4_GROUP, 64, 32):
        if in_features % g == 0:
            return g
    return None


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 [out, in] and one scale per output row.

    With `dynamic_activations` (mode w8a8) each row of x is quantized too, qx = round(x / sx) with
    sx = absmax(row) / 127, and y = (qx @ q.T) * sx * scale with the sums exact in int32.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 dynamic_activations: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.dynamic_activations = dynamic_activations
        self._packed_key: int | None = None  # set when qweight is in oneDNN's layout (see _PREPACKED)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @staticmethod
    @torch.no_grad()
    def quantize(w: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `w` (anything sliceable by rows) -> (q int8 [out, in], fp32 scale per row)."""
        q = torch.empty(w.shape, dtype=torch.int8, device=device)
        scales = torch.empty(w.shape[0], dtype=torch.float32, device=device)
        for r in range(0, w.shape[0], _ROWS_PER_CHUNK):
            chunk = w[r : r + _ROWS_PER_CHUNK].to(device=device, dtype=torch.float32)
            s = chunk.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            q[r : r + _ROWS_PER_CHUNK] = torch.round(chunk / s[:, None]).clamp(-127, 127).to(torch.int8)
            scales[r : r + _ROWS_PER_CHUNK] = s
        return q, scales

    def set_weight(self, w: torch.Tensor, device: torch.device | str) -> None:
        q, scales = self.quantize(w, device)
        self.set_quantized(q, scales, device)

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, device: torch.device | str) -> None:
        self.scales = scales.to(device=device, dtype=self.compute_dtype)
        self.qweight, self._packed_key = q.to(device), None
        self._pack()

    def _pack(self) -> None:
        """On CPU, w8a8's weight moves into oneDNN's blocked layout ([in, out], opaque)."""
        if self.dynamic_activations and self.qweight.device.type == "cpu" and _ONEDNN_QLINEAR:
            self.qweight = torch.ops.onednn.qlinear_prepack(self.qweight, None)
            self._weight_scales = self.scales.float()  # what the op takes: fp32 per output row, zero points 0
            self._zero_points = torch.zeros(1, dtype=torch.int64)
            self._packed_key = id(self)
            _PREPACKED[self._packed_key] = self

    def _unpack(self) -> None:
        self.qweight, self._packed_key = self.int8_weight(), None

    def _apply(self, fn, recurse=True):
        """Moves and casts (`.to`, `.half()`, `.cuda()`) start from the plain weight: the opaque one has no storage."""
        if not self.prepacked:
            return super()._apply(fn, recurse)
        self._unpack()
        super()._apply(fn, recurse)
        self._pack()
        return self

    def __getstate__(self):  # deepcopy and pickle see the plain weight, and the copy packs it again
        state = dict(super().__getstate__())
        if self.prepacked:
            state["_buffers"] = {**state["_buffers"], "qweight": self.int8_weight()}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._packed_key is not None:
            self._packed_key = None
            self._pack()

    @property
    def prepacked(self) -> bool:
        return self._packed_key is not None

    def int8_weight(self) -> torch.Tensor:
        """q as a plain int8 [out, in] tensor (a copy when the weight is prepacked)."""
        return self.qweight.to_dense().t().contiguous() if self.prepacked else self.qweight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.prepacked:
            destination[prefix + "qweight"] = self.int8_weight()  # never the opaque layout

    def _load_from_state_dict(self, *args, **kwargs):  # a plain state loads into the plain weight, then is packed
        packed = self.prepacked
        if packed:
            self._unpack()
        super()._load_from_state_dict(*args, **kwargs)
        if packed:
            self._pack()

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().to(self.compute_dtype) * self.scales[:, None]

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.dynamic_activations:
            return self._int_matmul(x2)
        if x2.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        return F.linear(x2, self.dequantized())  # no int8 weight-only kernel assumed elsewhere: dequantize per call

    def _int_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        a = x2.float()
        sx = a.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0  # [m, 1]
        qx = (a / sx).round_()  # not in place: a may be the caller's fp32 input
        m = qx.shape[0]
        if self.prepacked:  # qx + 128 as uint8 with zero point 128: the same sums (signed s8 has no fast kernel)
            qx = qx.add_(128).to(torch.uint8)
            if torch.compiler.is_compiling():
                y = onednn_qlinear(qx, self._packed_key, self.out_features)
            else:
                y = _onednn_qlinear(qx, self)
            return (y * sx).to(self.compute_dtype)  # fp32(acc) * scale, then * sx: as below
        qx = qx.to(torch.int8)
        if x2.device.type == "cuda" and m <= 16:  # CUDA's _int_mm wants more than 16 rows
            qx = F.pad(qx, (0, 0, 0, 17 - m))
        acc = torch._int_mm(qx, self.qweight.t())[:m]  # [m, out] int32; the transposed view is the fast layout
        return (acc.float() * self.scales.float() * sx).to(self.compute_dtype)

    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y @ W, W rebuilt a block of rows at a time."""
        rows = max(1, DEQUANT_BLOCK_ELEMENTS // self.in_features)
        q = self.int8_weight()
        grad_x = torch.zeros(grad_y.shape[0], self.in_features, dtype=grad_y.dtype, device=grad_y.device)
        for r in range(0, self.out_features, rows):
            w = q[r : r + rows].to(self.compute_dtype) * self.scales[r : r + rows, None]
            grad_x.addmm_(grad_y[:, r : r + rows], w.to(grad_y.dtype))
        return grad_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x)


class Int4Linear(nn.Module):
    """Asymmetric int4 in groups of `group` inputs: w = q * scale + min, q in 0..15.

    `packed` is in the kernel's own layout for the device the model runs on (CPU and CUDA
    layouts differ); `scales_and_zeros` is [in/group, out, 2] (scale, min + 8*scale) as the
    kernels take it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, group: int):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype, self.group = in_features, out_features, dtype, group
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group, out_features, 2, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @staticmethod
    def quantize_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 rows [n, in] -> (q int32 [n, in] in 0..15, scale [n, in/group], min [n, in/group])."""
        n, k = w.shape
        g = w.view(n, k // group, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = (hi - lo).clamp(min=1e-8) / 15.0
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        return q.view(n, k), scale, lo

    @classmethod
    @torch.no_grad()
    def quantize(cls, w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `w` (anything sliceable by rows) -> (nibbles uint8 [out, in/2]: byte j of row r is
        q[r, 2j] << 4 | q[r, 2j+1]; fp32 scales_and_zeros [in/group, out, 2]), a block of rows at a time."""
        n, k = w.shape
        nibbles = torch.empty(n, k // 2, dtype=torch.uint8)
        sz = torch.empty(k // group, n, 2, dtype=torch.float32)
        for r in range(0, n, _ROWS_PER_CHUNK):
            rows = slice(r, min(r + _ROWS_PER_CHUNK, n))
            q, scale, lo = cls.quantize_rows(w[rows].to(device="cpu", dtype=torch.float32), group)
            sz[:, rows, 0], sz[:, rows, 1] = scale.T, (lo + 8 * scale).T
            nibbles[rows] = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return nibbles, sz

    def set_weight(self, w: torch.Tensor, device: torch.device | str) -> None:
        self.set_quantized(*self.quantize(w, self.group), device)

    @torch.no_grad()
    def set_quantized(self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, device: torch.device | str) -> None:
        """From `quantize`'s layout to the kernel's own for `device` (CPU: a block of rows at a time;
        `nibbles` may be anything sliceable by rows, such as `StoredRows`)."""
        device = torch.device(device)
        if device.type == "cpu":
            packed = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8)
            for r in range(0, self.out_features, _ROWS_PER_CHUNK):
                b = nibbles[r : r + _ROWS_PER_CHUNK]
                q = torch.stack([b >> 4, b & 15], dim=2).view(b.shape[0], self.in_features).to(torch.int32)
                packed[r : r + _ROWS_PER_CHUNK] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles[:].to(device), 8)
        self.packed = packed
        self.scales_and_zeros = scales_and_zeros.to(device=device, dtype=self.compute_dtype)

    def matmul(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.contiguous()
        if x2.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_and_zeros)
        return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group, self.scales_and_zeros)

    def dequantized_columns(self, k0: int, k1: int) -> torch.Tensor:
        """W[:, k0:k1]^T ([k1 - k0, out]) as the kernel sees it: the kernel applied to I[k0:k1]."""
        eye = torch.zeros(k1 - k0, self.in_features, dtype=self.compute_dtype, device=self.packed.device)
        eye[torch.arange(k1 - k0), torch.arange(k0, k1)] = 1
        return self.matmul(eye)

    def _column_block(self) -> int:
        return max(1, DEQUANT_BLOCK_ELEMENTS // self.out_features)

    def _row_block(self) -> int | None:
        """Rows per block when the packed layout can be read directly (CPU, out a multiple of 64), else None."""
        if self.packed.device.type != "cpu" or self.out_features % _CPU_INT4_TILE:
            return None
        return max(1, DEQUANT_BLOCK_ELEMENTS // self.in_features // _CPU_INT4_TILE) * _CPU_INT4_TILE

    def dequantized_rows(self, r0: int, r1: int) -> torch.Tensor:
        """W[r0:r1] from the CPU layout (r0, r1 multiples of 64): tiles of 64 rows, each [in, 32] bytes,
        byte (k, i) holding row i in its low nibble and row 32 + i in its high one (torch 2.13's
        `_convert_weight_to_int4pack_for_cpu`; the tests check it against the kernel's output)."""
        tiles = self.packed.view(-1).view(self.out_features // _CPU_INT4_TILE, self.in_features, _CPU_INT4_TILE // 2)
        t = tiles[r0 // _CPU_INT4_TILE : r1 // _CPU_INT4_TILE]
        q = torch.cat([t & 15, t >> 4], dim=2).permute(0, 2, 1).reshape(r1 - r0, self.in_features // self.group, self.group)
        sz = self.scales_and_zeros[:, r0:r1].float().transpose(0, 1)  # [rows, in/group, 2]: scale, min + 8 * scale
        w = (q.float() - 8).mul_(sz[..., 0:1]).add_(sz[..., 1:2])
        return w.view(r1 - r0, self.in_features).to(self.compute_dtype)

    def dequantized(self) -> torch.Tensor:
        if self._row_block() is not None:
            return self.dequantized_rows(0, self.out_features)
        step = self._column_block()
        return torch.cat([self.dequantized_columns(k, min(k + step, self.in_features)).T
                          for k in range(0, self.in_features, step)], dim=1)

    def input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y @ W, W rebuilt a block of rows (CPU layout) or columns (any layout) at a time."""
        rows = self._row_block()
        if rows is not None:
            grad_x = torch.zeros(grad_y.shape[0], self.in_features, dtype=grad_y.dtype, device=grad_y.device)
            for r in range(0, self.out_features, rows):
                r1 = min(r + rows, self.out_features)
                grad_x.addmm_(grad_y[:, r:r1], self.dequantized_rows(r, r1).to(grad_y.dtype))
            return grad_x
        step = self._column_block()
        grad_x = torch.empty(grad_y.shape[0], self.in_features, dtype=grad_y.dtype, device=grad_y.device)
        for k in range(0, self.in_features, step):
            k1 = min(k + step, self.in_features)
            grad_x[:, k:k1] = grad_y @ self.dequantized_columns(k, k1).to(grad_y.dtype).T
        return grad_x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(self, x)


QuantLinear = (Int8Linear, Int4Linear)


class WeightOnlyMatmul(torch.autograd.Function):
    """x2 @ W^T through the layer's weight-only kernel, differentiable in x2 (W stays frozen)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer.matmul(x2)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        return ctx.layer.input_grad(grad_y.contiguous()), None


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, layer.in_features).to(layer.compute_dtype)
    y = WeightOnlyMatmul.apply(x2, layer) if torch.is_grad_enabled() and x2.requires_grad else layer.matmul(x2)
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)


def quantized_linear(linear: nn.Linear, mode: str, dtype: torch.dtype) -> nn.Module:
    """An empty quantized twin of `linear` (filled later by `set_weight`)."""
    n, k = linear.out_features, linear.in_features
    group = int4_group_size(k) if mode == "int4" and n % 16 == 0 else None  # the int4 kernel packs 16 rows together
    if group is None:
        return Int8Linear(k, n, linear.bias is not None, dtype, dynamic_activations=mode == "w8a8")
    return Int4Linear(k, n, linear.bias is not None, dtype, group)


def quantize_modules(model: nn.Module, mode: str, dtype: torch.dtype, vision: bool = False, lm_head: bool = True) -> list[str]:
    """Swap the linears named in the module docstring for quantized twins, in place.

    Called on a meta-device model before loading (the twins are then filled tensor by tensor)
    or on a loaded model (the twins are filled from the current weights). `lm_head=False` keeps the
    LM head in `dtype` (QLoRA training: the chunked loss reads its weight). Returns the swapped names.
    """
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and _wanted(name, vision) and (lm_head or name != "decoder.lm_head")]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        layer_mode = "w8a8" if name == "decoder.lm_head" else mode
        with torch.device("meta") if old.weight.is_meta else torch.device(old.weight.device):
            new = quantized_linear(old, layer_mode, dtype)
        if not old.weight.is_meta:
            new.set_weight(old.weight.detach(), old.weight.device)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.detach().to(dtype), requires_grad=False)
        setattr(parent, leaf, new)
    return targets


def _wanted(name: str, vision: bool) -> bool:
    if name.startswith("decoder."):
        return True  # the blocks' linears and lm_head (embed_tokens is an Embedding)
    # the patch embedding stays: its width is the input's (768), and the encoder reads its dtype
    return vision and name.startswith(("vision.", "projector.")) and not name.endswith("patch_embedding")


def stored_layout(layer: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a pre-quantized folder holds for a quantized layer in place of its weight: leaf -> (shape, dtype)."""
    n, k = layer.out_features, layer.in_features
    if isinstance(layer, Int8Linear):
        return {"qweight": ((n, k), torch.int8), "scales": ((n,), layer.compute_dtype)}
    return {"scales_and_zeros": ((k // layer.group, n, 2), layer.compute_dtype), "nibbles": ((n, k // 2), torch.uint8)}


def stored_tensors(layer: nn.Module, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`stored_layout`'s tensors for `layer` (meta or not) from its full-precision weight `w`."""
    if isinstance(layer, Int8Linear):
        q, scales = Int8Linear.quantize(w)
        return {"qweight": q, "scales": scales.to(layer.compute_dtype)}
    nibbles, sz = Int4Linear.quantize(w, layer.group)
    return {"nibbles": nibbles, "scales_and_zeros": sz.to(layer.compute_dtype)}


def load_stored(layer: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str) -> None:
    """Fill a quantized layer from `stored_tensors`' output."""
    if isinstance(layer, Int8Linear):
        layer.set_quantized(tensors["qweight"], tensors["scales"], device)
    else:
        layer.set_quantized(tensors["nibbles"], tensors["scales_and_zeros"], device)


def quantized_name(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """(quantized module, leaf) if parameter `name` belongs to a quantized linear, else None."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return (module, leaf) if isinstance(module, QuantLinear) else None
