"""What `Trainer` does differently under torchrun: data parallel over every rank, experts sharded over `--ep`.

One object, `TrainParallel`, holds the process groups and the trainer's few distributed steps, so the loop
reads the same with one process or many:

- every rank builds the whole model from the same seed, then keeps its slice of the experts
  (`shard_experts`), so together the ranks hold exactly the single-process model;
- the dense parameters are wrapped in DDP (its own process group; expert tensors ignored by it), the expert
  gradients are summed over the ranks that hold the same slice, and the clipping norm is the whole model's;
- every rank draws the same sequence of micro-batches and keeps every `world_size`-th one, so a step at
  `batch_size` B on W ranks sees the batches one process sees at `grad_accum` W (and trains the same way);
- router-choice counts are summed before the aux-loss-free bias update; logs are written by rank 0;
- once per step the ranks agree (one small all-reduce) on whether any of them saw a non-finite loss or gradient
  norm and whether any was asked to stop (Ctrl-C, SIGTERM), so all take the same decision at the same step;
- every collective waits at most `train.collective_timeout_s`; a rank that hangs, stops or dies is then reported
  as a `PeerLost` error instead of a 10-minute wait.

`LocalParallel` is the same interface for one process (no communication), so the trainer has no branches on it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import shard_experts
from ..distributed.grads import all_reduce_router_loads, clip_grad_norm_, reduce_expert_grads
from ..distributed.mesh import ParallelGroups, check_sizes, init_parallel, launched_by_torchrun
from ..layer import update_aux_free_biases
from ..layer.balance import max_violation
from . import checkpoint as ckpt
from .device import resolve_device
from .errors import PeerLost

if TYPE_CHECKING:
    from .config import RunConfig

_PEER_FAILURE_WORDS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe",
                       "connection refused", "peer", "socket")


def wants_parallel(expert_parallel: int) -> bool:
    """True when this process is one of several (torchrun set WORLD_SIZE > 1) or `--ep` asks for several."""
    return expert_parallel > 1 or (launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1)


def start_parallel(run: RunConfig) -> LocalParallel | TrainParallel:
    """`LocalParallel` for one process, else join torchrun's group; a layout the model cannot take is refused."""
    t = run.train
    if not wants_parallel(t.expert_parallel):
        return LocalParallel()
    if run.uses_transformers:
        raise ValueError("train.backend='transformers' trains transformers' own class in one process; run it without "
                         "torchrun and --ep (moekit's expert and data parallelism need moekit's model)")
    moe = run.model.moe
    if moe is None and t.expert_parallel > 1:
        raise ValueError(f"--ep {t.expert_parallel} shards MoE experts, but this model is dense (model.moe is "
                         "null); train it data parallel with --ep 1, or pick an MoE preset")
    if moe is not None and moe.max_devices_per_token is not None and t.expert_parallel % moe.expert_devices:
        raise ValueError(f"model.moe.max_devices_per_token={moe.max_devices_per_token} limits each token to a "
                         f"few of model.moe.expert_devices={moe.expert_devices} expert blocks, but --ep "
                         f"{t.expert_parallel} does not split into {moe.expert_devices} groups of ranks; set "
                         f"--set model.moe.expert_devices={t.expert_parallel} (one block per rank) or to the "
                         "number of nodes (node-limited routing)")
    return TrainParallel.start(t.expert_parallel, resolve_device(t.device).type,
                               moe.num_local_experts if moe is not None else None, timeout_s=t.collective_timeout_s)


