"""Expert parallelism: each rank of an expert-parallel group holds E / ep of every MoE layer's experts.

`shard_experts` makes two swaps in every `MoELayer`: its `experts` become this rank's slice (a `GroupedExperts`
of E / ep experts, same parameter names), and its `dispatcher` an `ExpertParallelDispatcher`. The layer routes
and plans dispatch as usual (over all E experts) and hands its grouped rows to the dispatcher, which

1. sends each token **once** to every rank holding at least one of its experts (the (token, rank) pairs,
   so two experts on one rank cost one row: what makes device-limited routing cut traffic), together with
   each assignment's (row, local expert, combine weight);
2. runs the local experts on what arrived, with the combine weights folded in, and sums each received row's
   expert outputs;
3. sends the sums back and adds them into the token rows.

Both exchanges are `all_to_all_single` calls with uneven splits (the counts go first). Autograd flows through
them, so expert weights receive the gradient of every rank's tokens, and router weights and inputs the
gradient from every rank's experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layer.dispatch import TokenDispatcher, plan_dispatch, scatter_rows
from ..layer.experts import GroupedExperts
from ..layer.moe import MoELayer
from .exchange import all_to_all, exchange_counts

#: bytes of metadata per remote assignment: its row and local expert (int64 each) and its weight (float32)
ASSIGNMENT_META_BYTES = 2 * 8 + 4


class ExpertParallelDispatcher(TokenDispatcher):
    """Reaches a layer's experts on every rank of `group` by all-to-all; this rank's `experts` hold experts
    `expert_offset .. expert_offset + num_local_experts - 1` of `num_global_experts`.

    `stats()` reports what the last call sent to other ranks: `all_to_all_bytes` (token rows out and results
    back, plus per-assignment metadata) and `all_to_all_rows`. The backward pass sends as many bytes again.
    """

    def __init__(self, group, ep_rank: int, ep_size: int, num_global_experts: int) -> None:
        if num_global_experts % ep_size:
            raise ValueError(f"expert parallelism: {num_global_experts} experts per layer cannot be split evenly "
                             f"over ep={ep_size} ranks; choose an ep that divides num_local_experts")
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        self.num_global_experts = num_global_experts
        self.num_local_experts = num_global_experts // ep_size
        self.expert_offset = ep_rank * self.num_local_experts
        self._exchange_stats: dict[str, float] = {}

    @property
    def expert_rows(self) -> slice:
        """The rows of the full [E, ...] expert tensors this rank holds."""
        return slice(self.expert_offset, self.expert_offset + self.num_local_experts)

    def dispatch_and_combine(self, experts: GroupedExperts, x: Tensor, group_sizes: list[int], row_scale: Tensor,
                             row_index: Tensor) -> Tensor:
        """As `TokenDispatcher.dispatch_and_combine`, with `experts` this rank's slice; every rank of the group
        must call it at once."""
        num_tokens, hidden = x.shape  # T token rows here
        ranks, local = self.ep_size, self.num_local_experts
        device = x.device
        sizes = torch.tensor(group_sizes, device=device)  # [E] assignments per global expert
        # [N] the global expert of each grouped assignment, and [N] the rank holding it
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_global_experts, device=device), sizes,
                                                output_size=row_index.numel())
        dest = torch.div(expert_of_row, local, rounding_mode="floor")
        # pairs: [P] sorted keys dest * T + token, one per (destination rank, token) — grouped by destination;
        # pair_of_assignment: [N] which pair carries assignment n
        pairs, pair_of_assignment = torch.unique(dest * num_tokens + row_index, return_inverse=True)
        send_tokens = pairs % num_tokens  # [P] the token row each pair sends
        send_rows = torch.bincount(torch.div(pairs, num_tokens, rounding_mode="floor"), minlength=ranks)  # [ranks]
        send_assign = sizes.view(ranks, local).sum(dim=1)  # [ranks] assignments for each rank's experts
        first_pair = send_rows.cumsum(0) - send_rows  # [ranks] the first pair sent to each rank
        # meta: [N, 2] per assignment, (its row among the rows sent to its rank, its expert on that rank)
        meta = torch.stack([pair_of_assignment - first_pair[dest], expert_of_row - dest * local], dim=1)

        # recv: [ranks, 2] per source rank, (token rows, assignments) it sends here
        recv = exchange_counts(torch.stack([send_rows, send_assign], dim=1), self.group).tolist()
        out_rows, out_assign = send_rows.tolist(), send_assign.tolist()
        in_rows, in_assign = [r for r, _ in recv], [a for _, a in recv]

        rows = all_to_all(x.index_select(0, send_tokens), in_rows, out_rows, self.group)  # [R, H] received rows
        recv_meta = all_to_all(meta, in_assign, out_assign, self.group)  # [A, 2] received assignments' meta
        recv_scale = all_to_all(row_scale, in_assign, out_assign, self.group)  # [A] their combine weights

        # [A] the rank each received assignment came from, and its row among all received rows
        sender = torch.repeat_interleave(torch.arange(ranks, device=device), torch.tensor(in_assign, device=device),
                                         output_size=recv_meta.shape[0])
        in_first = torch.tensor([0, *in_rows[:-1]], device=device).cumsum(0)  # first received row of each sender
        recv_row = recv_meta[:, 0] + in_first[sender]
        plan = plan_dispatch(recv_meta[:, 1], local)
        grouped_rows = recv_row[plan.order]
        expert_out = experts(rows, plan.group_sizes, row_scale=recv_scale[plan.order], row_index=grouped_rows)
        # [R, H] each received row's expert sum; results travel in the tokens' dtype on every rank (under autocast
        # the experts may compute in another)
        summed = scatter_rows(expert_out.to(x.dtype), grouped_rows, rows.shape[0])

        returned = all_to_all(summed, out_rows, in_rows, self.group)  # [P, H] the sums for the pairs sent
        self._record(out_rows, in_rows, out_assign, hidden, x.element_size())
        return scatter_rows(returned, send_tokens, num_tokens)

    def _record(self, out_rows: list[int], in_rows: list[int], out_assign: list[int], hidden: int,
                element: int) -> None:
        """Keep what this call sent to other ranks (rows, and bytes both ways with the metadata)."""
        me = self.ep_rank
        remote_out = sum(out_rows) - out_rows[me]
        remote_in = sum(in_rows) - in_rows[me]
        self._exchange_stats = {
            "all_to_all_rows": float(remote_out),
            "all_to_all_bytes": float((remote_out + remote_in) * hidden * element
                                      + (sum(out_assign) - out_assign[me]) * ASSIGNMENT_META_BYTES),
        }

    def stats(self) -> dict[str, Tensor]:
        return {name: torch.tensor(value) for name, value in self._exchange_stats.items()}

    def __repr__(self) -> str:
        last = self.expert_offset + self.num_local_experts - 1
        return (f"ExpertParallelDispatcher(experts {self.expert_offset}..{last} of {self.num_global_experts}, "
                f"ep_rank={self.ep_rank}, ep_size={self.ep_size})")


def expert_slice(experts: GroupedExperts, rows: slice) -> GroupedExperts:
    """Experts `rows` of `experts` as a `GroupedExperts` of their own (same kind, device and dtype; copied)."""
    part = experts.same_kind(rows.stop - rows.start)
    reference = experts.down_proj
    part.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():  # every stacked parameter (weights, biases) is these rows of the full one
        for name, param in part.named_parameters():
            param.copy_(getattr(experts, name)[rows])
    return part


def shard_experts(model: nn.Module, group, ep_rank: int, ep_size: int) -> dict[str, slice]:
    """Give every `MoELayer` in `model` this rank's slice of its experts and an `ExpertParallelDispatcher`.

    Call it on every rank of the expert-parallel group, on a model built identically on each (same seed), so
    the slices together are the single-process model. Returns each sharded parameter's name with the rows of
    the full tensor this rank holds (what checkpoints and gradient reduction need to know).
    """
    slices = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        if module.config.router == "soft":
            raise ValueError("expert parallelism does not support router='soft': Soft MoE sends every token to "
                             "every expert's slots; train it without --ep (data parallel only)")
        dispatcher = ExpertParallelDispatcher(group, ep_rank, ep_size, module.experts.num_experts)
        module.experts = experts = expert_slice(module.experts, dispatcher.expert_rows)
        module.dispatcher = dispatcher
        prefix = f"{name}.experts." if name else "experts."
        slices.update({prefix + param: dispatcher.expert_rows for param, _ in experts.named_parameters()})
    return slices
