"""The main job's model laid out as torchtitan lays one out, with torch's own APIs: HSDP (x TP) and experts over EP.

Meshes (torchtitan's parallel_dims.py names; rank = ((r * F + f) * T + t), the DP rank r * F + f):

- dense: ("dp_replicate", "fsdp", "tp") of R x F x T; TP by ``parallelize_module`` over "tp", then ``fully_shard``
  of every block and the model over ("dp_replicate", "fsdp") (HSDP: R replicas of F shards; FSDP over "fsdp" when
  R = 1): a weight is (Replicate(), Shard(0)), with TP (Replicate(), _StridedShard(0), Shard(0)) or
  (Replicate(), Shard(0), Shard(1));
- experts: ("dp_replicate", "efsdp", "ep") of R x F / N x N over the same ranks (EP borrows the FSDP ranks, "ep"
  innermost): every stack ``Shard(0)`` over "ep" (``distribute_tensor``), then ``fully_shard`` over
  ("dp_replicate", "efsdp") with ``Shard(0)`` (FSDP's _StridedShard(0) after "ep") when efsdp x ep <= E, else
  ``Shard(1)``, as torchtitan's distributed/fsdp.py does.

The optimizer is given no group: it reads them from these meshes. A run of one rank keeps the plain model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ortho import comm
from dist_ortho.train.model import GPT, shard_native, tensor_parallel_native


def check_layout(world: int, hsdp: int, tp: int, experts: int, ep: int) -> int:
    """F, the FSDP size of the layout, after checking it (a ValueError naming the flag, before any collective)."""
    if world % (hsdp * tp):
        raise ValueError(f"--hsdp {hsdp} x --tp {tp} must divide the world size {world}")
    fsdp = world // (hsdp * tp)
    if experts and tp > 1:
        raise ValueError(f"--experts {experts} runs without TP (--tp 1), got --tp {tp}")
    if experts and (fsdp % ep or experts % ep):
        raise ValueError(f"--ep {ep} must divide the FSDP size {fsdp} (world / (--hsdp x --tp)) and --experts {experts}")
    if not experts and ep != 1:
        raise ValueError(f"--ep {ep} needs --experts")
    return fsdp


def parallelize_titan(model: GPT, ranks: int, hsdp: int, tp: int, ep: int, device: torch.device
                      ) -> tuple[GPT, object | None]:
    """``model`` (built whole, TP size ``tp``) laid out over the run's ``ranks`` (the world's, or 1) as the module
    doc says; its dense mesh, or None for a run of one rank (the plain model)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    experts = model.config.num_experts
    fsdp = check_layout(ranks, hsdp, tp, experts, ep)
    if ranks == 1:
        return model, None
    if ranks != dist.get_world_size():
        raise ValueError(f"--hsdp / --experts lay a run out over the whole world ({dist.get_world_size()} ranks), "
                         f"not over {ranks} of them")
    dense = init_device_mesh(device.type, (hsdp, fsdp, tp), mesh_dim_names=("dp_replicate", "fsdp", "tp"))
    if tp > 1:
        tensor_parallel_native(model, dense["tp"])
    if experts:
        efsdp = fsdp // ep
        emesh = init_device_mesh(device.type, (hsdp, efsdp, ep), mesh_dim_names=("dp_replicate", "efsdp", "ep"))
        along = Shard(0) if efsdp * ep <= experts else Shard(1)
        for block in model.blocks:
            stacks = block.moe.experts
            if ep > 1:
                for name, w in list(stacks.named_parameters(recurse=False)):
                    stacks.register_parameter(name, torch.nn.Parameter(distribute_tensor(w.detach(), emesh["ep"], [Shard(0)])))
                stacks.grad_scale = 1.0 / ep
                block.moe.ep_group = emesh["ep"].get_group()
            over = _dp_dims(emesh, hsdp, efsdp, "efsdp")
            if over is not None:
                fully_shard(stacks, mesh=over, shard_placement_fn=lambda p: along)
    return shard_native(model, _dp_dims(dense, hsdp, fsdp, "fsdp")), dense


def _dp_dims(mesh, hsdp: int, shards: int, name: str):
    """The mesh fully_shard takes: HSDP's 2D ("dp_replicate", name) with replicas, else name's 1D (None when 1)."""
    if hsdp > 1:
        return mesh["dp_replicate", name]
    return mesh[name] if shards > 1 else None


def run_size(group: comm.ProcessGroup | None, dp_group: comm.ProcessGroup | None) -> int:
    """The ranks of a run over TP ``group`` x DP ``dp_group``."""
    return comm.group_size(group) * comm.group_size(dp_group)
