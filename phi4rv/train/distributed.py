"""One process or many: process group setup, FSDP2 sharding, collectives.

Under `torchrun` (RANK / WORLD_SIZE set) the model is sharded with FSDP2 `fully_shard`: each
decoder layer, each vision layer, the token embeddings and the LM head are their own units, the
rest (projector, vision embeddings, norms) belongs to the root. gloo on CPU, NCCL on GPU (one GPU per process, `LOCAL_RANK`). The optimizer
state is sharded along with the parameters (ZeRO-3; the paper used ZeRO-1).

Multi-node: run the same command on every node with a shared rendezvous, e.g.
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        -m phi4rv train CONFIG
`run_dir` must be on a filesystem all nodes share (every rank writes its shards of each checkpoint
and its RNG state; rank 0 the release-format weights and the final rename).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def say(d: Dist, msg: str) -> None:
    """A progress line on stderr, from the main process only (above any progress bar)."""
    if d.main:
        tqdm.write(msg, file=sys.stderr)


def init_distributed(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.barrier()  # no rank tears down its gloo pairs while another still uses them
        dist.destroy_process_group()


def shard_model(model: nn.Module, d: Dist, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: one unit per transformer layer (vision and decoder), the root holds the rest.

    With `param_dtype` (bf16 training) parameters are all-gathered and used in that dtype while the
    sharded masters, gradients' reduction and the optimizer stay in float32; this also lets frozen
    low-precision weights share a unit with float32 trainable ones (LoRA on a bf16 base).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for layer in model.vision.encoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # the embedding table and the LM head (100352 x 5120 each in the 15B) are gathered only while
    # the lookup runs, and while the loss (train.loss, inside the head's forward) and its backward run
    fully_shard(model.decoder.embed_tokens, mesh=mesh, mp_policy=mp)
    fully_shard(model.decoder.lm_head, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def local_rows(p: torch.Tensor, d: Dist) -> tuple[torch.Tensor, slice]:
    """This process's part of a parameter that FSDP2 sharded along dim 0, and the rows of the whole
    it holds (torch.chunk's split: ceil(n / world) rows each, the last parts shorter or empty)."""
    local = p.to_local()
    n = p.shape[0]
    per = -(-n // d.world)
    start = min(d.rank * per, n)
    if local.shape[0] != min(per, n - start):
        raise RuntimeError(f"unexpected FSDP2 shard: {local.shape[0]} of {n} rows on process {d.rank} of {d.world}")
    return local, slice(start, start + local.shape[0])


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (gradient accumulation)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> float:
    """Total gradient norm over every trainable parameter (all shards), clipped to `max_norm`."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=False)
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
