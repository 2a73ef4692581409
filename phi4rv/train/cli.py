"""`phi4rv train CONFIG [key=value ...] [--resume RUN_DIR]`, also under `torchrun -m phi4rv train`."""

from __future__ import annotations

import argparse
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
    run(cfg, resume=args.resume is not None)


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
    s.set_defaults(func=cmd_train)
