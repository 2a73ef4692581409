"""int4 products on CPU by ONNX Runtime's `MatMulNBits` (its MLAS kernels).

The activations are quantized to int8 in blocks and multiplied with the nibbles by integer dot
products (AVX512-VNNI / AVX-VNNI where the CPU has them), as llama.cpp's Q4_0 does. At the 15B's
widths on this machine's CPU that streams the weights 1.3-1.6x faster than PyTorch's
`aten._weight_int4pack_mm_for_cpu` at one row and runs 1.7-2x faster at 64 rows (bench/README.md).
Its weight format is ours: 4-bit codes in groups along the input with a float scale and an
integer zero point per group.

One inference session per layer, holding the layer's only copy of the weights (MLAS packs them
when the session is made). Sessions share one global thread pool of `torch.get_num_threads()`
threads, set when the first is made, whose threads sleep between calls rather than spin (the
cores are shared with torch's own threads).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

try:
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError:  # optional: without it int4 runs on PyTorch's own kernel
    ort = None

_POOL_THREADS: list[int] = []  # the global pool's size, once set (ONNX Runtime takes it once per process)
_LAYERS: weakref.WeakValueDictionary[int, NBitsMatmul] = weakref.WeakValueDictionary()


def available() -> bool:
    return ort is not None


def _options() -> ort.SessionOptions:
    if not _POOL_THREADS:
        _POOL_THREADS.append(torch.get_num_threads())
        ort.set_global_thread_pool_sizes(_POOL_THREADS[0], 1)
    opts = ort.SessionOptions()
    opts.use_per_session_threads = False
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def _in_memory(name: str, a: np.ndarray) -> TensorProto:
    """An initializer whose data the session options supply (`add_external_initializers`)."""
    t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="in-memory")
    return t


class NBitsMatmul:
    """y = x @ W^T for W [n, k] stored as codes q (0..15), scales s and zero points z per `group`
    inputs: W[r, j] = (q[r, j] - z[r, j // group]) * s[r, j // group]. Outputs fp32."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int):
        """codes: uint8 [n, k/2], element 2j in the low nibble; scales: fp32 [n, k/group]; zeros:
        uint8 [n, k/group]. The tensors are handed to the session in place (no copy in a model
        file); it packs `codes` into its own layout, so the caller's copy may go once this returns."""
        n, k = codes.shape[0], codes.shape[1] * 2
        blocks = k // group
        packed_zeros = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)  # two per byte, low nibble first
        packed_zeros[:, : (blocks + 1) // 2] |= zeros[:, 0::2]
        packed_zeros[:, : blocks // 2] |= zeros[:, 1::2] << 4
        weights = {"codes": codes.reshape(n, blocks, group // 2), "scales": np.ascontiguousarray(scales.reshape(-1)),
                   "zeros": packed_zeros}
        node = helper.make_node("MatMulNBits", ["x", *weights], ["y"], domain="com.microsoft",
                                K=k, N=n, bits=4, block_size=group, accuracy_level=4)  # 4: int8 activations
        graph = helper.make_graph(
            [node], "int4_linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
            initializer=[_in_memory(name, a) for name, a in weights.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        opts = _options()
        opts.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()])
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self._small = (weights["scales"], weights["zeros"])  # kept: the session may read them unpacked
        self.in_features, self.out_features = k, n
        _LAYERS[id(self)] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()  # [m, k]
        y = torch.empty(x.shape[0], self.out_features)
        io = self.session.io_binding()
        io.bind_input("x", "cpu", 0, np.float32, list(x.shape), x.data_ptr())
        io.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.data_ptr())
        self.session.run_with_iobinding(io)
        return y


@torch.library.custom_op("phi4rv::nbits_matmul", mutates_args=())
def nbits_matmul(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """The product for compiled code, which cannot trace a session: the layer is named by a key."""
    return _LAYERS[key](x)


@nbits_matmul.register_fake
def _(x, key, out_features):
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)
