"""`phi4rv train CONFIG [key=value ...] [--resume RUN_DIR] [--plan [--world N] [--device-memory 24GB]]`, also under
`torchrun -m phi4rv train`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from phi4rv.train.config import ConfigError, load_config


def cmd_train(args: argparse.Namespace) -> None:
    from phi4rv.train.loop import run, saved_config

    if args.config is not None and "=" in args.config.name and not args.config.exists():
        args.overrides.insert(0, str(args.config))  # `--resume DIR key=value`: no config file given
        args.config = None
    if args.resume is not None:
        saved = saved_config(args.resume)
        if args.config is None:
            cfg = load_config(None, args.overrides, base=saved)
        else:
            cfg = load_config(args.config, args.overrides)
            differs = sorted(k for k in _flat(cfg.to_dict()) if _flat(cfg.to_dict()).get(k) != _flat(saved).get(k) and k != "run_dir")
            if differs:
                print(f"phi4rv train: note: the config differs from the run's saved one in {', '.join(differs[:8])}")
        cfg.run_dir = str(args.resume)
    else:
        if args.config is None:
            raise ConfigError("give a CONFIG file (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
    if args.plan:
        from phi4rv.train.config import parse_size

        try:
            memory = parse_size(args.device_memory) if args.device_memory else None
        except ValueError as e:
            raise ConfigError(f"--device-memory: {e}") from None
        print(memory_plan_report(cfg, args.world, args.plan_device, memory))
        return
    run(cfg, resume=args.resume is not None)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun with gloo (torch 2.13) a process can abort while the interpreter finalizes,
        # after the run completed and the process group was destroyed ("terminate called without
        # an active exception", SIGABRT: 2 runs in 9 of 4 processes on a loaded 2-core machine),
        # and torchrun then reports the whole run failed. Every file is closed by now: leave
        # without finalizing.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def memory_plan_report(cfg, world: int, device: str, device_memory: int | None) -> str:
    from phi4rv.train.plan import options_that_fit, plan_memory
    from phi4rv.train.setup import load_tokenizer, model_config

    if world < 1:
        raise ConfigError(f"--world must be >= 1, got {world}")
    mc = model_config(cfg, None, load_tokenizer(cfg))
    out = []
    for name in cfg.stages:
        plan = plan_memory(cfg, name, mc, world, device, device_memory)
        out.append(plan.format())
        if plan.fits is False:
            options = options_that_fit(cfg, name, mc, world, device, device_memory)
            out.append("  would fit with: " + ("; ".join(options) if options else "none of the usual changes"))
    return "\n".join(out)


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "train",
        help="train or fine-tune in declarative stages (YAML); torchrun for several processes",
        description="Run the stages of a training config. Overrides are dotted keys, e.g. "
        "stages.instruction.train.decoder=2e-5 seed=1. The resolved config is written to RUN_DIR/config.yaml.",
    )
    s.add_argument("config", nargs="?", type=Path, help="YAML training config (optional with --resume)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    s.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    s.add_argument("--plan", action="store_true", help="print the memory plan per process and stage (no weights read) and exit")
    s.add_argument("--world", type=int, default=1, help="with --plan: number of processes (FSDP2 shards over them)")
    s.add_argument("--device-memory", default=None, metavar="SIZE", help="with --plan: memory per process, e.g. 24GB, 80GB")
    s.add_argument("--plan-device", default="cuda", choices=("cuda", "cpu"), help="with --plan: the runtime allowance (default cuda)")
    s.set_defaults(func=cmd_train)
