"""Functions that run inside spawned gloo processes for test_distributed.py (spawn imports them by name).

Each worker joins a process group on 127.0.0.1, does its part and `torch.save`s what the test compares into
`out_dir/rank{r}.pt`. The test process computes the single-process reference itself.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run `fn(rank, world, port, *args)` in `world` fresh processes; re-raise the first failure."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        fn(rank, world, port, *args)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def layer_global_batch(config, tokens: int, seed: int = 0):
    """The layer, its input and an upstream gradient, built the same way in every process."""
    from moekit.layer import MoELayer

    torch.manual_seed(seed)
    layer = MoELayer(config)
    x = torch.randn(tokens, config.hidden_size)
    upstream = torch.randn(tokens, config.hidden_size)
    return layer, x, upstream


def layer_worker(rank: int, world: int, port: int, ep: int, config_dict: dict, tokens: int, out_dir: str,
                 bias: list[float] | None, autocast: bool = False) -> None:
    """Each rank runs the EP layer on its slice of one global batch (under CPU bf16 autocast if asked); saves
    outputs and gradients."""
    import contextlib

    from moekit.config import MoEConfig
    from moekit.distributed import shard_experts
    from moekit.distributed.grads import reduce_expert_grads
    from moekit.distributed.mesh import init_parallel

    groups = init_parallel(ep)
    layer, x, upstream = layer_global_batch(MoEConfig.from_dict(config_dict), tokens)
    if bias is not None:
        layer.router.e_score_correction_bias.copy_(torch.tensor(bias))
    shard_experts(layer, groups.ep_group, groups.ep_rank, groups.ep_size)
    share = tokens // world
    mine = slice(rank * share, (rank + 1) * share)
    x_mine = x[mine].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        if autocast:  # inference first: ranks pick expert backends by their own row counts
            with torch.no_grad():
                inference = layer.eval()(x_mine).hidden_states.float()
            layer.train()
        out = layer(x_mine)
    (out.hidden_states.float() * upstream[mine]).sum().backward()
    expert_params = list(layer.experts.parameters())
    for p in expert_params:  # undo the mean reduce_expert_grads takes: this test sums over ranks
        p.grad.mul_(world)
    reduce_expert_grads(expert_params, groups)
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # replicated parameter: the sum over ranks is the global batch's gradient
    torch.save({"out": out.hidden_states.detach().float(), "x_grad": x_mine.grad, "router_grad": router_grad,
                "expert_grads": {n: p.grad for n, p in layer.experts.named_parameters()},
                "offset": layer.dispatcher.expert_offset, "stats": out.stats,
                "inference": inference if autocast else None},
               Path(out_dir) / f"rank{rank}.pt")


def sizes_worker(rank: int, world: int, port: int, ep: int, out_dir: str) -> None:
    """init_parallel with a bad ep: saves the error message."""
    from moekit.distributed.mesh import init_parallel

    try:
        init_parallel(ep)
        message = None
    except ValueError as error:
        message = str(error)
    torch.save({"error": message}, Path(out_dir) / f"rank{rank}.pt")


def train_worker(rank: int, world: int, port: int, run_dict: dict, run_dir: str, resume: bool,
                 stop_at: int | None = None) -> None:
    """`Trainer` on every rank, as `torchrun -m moekit train` runs it (stopping early at `stop_at`)."""
    from moekit.train.config import RunConfig
    from moekit.train.loop import Trainer

    trainer = Trainer(RunConfig.from_dict(run_dict), Path(run_dir), resume=resume, overwrite=not resume,
                      progress=False)
    trainer.train(stop_at=stop_at)
