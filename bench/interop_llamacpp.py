"""llama.cpp interop, run by hand (not in CI): does llama.cpp take what phi4rv saves, and compute the same?

phi4rv saves a random mid-size checkpoint (Phi-4-shaped decoder, small SigLIP-2 tower); llama.cpp's own
converter (`convert_hf_to_gguf.py` from the llama-cpp-python source distribution, which vendors
llama.cpp) turns it into GGUF files (f32, bf16, q8_0) and a vision projector (`--mmproj`), with no
edits to the saved files. llama-cpp-python then decodes greedily from the same prompt ids as phi4rv
(the checkpoint loaded back by phi4rv, fp32 and bf16), both in this process, alternating runs:

- agreement: how many of the new tokens equal phi4rv fp32's greedy tokens (f32 must agree on all);
- logprob gap: llama.cpp's log-probability of phi4rv fp32's tokens (teacher-forced) minus phi4rv's;
- decode tokens/s of every side (min/median over the repeats) and their ratio;
- whether llama.cpp's multimodal library loads the projector next to the text model.

Setup (llama-cpp-python is not a phi4rv dependency):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install ./llama_cpp_python-0.3.36.tar.gz gguf   # compiles llama.cpp
    # llama.cpp's converter pins transformers 4 (requirements-convert_hf_to_gguf.txt); with transformers 5
    # it labels the tokenizer's pre-tokenizer wrongly (see bench/README.md). Give it its own copy:
    pip install --target /tmp/convert-env "transformers==4.57.6"
    python bench/interop_llamacpp.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp \\
        --converter-path /tmp/convert-env --threads 2
"""

from __future__ import annotations

import os

# Both sides' OpenMP threads yield instead of spinning while they wait. On a machine shared with other
# work, spinning threads burn their time slices: here (2 cores, load ~10) both llama.cpp and torch
# decoded 5-7x slower without it. Set before torch and llama.cpp start their OpenMP runtimes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, print_table, write_json
from llamacpp_common import (
    LlamaSide,
    add_llamacpp_args,
    agreement,
    check_llamacpp,
    convert,
    gguf_field,
    mid_config,
    phi4rv_greedy,
)

from phi4rv.checkpoint import load_model, save_checkpoint
from phi4rv.model import Phi4RV
from phi4rv.processing.tokenizer import NUM_REGULAR, Tokenizer, build_phi4_tokenizer

OUTTYPES = ("f32", "bf16", "q8_0")


