"""The `phi4rv` command. init, info, quantize and chat are here; serve, train, eval, data and recipe
register themselves (`register(sub)` in their package's cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Before torch allocates anything: its CPU allocator then backs tensors of 2 MB and more with
# transparent huge pages, and streaming the weights at batch 1 runs 2-10% faster (bench/README.md).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch

from phi4rv.checkpoint import DTYPES, CheckpointError
from phi4rv.config import PRESETS, Phi4RVConfig, preset
from phi4rv.generation.compiled import COMPILE_MODES
from phi4rv.processing.image import ImageError


def cmd_init(args: argparse.Namespace) -> None:
    from phi4rv.checkpoint import init_checkpoint
    from phi4rv.processing.chat import DEFAULT_CHAT_TEMPLATE
    from phi4rv.processing.tokenizer import Tokenizer, build_phi4_tokenizer

    cfg = preset(args.preset)
    with tempfile.TemporaryDirectory() as tok_dir:
        build_phi4_tokenizer(tok_dir, model_max_length=cfg.max_length, chat_template=DEFAULT_CHAT_TEMPLATE)
        tokenizer = Tokenizer.from_dir(tok_dir)
    # weights are drawn and written one tensor at a time: the 15B preset never exists in memory
    init_checkpoint(cfg, args.out, DTYPES[args.dtype], seed=args.seed, tokenizer=tokenizer)
    n = parameter_counts(cfg)["total"]
    print(f"wrote {args.out}: preset {args.preset}, {n / 1e6:.1f}M parameters, {args.dtype}")


def cmd_quantize(args: argparse.Namespace) -> None:
    import time

    from phi4rv.checkpoint import save_quantized

    t0 = time.perf_counter()
    out = save_quantized(args.model, args.out, args.mode, vision=args.vision, dtype=args.dtype)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {out}: {args.mode}{' (vision too)' if args.vision else ''}, {size / 1e9:.2f} GB in "
          f"{len(files)} shard(s), {time.perf_counter() - t0:.0f} s; load it as any checkpoint (no --quantize needed)")


def parameter_counts(cfg: Phi4RVConfig) -> dict[str, int]:
    """Parameter counts per part, computed on the meta device (nothing is allocated)."""
    from phi4rv.model import Phi4RV

    with torch.device("meta"):
        model = Phi4RV(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = model.decoder
    used_vision = count(model.vision) - count(model.vision.encoder.layers[-1]) - count(model.vision.post_layernorm)
    return {
        "vision_encoder": count(model.vision),
        "vision_encoder_used": used_vision,
        "projector": count(model.projector),
        "decoder_embeddings": count(d.embed_tokens),
        "decoder_layers": count(d.layers) + count(d.norm),
        "lm_head": count(d.lm_head),
        "total": count(model),
    }


def cmd_info(args: argparse.Namespace) -> None:
    cfg = preset(args.preset) if args.preset else Phi4RVConfig.load(args.model)
    counts = parameter_counts(cfg)
    info = {
        "source": args.preset or str(args.model),
        "vision": vars(cfg.vision),
        "projector": {"type": "mlp2x_gelu", "input_size": cfg.vision.hidden_size, "output_size": cfg.decoder.hidden_size},
        "decoder": vars(cfg.decoder),
        "patches": {"min": cfg.min_num_patches, "max": cfg.max_num_patches, "patch_size": cfg.vision.patch_size},
        "parameters": counts,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    v, dc = cfg.vision, cfg.decoder
    print(f"{info['source']}")
    print(f"  vision   SigLIP-2 NaFlex: {v.num_hidden_layers} layers x {v.hidden_size} ({v.num_attention_heads} heads), "
          f"patch {v.patch_size}, {cfg.min_num_patches}-{cfg.max_num_patches} patches/image")
    print(f"  projector mlp2x_gelu: {v.hidden_size} -> {dc.hidden_size}")
    print(f"  decoder  Phi-3: {dc.num_hidden_layers} layers x {dc.hidden_size}, {dc.num_attention_heads} q / "
          f"{dc.num_key_value_heads} kv heads of {dc.head_dim}, rope theta {dc.rope_theta:g} "
          f"(rotary {dc.rotary_dim}/{dc.head_dim}), vocab {dc.vocab_size}")
    for name, n in counts.items():
        print(f"  {name:<20} {n:>16,}  ({n / 1e9:.3f}B)" if n >= 1e8 else f"  {name:<20} {n:>16,}  ({n / 1e6:.2f}M)")


def _messages(prompt: str, n_images: int) -> list[dict]:
    if "<image>" in prompt:
        return [{"role": "user", "content": prompt}]
    parts = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": parts}]


def cmd_chat(args: argparse.Namespace) -> None:
    from phi4rv.chat_model import ChatModel
    from phi4rv.generation.sampling import SamplingParams

    cm = ChatModel.load(args.model, dtype=args.dtype, device=args.device, max_num_patches=args.max_num_patches,
                        quantize=args.quantize, compile=args.compile_mode or args.compile)
    params = cm.params(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k),
        seed=args.seed,
        thinking_budget=args.thinking_budget,
        top_logprobs=args.top_logprobs,
    )
    if args.ground is not None:
        _ground(cm, args, params)
        return
    if args.prompt is not None:
        messages = _messages(args.prompt, len(args.image))
        if args.json:
            print(json.dumps(cm.chat(messages, args.image, args.mode, params).to_json()))
        else:
            _print_stream(cm, messages, args.image, args.mode, params)
        return
    # interactive: images attach to the first turn; the conversation is kept
    history: list[dict] = []
    images = list(args.image)
    print("phi4rv chat — empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            break
        if not line:
            break
        history += _messages(line, len(images) if not history else 0)
        if args.json:
            result = cm.chat(history, images, args.mode, params)
            print(json.dumps(result.to_json()))
            answer = result.answer
        else:
            answer = _print_stream(cm, history, images, args.mode, params)
        history.append({"role": "assistant", "content": answer})


def _ground(cm, args: argparse.Namespace, params) -> None:
    if len(args.image) != 1:
        raise ValueError("--ground needs exactly one --image")
    found, result = cm.ground(args.image[0], args.ground, params)
    if found is None:
        raise ValueError(f"no valid box in the model's answer: {result.answer[:200]!r}")
    print(json.dumps({**found.to_json(), "answer": result.answer}))
    if args.draw is not None:
        from PIL import Image, ImageDraw

        from phi4rv.processing.image import load_image

        img: Image.Image = load_image(args.image[0])
        draw = ImageDraw.Draw(img)
        x, y, w, h = found.pixels
        draw.rectangle([x, y, x + w, y + h], outline=(255, 0, 0), width=3)
        px, py = found.point
        draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(255, 0, 0))
        img.save(args.draw)


def _print_stream(cm, messages, images, mode, params) -> str:
    tty = sys.stdout.isatty()
    dim, reset = ("\033[2m", "\033[0m") if tty else ("", "")
    kind, answer = None, ""
    for delta in cm.stream(messages, images, mode, params):
        if delta.kind != kind:
            if kind is not None:
                print(reset)
            print(f"{dim}[thinking]" if delta.kind == "thinking" else "[answer]")
            kind = delta.kind
        if delta.kind == "answer":
            answer += delta.text
        print(delta.text, end="", flush=True)
    print(reset if kind == "thinking" else "")
    return answer.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="phi4rv", description="Phi-4-reasoning-vision in plain PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("init", help="write a random-weight checkpoint in the release format")
    s.add_argument("--preset", default="tiny", choices=list(PRESETS))
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="float32", choices=list(DTYPES))
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("quantize", help="write a pre-quantized copy of a checkpoint (loads faster, smaller on disk)")
    s.add_argument("model", type=Path, help="checkpoint folder")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--mode", required=True, metavar="int8|int4|w8a8", help="as --quantize at load time")
    s.add_argument("--vision", action="store_true", help="quantize the vision tower and projector too")
    s.add_argument("--dtype", default=None, choices=list(DTYPES), help="compute dtype (default: as stored)")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("info", help="shapes and parameter counts (computed without allocating weights)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("model", nargs="?", type=Path, help="checkpoint folder (or its config.json)")
    g.add_argument("--preset", choices=list(PRESETS))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("chat", help="chat with a checkpoint, optionally about images")
    s.add_argument("--model", required=True, type=Path)
    s.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    s.add_argument("--mode", default="auto", choices=["auto", "think", "nothink"])
    s.add_argument("--max-new-tokens", type=int, default=1024)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--thinking-budget", type=int, default=None, help="force </think> after N thinking tokens")
    s.add_argument("--top-logprobs", type=int, default=0)
    s.add_argument("--max-num-patches", type=int, default=None, help="patch budget per image (default: the checkpoint's maximum)")
    s.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: as stored")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--quantize", default=None, metavar="int8|int4|w8a8", help="quantize the decoder's linears at load time (int8, int4: weight-only; w8a8: int8 weights and activations)")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step (prefill stays eager); the first tokens pay the compile")
    s.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode (implies --compile; default: default); reduce-overhead = CUDA graphs, untested")
    s.add_argument("--json", action="store_true", help="print one JSON object per answer")
    s.add_argument("--ground", metavar="TARGET", help="locate a UI element in the --image: prints its pixel box and click point")
    s.add_argument("--draw", type=Path, metavar="OUT.png", help="with --ground: the image with the box and point drawn")
    s.add_argument("prompt", nargs="?", help="without a prompt: interactive session")
    s.set_defaults(func=cmd_chat)

    from phi4rv.data.cli import register as register_data
    from phi4rv.eval.cli import register as register_eval
    from phi4rv.recipe.cli import register as register_recipe
    from phi4rv.serve.cli import register as register_serve
    from phi4rv.train.cli import register as register_train

    for register in (register_serve, register_train, register_eval, register_data, register_recipe):
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ImageError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"phi4rv: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
