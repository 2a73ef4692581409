"""Cost of grammar-constrained decoding per generated token: the same model and prompt decoded
free and under a JSON schema (and `json_object`), alternating run by run.

Each run makes exactly `--new-tokens` tokens (no stop ids: the constrained side's grammar keeps
masking until the budget ends, so both sides decode the same number of steps); the figure is
decode time per token. The grammar's one-time compilation is timed apart.

    python bench/structured.py                 # tiny preset (the suite's model), batch 1 and 4
    python bench/structured.py --json out/structured.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, machine, print_machine, print_table, setup, write_json

from phi4rv.config import preset
from phi4rv.generation.core import GenerationParams, Request
from phi4rv.generation.generate import generate
from phi4rv.generation.grammar import JSON_OBJECT_SCHEMA, Grammar
from phi4rv.generation.sampling import SamplingParams
from phi4rv.model import Phi4RV
from phi4rv.processing.chat import encode_chat
from phi4rv.processing.tokenizer import Tokenizer, build_phi4_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}}},
          "required": ["name", "n", "tags"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    add_common_args(p, repeats=5)
    args = p.parse_args()
    device, dtype = setup(args)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        build_phi4_tokenizer(tok_dir)
        tok = Tokenizer.from_dir(tok_dir)
    model = Phi4RV(preset(args.preset))
    model.init_weights(std=0.5)
    model = model.to(device=device, dtype=dtype).eval()
    prompt = encode_chat(tok, [{"role": "user", "content": "A record as JSON."}], mode="nothink").input_ids

    grammars = {}
    for name, schema in (("schema", SCHEMA), ("json_object", JSON_OBJECT_SCHEMA)):
        t0 = time.perf_counter()
        grammars[name] = Grammar.from_schema(schema, tok)
        grammars[name].distance(grammars[name].index.get_initial_state())  # the budget table too
        print(f"compile {name}: {time.perf_counter() - t0:.2f} s")

    print_machine(machine(device, dtype))
    figures = {"machine": machine(device, dtype), "new_tokens": args.new_tokens, "runs": {}}
    rows = []
    for b in args.batch:
        requests = [Request(list(prompt), mode="nothink") for _ in range(b)]

        def run(grammar):
            params = GenerationParams(max_new_tokens=args.new_tokens, sampling=SamplingParams(temperature=0),
                                      grammar=grammar)
            timing: dict[str, float] = {}
            generate(model, tok, requests, params, timing)
            return timing["decode"] / (args.new_tokens - 1)

        sides = {"free": lambda: run(None), **{k: (lambda g=g: run(g)) for k, g in grammars.items()}}
        per_token = {k: [] for k in sides}
        for _ in range(args.warmup):
            for fn in sides.values():
                fn()
        for _ in range(args.repeats):  # alternate the sides run by run
            for k, fn in sides.items():
                per_token[k].append(fn())
        free = sorted(per_token["free"])
        for k, xs in per_token.items():
            xs = sorted(xs)
            ratio_med = xs[len(xs) // 2] / free[len(free) // 2]
            rows.append([b, k, xs[0] * 1e3, xs[len(xs) // 2] * 1e3, ratio_med, xs[0] / free[0]])
            figures["runs"][f"{k}_b{b}"] = {"per_token_s": xs, "overhead_median": ratio_med - 1}
    print_table(["batch", "side", "min ms/token", "median ms/token", "median ratio", "min ratio"], rows)
    print("(ratio = constrained / free decode time per token; goal <= 1.10)")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