def accepts_projector(side: LlamaSide, mmproj: Path, threads: int) -> bool:
    """Whether llama.cpp's multimodal library loads the projector next to the text model."""
    from llama_cpp import mtmd_cpp

    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = threads
    ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), side.llm.model, params)
    if not ctx:
        return False
    ok = bool(mtmd_cpp.mtmd_support_vision(ctx))
    mtmd_cpp.mtmd_free(ctx)
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_llamacpp_args(p)
    p.add_argument("--out", type=Path, default=None, help="keep the checkpoint and GGUF files here (default: temporary)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--f16-cache", action="store_true", help="llama.cpp f32 with its default f16 KV cache")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke test of the script)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    llama_cpp = check_llamacpp(args.llama_cpp)
    torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "phi4rv-mid"

    # 1. phi4rv saves a random checkpoint, as after fine-tuning: fp32 weights, Phi-4 tokenizer, release files.
    torch.manual_seed(args.seed)
    model = Phi4RV(mid_config(args.tiny))
    model.init_weights()
    with tempfile.TemporaryDirectory() as tok_dir:
        build_phi4_tokenizer(tok_dir, model_max_length=model.cfg.max_length)
        tok = Tokenizer.from_dir(tok_dir)
    save_checkpoint(model, ckpt, tokenizer=tok)
    n_params = sum(t.numel() for t in model.decoder.parameters())
    del model

    # 2. llama.cpp's converter, on the folder as saved.
    converted, ggufs = {}, {}
    for outtype in OUTTYPES:
        ggufs[outtype] = root / f"phi4rv-mid-{outtype}.gguf"
        converted[outtype], _ = convert(args.llama_cpp, args.converter_path, ckpt, ggufs[outtype], outtype, False)
    mmproj = root / "phi4rv-mid-mmproj-f32.gguf"
    mmproj_s, _ = convert(args.llama_cpp, args.converter_path, ckpt, mmproj, "f32", True)
    pre = gguf_field(ggufs["f32"], "tokenizer.ggml.pre")

    # 3. The same prompt ids on every side.
    rng = np.random.default_rng(args.seed)
    prompt = [int(x) for x in rng.integers(0, NUM_REGULAR, args.prompt_tokens)]
    n = args.new_tokens
    ours = {"phi4rv fp32": load_model(ckpt, dtype=torch.float32), "phi4rv bf16": load_model(ckpt, dtype=torch.bfloat16)}
    theirs = {f"llama.cpp {t}": LlamaSide(ggufs[t], args.threads, args.prompt_tokens + n + 8, t == "f32" and not args.f16_cache)
              for t in OUTTYPES}
    projector_ok = accepts_projector(theirs["llama.cpp f32"], mmproj, args.threads)

    runs: dict[str, list[dict]] = {k: [] for k in [*ours, *theirs]}
    for _ in range(1 + args.repeats):  # the first round warms up and is dropped; sides alternate run by run
        for name, m in ours.items():
            runs[name].append(phi4rv_greedy(m, tok, prompt, n))
        for name, side in theirs.items():
            runs[name].append(side.greedy(prompt, n))
    runs = {k: v[1:] for k, v in runs.items()}

    ref = runs["phi4rv fp32"][-1]
    rows, figures = [], {}
    for name, rs in runs.items():
        rates = [(n - 1) / r["decode_s"] for r in rs]
        e2e = [n / (r["prefill_s"] + r["decode_s"]) for r in rs]
        fig = {"decode_tok_s_median": statistics.median(rates), "decode_tok_s_best": max(rates),
               "end_to_end_tok_s_median": statistics.median(e2e),
               "agree": agreement(rs[-1]["tokens"], ref["tokens"]),
               "same_every_run": all(r["tokens"] == rs[0]["tokens"] for r in rs)}
        if name in theirs:
            lp = theirs[name].logprobs_of(prompt, ref["tokens"])
        else:
            lp = phi4rv_greedy_logprobs(ours[name], prompt, ref["tokens"])
        gap = np.abs(np.array(lp) - np.array(ref["logprobs"]))
        fig["logprob_gap_max"], fig["logprob_gap_mean"] = float(gap.max()), float(gap.mean())
        figures[name] = fig
    base = {"fp32": figures["phi4rv fp32"]["decode_tok_s_median"], "bf16": figures["phi4rv bf16"]["decode_tok_s_median"]}
    for name, fig in figures.items():
        same_precision = base["bf16"] if ("bf16" in name or "q8_0" in name) else base["fp32"]
        rows.append([name, f"{fig['agree']}/{n}", f"{fig['logprob_gap_max']:.2e}", f"{fig['logprob_gap_mean']:.2e}",
                     f"{fig['decode_tok_s_median']:.1f}", f"{fig['decode_tok_s_best']:.1f}",
                     f"{fig['end_to_end_tok_s_median']:.1f}", f"{fig['decode_tok_s_median'] / same_precision:.2f}"])

    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, load avg {os.getloadavg()[0]:.2f}, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}; "
          f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}")
    print(f"model: {n_params / 1e6:.0f}M decoder parameters (vocab {NUM_REGULAR + 96}), prompt {args.prompt_tokens} ids, "
          f"{n} new tokens greedy, {args.repeats} timed rounds after 1 warm-up, sides alternating")
    print("conversion of phi4rv's save, unedited: " + ", ".join(f"{t} {s:.1f} s" for t, s in converted.items())
          + f", mmproj {mmproj_s:.1f} s; tokenizer.ggml.pre = {pre!r} (Phi-4's is 'dbrx')")
    print(f"llama.cpp KV cache: {'f16 for all' if args.f16_cache else 'f32 for the f32 model, f16 (its default) for the others'}")
    print(f"vision projector: llama.cpp's mtmd {'loads it and reports vision support' if projector_ok else 'REFUSES it'}")
    print_table(["side", "greedy agree (prefix)", "logprob gap max", "gap mean", "decode tok/s median",
                 "best", "end-to-end tok/s", "vs phi4rv same precision"], rows)
    print(f"peak RSS of this process (all sides loaded together): {peak_gib:.2f} GiB")
    write_json(args.json, {"figures": figures, "pre_tokenizer": pre, "projector_accepted": projector_ok,
                           "conversion_s": converted, "decoder_params": n_params, "peak_rss_gib": peak_gib})
    if figures["llama.cpp f32"]["agree"] != n:
        raise SystemExit(f"f32 greedy tokens disagree after {figures['llama.cpp f32']['agree']} of {n}")


def phi4rv_greedy_logprobs(model: Phi4RV, prompt: list[int], tokens: list[int]) -> list[float]:
    """Teacher-forced log-probabilities of `tokens` under a phi4rv model (one forward pass)."""
    ids = torch.tensor([prompt + tokens[:-1]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        h = model.decoder(model.decoder.embed_tokens(ids), positions, None, None)
        logits = model.decoder.lm_head(h[0, len(prompt) - 1:]).float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[i, t]) for i, t in enumerate(tokens)]


if __name__ == "__main__":
    main()
