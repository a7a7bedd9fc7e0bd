"""A mixture-of-experts feed-forward layer shaped as torchtitan's (a router and GroupedExperts' weight stacks), with
expert parallelism by all-to-all token dispatch.

Token x goes to the K experts of highest router probability p = softmax(W_r x) and comes back as

    y = sum_{k < K} p_{i_k} E_{i_k}(x),   E_e(x) = W2[e] (silu(W1[e] x) * W3[e] x),

with W1, W3 [E, ffn, hidden] and W2 [E, hidden, ffn] (GroupedExperts' w1, w3, w2). No token is dropped (no
capacity limit), so y does not depend on where the experts are. Under EP over a group of N ranks each rank holds
E / N consecutive experts (``Shard(0)`` over "ep"): each token copy is sent to the rank of its expert and back with
torch.distributed's ``all_to_all_single`` (dist_ortho.comm.all_to_all, its waits bounded; backward the reverse).

Gradients: a rank's experts see the tokens of the N data shards of its EP group, so backward sums N shards' losses'
gradients into them; :class:`GroupedExperts` scales them by ``grad_scale`` = 1 / N, so that after FSDP's mean over
the other data-parallel ranks an expert's gradient is the mean over every data-parallel rank, as a dense weight's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_ortho import comm
from dist_ortho.parameters.dtensor import local


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.scale, None


class _AllToAll(torch.autograd.Function):
    """Rows of ``x``: ``sent[j]`` to rank j of ``group``, ``got[j]`` from it (dist_ortho.comm.all_to_all); backward
    sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, sent, got, group):  # type: ignore[override]
        ctx.sent, ctx.got, ctx.group = sent, got, group
        return _exchange(x, sent, got, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _exchange(grad, ctx.got, ctx.sent, ctx.group), None, None, None


def _exchange(x: torch.Tensor, sent: list[int], got: list[int], group: comm.ProcessGroup | None) -> torch.Tensor:
    width = x.size(1)
    parts = comm.all_to_all(x.contiguous().reshape(-1), [n * width for n in sent], [n * width for n in got], group)
    return torch.cat(parts).view(-1, width)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three stacks w1, w3 [E, ffn, hidden] and w2 [E, hidden, ffn] (this rank's E / N under EP)."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Parameter(w1), nn.Parameter(w2), nn.Parameter(w3)
        self.grad_scale = 1.0

    def _local(self, w: torch.Tensor) -> torch.Tensor:
        held = local(w)  # under EP a DTensor Shard(0) over "ep": this rank's experts
        return _ScaleGrad.apply(held, self.grad_scale) if self.grad_scale != 1.0 else held

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x``: token copies sorted by (local) expert, ``counts[e]`` of them for expert e."""
        w1, w2, w3 = (self._local(w) for w in (self.w1, self.w2, self.w3))
        out = [F.linear(F.silu(F.linear(chunk, w1[e])) * F.linear(chunk, w3[e]), w2[e])
               for e, chunk in enumerate(x.split(counts))]
        return torch.cat(out) if out else x.new_zeros(0, w2.size(1))


class MoE(nn.Module):
    """Router + :class:`GroupedExperts`, top-``topk`` routing (see the module doc); ``ep_group`` set under EP."""

    def __init__(self, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, topk: int):
        super().__init__()
        self.num_experts, hidden = router.shape
        self.router = nn.Linear(hidden, self.num_experts, bias=False)
        with torch.no_grad():
            self.router.weight.copy_(router)
        self.experts = GroupedExperts(w1, w2, w3)
        self.topk = topk
        self.ep_group: comm.ProcessGroup | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, k = x.shape, self.topk
        x = x.reshape(-1, shape[-1])
        weights, chosen = F.softmax(self.router(x).float(), dim=-1).topk(k, dim=-1)  # [N, K] each
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # token copies grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        out = self._run_experts(x[order // k], counts)
        y = torch.zeros_like(out).index_copy(0, order, out).view(-1, k, shape[-1])  # back to (token, k) order
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1).view(shape)

    def _run_experts(self, routed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' outputs of ``routed`` (sorted by global expert, ``counts`` each), in the same order."""
        n = comm.group_size(self.ep_group)
        if n == 1:
            return self.experts(routed, counts.tolist())
        send = counts.view(n, -1)  # [rank, its expert]: token copies this rank sends
        mine = [send.size(1)] * n
        # [source rank, my expert]: the token copies each rank sends me
        recv = torch.cat(comm.all_to_all(send.reshape(-1), mine, mine, self.ep_group)).view(n, -1)
        sent, got = send.sum(1).tolist(), recv.sum(1).tolist()
        arrived = _AllToAll.apply(routed, sent, got, self.ep_group)
        # arrived by source rank, then expert; the experts run expert by expert
        index = torch.arange(arrived.size(0)).split(recv.flatten().tolist())
        by_expert = torch.cat([index[s * send.size(1) + e] for e in range(send.size(1)) for s in range(n)])
        done = self.experts(arrived[by_expert], recv.sum(0).tolist())
        done = torch.zeros_like(done).index_copy(0, by_expert, done)
        return _AllToAll.apply(done, got, sent, self.ep_group)
