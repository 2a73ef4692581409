"""`phi4rv serve --model CHECKPOINT`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phi4rv.checkpoint import DTYPES
from phi4rv.generation.cache import KVCacheTooLarge, check_fits
from phi4rv.generation.compiled import COMPILE_MODES
from phi4rv.serve.engine import context_length


def cmd_serve(args: argparse.Namespace) -> None:
    from phi4rv.chat_model import ChatModel
    from phi4rv.serve.app import ServeSettings, create_app, run

    if args.allow_local_images is not None and not args.allow_local_images.is_dir():
        raise FileNotFoundError(f"--allow-local-images: not a folder: {args.allow_local_images}")

    settings = ServeSettings(
        served_model_name=args.served_model_name or args.model.resolve().name,
        api_key=args.api_key,
        max_batch=args.max_batch or ServeSettings.max_batch,
        max_context=args.max_context,
        max_queue=args.max_queue,
        allow_local_images=args.allow_local_images,
        allow_remote_images=args.allow_remote_images,
        max_images=args.max_images,
        request_timeout=args.request_timeout,
        default_max_tokens=args.default_max_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_image_pixels=args.max_image_pixels,
        max_request_pixels=args.max_request_pixels,
        image_timeout=args.image_timeout,
        allow_special_tokens=args.allow_special_tokens,
        prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
        image_cache_bytes=int(args.image_cache_mb * 2**20),
    )

    def refuse(e: KVCacheTooLarge) -> None:
        """The default batch is "8, or as many as fit"; a batch the user asked for is never shrunk."""
        if args.max_batch is not None or e.fit_slots == 0:
            raise ValueError(e.hint("--max-batch {}", "--max-context {}")) from None

    def check_kv_cache(cfg, dtype, free) -> None:  # before the weights are read: an estimate
        try:
            check_fits(cfg.decoder, settings.max_batch, context_length(cfg, settings.max_context), dtype, free,
                       settings.prefix_cache_bytes + settings.image_cache_bytes)
        except KVCacheTooLarge as e:
            refuse(e)

    cm = ChatModel.load(args.model, dtype=args.dtype, device=args.device, max_num_patches=args.max_num_patches,
                        quantize=args.quantize, compile=args.compile_mode or args.compile, before_read=check_kv_cache)
    try:
        app = create_app(cm, settings)
    except KVCacheTooLarge as e:  # measured once loaded
        refuse(e)
        settings.max_batch = e.fit_slots
        app = create_app(cm, settings)
        print(f"{e.head}: serving {e.fit_slots} at once (--max-batch, --max-context to choose)", file=sys.stderr)
    engine = app.state.engine
    print(f"serving {settings.served_model_name!r} on http://{args.host}:{args.port} "
          f"({engine.core.cache.k[0].shape[0]} slots x {engine.slot_len} tokens, KV cache {engine.core.cache.nbytes / 2**20:.1f} MiB)",
          file=sys.stderr, flush=True)
    run(app, args.host, args.port, args.log_level)


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    s.add_argument("--model", required=True, type=Path)
    s.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    s.add_argument("--max-batch", type=int, default=None,
                   help="sequences decoded together (KV cache slots; default 8, or as many as fit in memory)")
    s.add_argument("--max-context", type=int, default=None,
                   help="positions per sequence, prompt and answer together (KV cache slot length; default: the model's max_length)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    s.add_argument("--max-images", type=int, default=8, help="images per request")
    s.add_argument("--request-timeout", type=float, default=600.0, help="seconds")
    s.add_argument("--default-max-tokens", type=int, default=4096, help="when a request sets no max_tokens")
    s.add_argument("--allow-local-images", type=Path, default=None, metavar="DIR", help="serve image paths under DIR")
    s.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    s.add_argument("--max-body-mb", type=float, default=64, help="request body limit, chunked bodies included")
    s.add_argument("--max-image-pixels", type=int, default=36_000_000, help="per image, checked before decoding")
    s.add_argument("--max-request-pixels", type=int, default=100_000_000, help="all images of one request")
    s.add_argument("--image-timeout", type=float, default=30.0, help="seconds for a request's image work")
    s.add_argument("--allow-special-tokens", action="store_true",
                   help="let message text spell control tokens (default: encoded as plain text)")
    s.add_argument("--prefix-cache-mb", type=float, default=256, help="KV of shared prompt prefixes (0 = off)")
    s.add_argument("--image-cache-mb", type=float, default=256,
                   help="processed images kept by content, for images sent again (0 = off)")
    s.add_argument("--max-num-patches", type=int, default=None,
                   help="patch budget of an image whose detail is auto or unset (default: the checkpoint's maximum)")
    s.add_argument("--dtype", default=None, choices=list(DTYPES))
    s.add_argument("--device", default=None)
    s.add_argument("--quantize", default=None, metavar="int8|int4|w8a8", help="quantize the decoder's linears at load time (int8, int4: weight-only; w8a8: int8 weights and activations)")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step (prefill stays eager); the first tokens pay the compile")
    s.add_argument("--compile-mode", default=None, choices=COMPILE_MODES, help="torch.compile mode (implies --compile; default: default); reduce-overhead = CUDA graphs, untested")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=cmd_serve)
