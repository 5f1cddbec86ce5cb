"""Where each rank sits: a 2-D DeviceMesh ("dp", "ep") over the world, launched by torchrun.

Ranks `dp * ep_size + 0 .. ep_size - 1` form one expert-parallel group (consecutive ranks, so with one group
per node the all-to-all stays inside the node); ranks with the same `ep_rank` hold the same expert slice and
average its gradient. Every rank is a data-parallel rank for the dense parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class ParallelGroups:
    """This rank's coordinates and process groups (see the module docstring)."""

    rank: int
    world_size: int
    ep_rank: int
    ep_size: int
    dp_rank: int
    dp_size: int
    ep_group: object  # the ranks that exchange tokens (all-to-all)
    expert_dp_group: object  # the ranks holding the same expert slice (expert gradients are summed over it)
    dense_group: object  # every rank: the dense parameters' data parallelism (DDP), apart from the exchanges
    mesh: object  # torch.distributed.device_mesh.DeviceMesh with dims ("dp", "ep")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, reports and the shared parts of checkpoints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names this process's rank and world size (torchrun, or a spawned test)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def check_sizes(world_size: int, ep_size: int, num_experts: int | None = None) -> None:
    """Raise a ValueError that names the fix when `ep_size` cannot lay out `world_size` ranks (and E experts)."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"--ep {ep_size!r} is not allowed: the expert-parallel size is a positive integer")
    if world_size % ep_size:
        raise ValueError(f"--ep {ep_size} does not divide the world size {world_size} (nodes x --nproc-per-node): "
                         f"each group of {ep_size} ranks shares the experts and the rest is data parallel; launch a "
                         f"multiple of {ep_size} processes or choose an ep dividing {world_size}")
    if num_experts is not None and num_experts % ep_size:
        raise ValueError(f"--ep {ep_size} does not divide num_local_experts={num_experts}: every rank must hold the "
                         f"same number of experts; choose an ep dividing {num_experts}")


def _group_options(backend: str, timeout: timedelta) -> tuple[str, object]:
    """Backend options giving a DeviceMesh group `timeout` (a group made without one waits torch's 30 minutes)."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout  # the options' own timeout field, which new_group reads
        return backend, options
    return backend, dist.ProcessGroupGloo.Options(backend, timeout)


def init_parallel(ep_size: int, device_type: str = "cpu", timeout_s: float = 600.0) -> ParallelGroups:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and build the ("dp", "ep") mesh.

    Every group, the default one, the mesh's and DDP's, waits at most `timeout_s` in a collective (groups made
    without a timeout would wait torch's default of 30 minutes for a rank that hangs).
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise ValueError(f"--ep {ep_size} needs several processes: launch with `torchrun --nproc-per-node "
                             f"{ep_size} -m moekit train --ep {ep_size}` (RANK, WORLD_SIZE, MASTER_ADDR and "
                             "MASTER_PORT are not set), or pass --ep 1 to run in this one process (a checkpoint "
                             "saved at any --ep resumes at any other)")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    check_sizes(world, ep_size)
    dp_size = world // ep_size
    timeout = timedelta(seconds=timeout_s)
    options = _group_options(dist.get_backend(), timeout)
    mesh = init_device_mesh(device_type, (dp_size, ep_size), mesh_dim_names=("dp", "ep"),
                            backend_override={"dp": options, "ep": options})
    # its own communicator: DDP's buckets never meet the exchange
    dense_group = dist.new_group(list(range(world)), timeout=timeout)
    return ParallelGroups(rank=rank, world_size=world, ep_rank=rank % ep_size, ep_size=ep_size,
                          dp_rank=rank // ep_size, dp_size=dp_size, ep_group=mesh.get_group("ep"),
                          expert_dp_group=mesh.get_group("dp"), dense_group=dense_group, mesh=mesh)