class TrainParallel:
    """The process groups of one training process and the distributed steps of the training loop."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups
        self.expert_slices: dict[str, slice] = {}
        self.expert_params: list[nn.Parameter] = []
        self.dense_params: list[nn.Parameter] = []
        self.ddp: nn.Module | None = None
        self.device = torch.device("cpu")  # where small reductions live (the model's device: NCCL needs CUDA)

    repeat_signal_stops_at_once = False
    """torchrun's agent forwards each signal to every rank (a terminal's Ctrl-C reaches a rank twice): a repeat is
    only recorded, and the agent's own shutdown timeout is the hard stop."""

    @classmethod
    def start(cls, expert_parallel: int, device_type: str, num_experts: int | None,
              timeout_s: float = 300.0) -> TrainParallel:
        """Join torchrun's process group and lay the ranks out; errors name the fix."""
        if launched_by_torchrun():
            check_sizes(int(os.environ["WORLD_SIZE"]), expert_parallel, num_experts if expert_parallel > 1 else None)
        parallel = cls(init_parallel(expert_parallel, device_type, timeout_s=timeout_s))
        parallel.timeout_s = timeout_s
        return parallel

    # ------------------------------------------------------------------ who does what
    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    @property
    def is_main(self) -> bool:
        return self.groups.is_main

    def barrier(self) -> None:
        dist.barrier(group=self.groups.dense_group)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether any rank raised it (one all-reduce)."""
        values = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.groups.dense_group)
        return tuple(bool(v) for v in values.tolist())

    def all_ok(self, ok: bool) -> bool:
        """True only when every rank passed True (a barrier that also carries failure)."""
        return not self.agree(not ok)[0]

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run `work` on rank 0 only (nobody waits for it); None elsewhere."""
        return work() if self.is_main else None

    def agreed_on_rank_0(self, work: Callable[[], Any], failure: str,
                         elsewhere: Callable[[], Any] | None = None) -> Any:
        """Run `work` on rank 0, then `elsewhere` (if any) on the other ranks once rank 0 succeeded; every rank
        raises if rank 0 failed (its own error there, RuntimeError(`failure`) elsewhere), so none waits for a rank
        that gave up. Returns what this rank ran."""
        error: BaseException | None = None
        result = None
        if self.is_main:
            try:
                result = work()
            except BaseException as caught:
                error = caught
        if not self.all_ok(error is None):
            raise error if error is not None else RuntimeError(failure)
        if not self.is_main and elsewhere is not None:
            result = elsewhere()
        return result

    def stop_after_step(self, agreed: bool, requested: str | None) -> bool:
        """Whether to stop after this step: only what every rank agreed on inside it (`agreed`), so all stop at
        the same step; a signal that came later is agreed on at the next one."""
        return agreed

    def peer_lost(self, error: BaseException, step: int, last_saved: int | None) -> PeerLost | None:
        """A PeerLost explaining `error` when it is a collective that timed out or lost its peer, else None."""
        backend_error = getattr(dist, "DistBackendError", ())
        text = str(error).lower()
        if not (isinstance(error, backend_error) or any(word in text for word in _PEER_FAILURE_WORDS)):
            return None
        kept = f"the last checkpoint (step {last_saved}) is kept" if last_saved else "no checkpoint was written yet"
        return PeerLost(f"rank {self.rank}: another rank stopped answering during step {step + 1} (no reply within "
                        f"train.collective_timeout_s={getattr(self, 'timeout_s', '?')} s: a rank hung, was "
                        f"stopped or died); training stopped, {kept}. Check the other ranks' logs, then resume "
                        f"with --resume ({str(error).splitlines()[0][:160]})")

    # ------------------------------------------------------------------ the model
    def device_for(self, device: torch.device) -> torch.device:
        """The device this rank trains on: under torchrun a CUDA device is this rank's own."""
        return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Shard `model`'s experts over the EP group and wrap the rest in DDP; returns the module to call."""
        from torch.nn.parallel import DistributedDataParallel

        g = self.groups
        self.device = device
        if g.ep_size > 1:
            self.expert_slices = shard_experts(model, g.ep_group, g.ep_rank, g.ep_size)
        params = dict(model.named_parameters())
        self.expert_params = [params[name] for name in self.expert_slices]
        self.dense_params = [p for name, p in params.items() if name not in self.expert_slices]
        ignored = list(self.expert_slices) + [name for name, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        # buffers (router bias, choice counts) are kept equal by the trainer, never by DDP
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        self.ddp = DistributedDataParallel(model, process_group=g.dense_group,
                                           device_ids=[device.index] if device.type == "cuda" else None,
                                           **no_buffer_sync)
        return self.ddp

    def no_sync(self, last_micro_batch: bool):
        """DDP's all-reduce only after the last micro-batch of a step."""
        if last_micro_batch or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    # ------------------------------------------------------------------ the step
    def next_batch(self, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch: every rank draws the same `world_size` batches and keeps its own."""
        batch = None
        for index in range(self.world_size):
            if index == self.rank:
                batch = sampler.next_batch()
            else:
                sampler.skip_batch()
        return batch

    def finish_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Reduce the expert gradients and clip by the global norm (DDP has reduced the dense ones)."""
        if self.expert_params:
            reduce_expert_grads(self.expert_params, self.groups)
        return clip_grad_norm_(self.dense_params, self.expert_params, max_norm, self.groups)

    def update_router_biases(self, model: nn.Module) -> None:
        all_reduce_router_loads(model, self.groups)
        update_aux_free_biases(model)

    def mean(self, *values: float) -> list[float]:
        """The mean over ranks of each value (for logs)."""
        flat = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(flat, group=self.groups.dense_group)
        return (flat / self.world_size).tolist()

    def summarise(self, stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        """Per-layer stats over all ranks: token counts summed (MaxVio recomputed), drops averaged, bytes summed."""
        if not stats:
            return stats
        layers = sorted(stats)
        loads = torch.stack([stats[i]["tokens_per_expert"].double() for i in layers]).to(self.device)
        scalars = torch.tensor([[float(stats[i]["dropped_fraction"]), float(stats[i].get("all_to_all_bytes", 0.0))]
                                for i in layers], dtype=torch.float64, device=self.device)
        dist.all_reduce(loads, group=self.groups.dense_group)
        dist.all_reduce(scalars, group=self.groups.dense_group)
        loads, scalars = loads.cpu(), scalars.cpu()
        out = {}
        for row, i in enumerate(layers):
            out[i] = {"tokens_per_expert": loads[row], "max_violation": max_violation(loads[row]),
                      "dropped_fraction": scalars[row, 0] / self.world_size, "all_to_all_bytes": scalars[row, 1]}
        return out

    def reduce_for_log(self, loss: float, aux_loss: float, exchanged: float, stats: dict[int, dict[str, torch.Tensor]]
                       ) -> tuple[float, float, dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
        """(loss, aux loss, MoE stats, extra log fields) over all ranks, for a logged step (every rank calls it at
        the same steps, so the collectives line up): means of the losses, stats summed (:meth:`summarise`), and
        the world size with the bytes every rank sent through the all-to-all."""
        loss, aux_loss, exchanged = self.mean(loss, aux_loss, exchanged)
        return loss, aux_loss, self.summarise(stats), {"world_size": self.world_size,
                                                       "all_to_all_bytes": exchanged * self.world_size}

    def layout_note(self) -> str:
        """How the ranks are laid out, in words ("" for one process)."""
        g = self.groups
        return f"{g.world_size} ranks: expert parallel {g.ep_size} x data parallel {g.dp_size}"

    # ------------------------------------------------------------------ checkpoints
    def layout(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "ep_rank": self.groups.ep_rank,
                "ep_size": self.groups.ep_size, "dp_rank": self.groups.dp_rank}

    def save_checkpoint(self, run_dir, model: nn.Module, model_config: dict[str, Any], state: dict[str, Any],
                        meta: dict[str, Any], keep: int):
        """Every rank writes its part of one checkpoint; rank 0 publishes it."""
        return ckpt.save_sharded_checkpoint(run_dir, model, model_config, state, meta,
                                            expert_slices=self.expert_slices, all_ok=self.all_ok, keep=keep,
                                            **self.layout())

    def load_training_state(self, run_dir, model: nn.Module, model_config: dict[str, Any],
                            param_names: list[str]) -> tuple[dict[str, Any], dict]:
        """This rank's weights and training state, from a checkpoint of any layout."""
        return ckpt.load_training_state(run_dir, model, model_config, self.rank, self.world_size,
                                        self.expert_slices, param_names)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class LocalParallel:
    """`TrainParallel`'s interface for a single process: nothing to communicate, nothing to wrap."""

    rank, world_size, is_main = 0, 1, True
    repeat_signal_stops_at_once = True
    """A second Ctrl-C or SIGTERM stops at once, without a checkpoint of the step in progress."""

    def barrier(self) -> None:
        """Nothing to wait for."""

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        return tuple(bool(f) for f in flags)

    def all_ok(self, ok: bool) -> bool:
        return ok

    def on_main(self, work: Callable[[], Any]) -> Any:
        return work()

    def agreed_on_rank_0(self, work: Callable[[], Any], failure: str,
                         elsewhere: Callable[[], Any] | None = None) -> Any:
        return work()

    def stop_after_step(self, agreed: bool, requested: str | None) -> bool:
        """One process needs no agreement: a signal that came after the check inside the step still stops now."""
        return agreed or requested is not None

    def peer_lost(self, error: BaseException, step: int, last_saved: int | None) -> None:
        return None

    def device_for(self, device: torch.device) -> torch.device:
        return device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model

    def no_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()

    def next_batch(self, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        return sampler.next_batch()

    def finish_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def update_router_biases(self, model: nn.Module) -> None:
        if hasattr(model, "update_router_biases"):  # transformers' own model (`moekit.hf.HFCausalLM`)
            model.update_router_biases()
        else:
            update_aux_free_biases(model)

    def reduce_for_log(self, loss: float, aux_loss: float, exchanged: float, stats: dict[int, dict[str, torch.Tensor]]
                       ) -> tuple[float, float, dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
        return loss, aux_loss, stats, {}

    def layout_note(self) -> str:
        return ""

    def save_checkpoint(self, run_dir, model: nn.Module, model_config: dict[str, Any], state: dict[str, Any],
                        meta: dict[str, Any], keep: int):
        return ckpt.save_checkpoint(run_dir, model, model_config, state, meta, keep=keep)

    def load_training_state(self, run_dir, model: nn.Module, model_config: dict[str, Any],
                            param_names: list[str]) -> tuple[dict[str, Any], dict]:
        return ckpt.load_checkpoint(run_dir, model, model_config)

    def close(self) -> None:
        """Nothing to tear down."""
