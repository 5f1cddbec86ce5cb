"""Expert parallelism: each rank of an expert-parallel group holds E / ep of every MoE layer's experts.

`ExpertParallelExperts` replaces a layer's `GroupedExperts`. The layer routes and plans dispatch as usual
(over all E experts) and hands its grouped rows to `dispatch_and_combine`, which

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

from ..layer.dispatch import plan_dispatch
from ..layer.experts import GroupedExperts
from ..layer.moe import MoELayer
from .exchange import all_to_all, exchange_counts

#: bytes of metadata per remote assignment: its row and local expert (int64 each) and its weight (float32)
ASSIGNMENT_META_BYTES = 2 * 8 + 4


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of a layer's experts, reached from every rank of `group` by all-to-all.

    Parameters keep `GroupedExperts`' names and layout, holding experts `expert_offset ..
    expert_offset + num_experts - 1` of `num_global_experts`. `exchange_stats` holds what the last forward
    sent to other ranks: `all_to_all_bytes` (token rows out and results back, plus per-assignment metadata)
    and `all_to_all_rows`. The backward pass sends as many bytes again.
    """

    def __init__(self, experts: GroupedExperts, group, ep_rank: int, ep_size: int) -> None:
        if experts.num_experts % ep_size:
            raise ValueError(f"expert parallelism: {experts.num_experts} experts per layer cannot be split evenly "
                             f"over ep={ep_size} ranks; choose an ep that divides num_local_experts")
        local = experts.num_experts // ep_size
        super().__init__(local, experts.hidden_size, experts.intermediate_size, experts.hidden_act, experts.backend,
                         experts.bias, experts.swiglu_limit, experts.swiglu_alpha)
        self.num_global_experts, self.expert_offset = experts.num_experts, ep_rank * local
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        span = slice(self.expert_offset, self.expert_offset + local)
        reference = experts.down_proj
        self.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():  # every stacked parameter (weights, biases) is this rank's rows of the full one
            for name, param in self.named_parameters():
                param.copy_(getattr(experts, name)[span])
        self.exchange_stats: dict[str, float] = {}

    def dispatch_and_combine(self, x: Tensor, group_sizes: list[int], row_scale: Tensor, row_index: Tensor) -> Tensor:
        """The routed experts' weighted sum for every token row of `x: [T, H]`: [T, H].

        `group_sizes` (length E, all experts of the layer), `row_scale` and `row_index` ([N] each) describe the
        grouped assignments as `MoELayer` plans them: expert e's assignments are the e-th slice, assignment n
        sends token `row_index[n]` with weight `row_scale[n]`. Every rank of the group must call this at once.
        """
        num_tokens, hidden = x.shape
        ranks, local = self.ep_size, self.num_experts
        device = x.device
        sizes = torch.tensor(group_sizes, device=device)
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_global_experts, device=device), sizes,
                                                output_size=row_index.numel())
        dest = torch.div(expert_of_row, local, rounding_mode="floor")
        # one row per (destination rank, token): sorted keys come out grouped by destination
        pairs, pair_of_assignment = torch.unique(dest * num_tokens + row_index, return_inverse=True)
        send_tokens = pairs % num_tokens
        send_rows = torch.bincount(torch.div(pairs, num_tokens, rounding_mode="floor"), minlength=ranks)
        send_assign = sizes.view(ranks, local).sum(dim=1)
        first_pair = send_rows.cumsum(0) - send_rows
        meta = torch.stack([pair_of_assignment - first_pair[dest], expert_of_row - dest * local], dim=1)

        recv = exchange_counts(torch.stack([send_rows, send_assign], dim=1), self.group).tolist()
        out_rows, out_assign = send_rows.tolist(), send_assign.tolist()
        in_rows, in_assign = [r for r, _ in recv], [a for _, a in recv]

        rows = all_to_all(x.index_select(0, send_tokens), in_rows, out_rows, self.group)
        recv_meta = all_to_all(meta, in_assign, out_assign, self.group)
        recv_scale = all_to_all(row_scale, in_assign, out_assign, self.group)

        sender = torch.repeat_interleave(torch.arange(ranks, device=device), torch.tensor(in_assign, device=device),
                                         output_size=recv_meta.shape[0])
        in_first = torch.tensor([0, *in_rows[:-1]], device=device).cumsum(0)  # first received row of each sender
        recv_row = recv_meta[:, 0] + in_first[sender]
        plan = plan_dispatch(recv_meta[:, 1], local)
        grouped_rows = recv_row[plan.order]
        expert_out = super().forward(rows, plan.group_sizes, row_scale=recv_scale[plan.order], row_index=grouped_rows)
        # results travel in the tokens' dtype on every rank (under autocast the experts may compute in another)
        summed = x.new_zeros(rows.shape[0], hidden).index_add(0, grouped_rows, expert_out.to(x.dtype))

        returned = all_to_all(summed, out_rows, in_rows, self.group)
        out = returned.new_zeros(num_tokens, hidden).index_add(0, send_tokens, returned)

        me = self.ep_rank
        element = x.element_size()
        remote_out = sum(out_rows) - out_rows[me]
        remote_in = sum(in_rows) - in_rows[me]
        self.exchange_stats = {
            "all_to_all_rows": float(remote_out),
            "all_to_all_bytes": float((remote_out + remote_in) * hidden * element
                                      + (sum(out_assign) - out_assign[me]) * ASSIGNMENT_META_BYTES),
        }
        return out

    def forward(self, x: Tensor, group_sizes: list[int], row_scale: Tensor | None = None,
                row_index: Tensor | None = None) -> Tensor:
        if len(group_sizes) != self.num_experts:
            raise RuntimeError("ExpertParallelExperts holds a slice of the experts: MoELayer calls "
                               "dispatch_and_combine, which reaches the other ranks' experts")
        return super().forward(x, group_sizes, row_scale, row_index)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, experts {self.expert_offset}..{self.expert_offset + self.num_experts - 1} "
                f"of {self.num_global_experts}, ep_rank={self.ep_rank}, ep_size={self.ep_size}")


def shard_experts(model: nn.Module, group, ep_rank: int, ep_size: int) -> dict[str, slice]:
    """Replace the experts of every `MoELayer` in `model` by this rank's `ExpertParallelExperts` slice.

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
        module.experts = experts = ExpertParallelExperts(module.experts, group, ep_rank, ep_size)
        rows = slice(experts.expert_offset, experts.expert_offset + experts.num_experts)
        prefix = f"{name}.experts." if name else "experts."
        slices.update({prefix + param: rows for param, _ in experts.named_parameters()})
    return slices
