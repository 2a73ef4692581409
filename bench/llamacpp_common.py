"""What the llama.cpp benchmarks share: llama.cpp's converter and quantizer run as a user runs them,
a greedy llama-cpp-python side, and phi4rv's greedy side over the same prompt ids.

llama-cpp-python is not a phi4rv dependency; the setup is in `interop_llamacpp.py`'s docstring.
The scripts set OMP_WAIT_POLICY=PASSIVE before torch and llama.cpp start their OpenMP runtimes:
on a machine shared with other work, spinning threads burn their time slices (here, 2 cores at
load ~10, both sides decoded 5-7x slower without it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from phi4rv.config import DecoderConfig, Phi4RVConfig, VisionConfig
from phi4rv.generation.generate import GenerationParams, Request, generate
from phi4rv.model import Phi4RV
from phi4rv.processing.tokenizer import Tokenizer


def add_llamacpp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree (the sdist's vendor/llama.cpp)")
    p.add_argument("--converter-path", default=None,
                   help="prepended to PYTHONPATH for the converter (a folder with transformers 4 installed)")


def check_llamacpp(source: Path):
    """The llama_cpp module, or a one-line exit saying what is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: see the setup in bench/interop_llamacpp.py's docstring") from None
    if not (source / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{source} has no convert_hf_to_gguf.py: pass the sdist's vendor/llama.cpp")
    return llama_cpp


def mid_config(tiny: bool) -> Phi4RVConfig:
    """A ~0.3B Phi-4-shaped decoder (Phi-4's vocabulary, GQA 4:1, head dim 64) and a small vision tower."""
    if tiny:
        decoder = DecoderConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=4096)
    else:
        decoder = DecoderConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                                num_key_value_heads=4, max_position_embeddings=4096)
    vision = VisionConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3)
    return Phi4RVConfig(vision=vision, decoder=decoder,
                        vision_tower="phi4rv/siglip2-mid-patch16-naflex", min_num_patches=16, max_num_patches=256,
                        max_length=4096)


def convert(llama_cpp: Path, converter_path: str | None, ckpt: Path, out: Path, outtype: str, mmproj: bool = False) -> tuple[float, str]:
    """Run llama.cpp's converter as a user would; returns (seconds, the log's last lines)."""
    env = dict(os.environ)
    paths = [p for p in (converter_path, str(llama_cpp / "gguf-py"), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(out), "--outtype", outtype]
    if mmproj:
        cmd.append("--mmproj")
    t0 = time.perf_counter()
    # stdin closed: the converter asks whether to run the checkpoint's remote code (auto_map) and must hear "no"
    p = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
    if p.returncode != 0:
        raise SystemExit(f"conversion to {outtype}{' (mmproj)' if mmproj else ''} failed:\n{tail}")
    return dt, tail


_QUANTIZE = """
import sys, llama_cpp
src, out, ftype, threads, output_type = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(ftype), int(threads)
if output_type != "default":
    params.output_tensor_type = int(output_type)
sys.exit(llama_cpp.llama_model_quantize(src.encode(), out.encode(), params))
"""


def quantize(src: Path, out: Path, ftype: int, threads: int, output_tensor_type: int | None = None) -> float:
    """llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs) on a GGUF file,
    in a child process (its per-tensor log captured, its memory not counted here); returns seconds.
    `output_tensor_type` None keeps llama.cpp's choice for output.weight (Q6_K under Q4_0)."""
    output = "default" if output_tensor_type is None else str(output_tensor_type)
    cmd = [sys.executable, "-c", _QUANTIZE, str(src), str(out), str(ftype), str(threads), output]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])
        raise SystemExit(f"llama_model_quantize {src.name} -> {out.name} failed (status {p.returncode}):\n{tail}")
    return dt


def gguf_field(path: Path, key: str) -> str | None:
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields.get(key)
    return None if f is None else bytes(f.parts[f.data[0]]).decode()


def gguf_tensor_bytes(path: Path) -> dict[str, tuple[str, int]]:
    """Every tensor of a GGUF file: name -> (its type's name, bytes as stored)."""
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(str(path)).tensors}


class LlamaSide:
    def __init__(self, path: Path, threads: int, n_ctx: int, f32_cache: bool = False, logits_all: bool = True):
        from llama_cpp import GGML_TYPE_F32, Llama

        # llama.cpp keeps K and V in f16 by default; an f32 model can get an f32 cache to be f32 throughout.
        # `logits_all` (needed by `logprobs_of`) also makes the prefill compute the LM head at every position.
        cache = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_cache else {}
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads,
                         logits_all=logits_all, verbose=False, **cache)

    def last_logits(self) -> np.ndarray:
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def greedy(self, prompt: list[int], n: int) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out = []
        for i in range(n):
            out.append(int(np.argmax(self.last_logits())))
            if i < n - 1:
                llm.eval([out[-1]])
        t2 = time.perf_counter()
        return {"tokens": out, "prefill_s": t1 - t0, "decode_s": t2 - t1}

    def logprobs_of(self, prompt: list[int], tokens: list[int]) -> list[float]:
        """Teacher-forced: the log-probability of each of `tokens` after the prompt and the ones before it."""
        llm = self.llm
        llm.reset()
        llm.eval(prompt + tokens[:-1])
        start = len(prompt) - 1
        return [float(log_softmax(llm.scores[start + i])[t]) for i, t in enumerate(tokens)]


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    m = row.max()
    return row - m - np.log(np.exp(row - m).sum())


def phi4rv_greedy(model: Phi4RV, tok: Tokenizer, prompt: list[int], n: int) -> dict:
    """Exactly `n` greedy tokens (no stop ids); prefill and decode seconds from `generate`'s timing."""
    timing: dict[str, float] = {}
    g = generate(model, tok, [Request(input_ids=prompt)], GenerationParams(max_new_tokens=n), timing)[0]
    return {"tokens": g.token_ids, "logprobs": g.logprobs, "prefill_s": timing["prefill"], "decode_s": timing["decode"]}


def agreement(tokens: list[int], ref: list[int]) -> int:
    """Length of the common prefix: after the first different token the continuations are unrelated."""
    n = 0
    for a, b in zip(tokens, ref):
        if a != b:
            break
        n += 1
    return n
