"""Checkpoints that load at any TP size, written with torch.distributed.checkpoint.

Weights and optimizer state are saved as GLOBAL tensors: a sharded parameter (and every state tensor
sharded like it) is gathered along its partition_dim; DCP writes each replicated tensor once. Loading
takes each rank's block for the TP size at hand, so a TP=2 checkpoint resumes at TP=1 or TP=4.
A checkpoint is written to a fresh folder and ``latest`` is switched atomically after it is complete,
so an interrupted save never damages the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dist_ortho import comm
from dist_ortho.optim.base import MatrixLayout, OrthogonalizedOptimizer
from dist_ortho.optim.hybrid import MuonAdamW
from dist_ortho.params import is_sharded
from dist_ortho.tp import gather_shards, own_block


def _owners(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.optim.Optimizer]:
    """The optimizer that holds each parameter (through MuonAdamW's inner optimizers)."""
    inners = [o for _, o in optimizer._inner()] if isinstance(optimizer, MuonAdamW) else [optimizer]
    return {p: inner for inner in inners for group in inner.param_groups for p in group["params"]}


def _part_layouts(owner: torch.optim.Optimizer, p: torch.Tensor) -> list[MatrixLayout]:
    return owner.part_layouts(p) if isinstance(owner, OrthogonalizedOptimizer) else []


def _part_global(t: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
    """A split fused weight's component state, gathered when it is sharded like the component."""
    d, group = layout.spec.partition_dim, layout.group
    if group is not None and t.ndim == 2 and t.size(d) == layout.sizes[comm.group_rank(group)]:
        return gather_shards(t, d, group, layout.sizes)
    return t


def _part_local(t: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
    d, group = layout.spec.partition_dim, layout.group
    if group is not None and t.ndim == 2 and t.size(d) == sum(layout.sizes):
        return own_block(t, d, comm.group_rank(group), layout.sizes)
    return t.clone()


def _sharded_like(t: torch.Tensor, p: torch.Tensor, shards: int) -> bool:
    """t is sharded as p is, holding ``shards`` of p's blocks along p's partition_dim."""
    return is_sharded(p) and t.ndim == p.ndim and t.size(p.partition_dim) == p.size(p.partition_dim) * shards


def _global(t: torch.Tensor, p: torch.Tensor, group: Any) -> torch.Tensor:
    size = comm.group_size(group)
    if size > 1 and _sharded_like(t, p, 1):
        return gather_shards(t, p.partition_dim - p.ndim + 2, group, [p.size(p.partition_dim)] * size)
    return t


def _local(t: torch.Tensor, p: torch.Tensor, group: Any) -> torch.Tensor:
    size = comm.group_size(group)
    if size > 1 and _sharded_like(t, p, size):
        return torch.tensor_split(t, size, dim=p.partition_dim)[comm.group_rank(group)].clone()
    return t.clone()


def global_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any) -> dict[str, Any]:
    owners = _owners(optimizer)
    model_sd, optim_sd = {}, {}
    for name, p in model.named_parameters():
        model_sd[name] = _global(p.detach(), p, group)
        owner = owners[p]
        for key, value in owner.state[p].items():
            if isinstance(value, dict):  # a component of a split fused weight: key is part<i>
                layout = _part_layouts(owner, p)[int(key.removeprefix("part"))]
                for field, t in value.items():
                    optim_sd[f"{name}/{key}/{field}"] = _part_global(t, layout)
            else:
                optim_sd[f"{name}/{key}"] = _global(value, p, group) if torch.is_tensor(value) else torch.tensor(value)
    return {"model": model_sd, "optim": optim_sd}


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any, meta: dict) -> None:
    """Write the checkpoint of ``meta["step"]`` under path/step_N and point path/latest at it.

    ``group`` holds every rank of the run (the TP group while the run is TP only)."""
    final = path / f"step_{meta['step']:06d}"
    tmp = path / f".tmp_step_{meta['step']:06d}"
    state = global_state(model, optimizer, group)
    leader = comm.group_rank(group) == 0
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=group)
    dcp.save(state, checkpoint_id=str(tmp), process_group=group)
    dist.barrier(group=group)
    if leader:
        (tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = path / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, path / "latest")
    dist.barrier(group=group)


def latest(path: Path) -> Path | None:
    marker = path / "latest"
    return path / marker.read_text().strip() if marker.is_file() else None


def read_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


def load(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any) -> None:
    """Fill the model and optimizer from ``checkpoint`` (any TP size), taking this rank's blocks."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    state: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}}
    for key, meta in metadata.items():
        section, name = key.split(".", 1)
        state[section][name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    dcp.load(state, checkpoint_id=str(checkpoint), process_group=group)
    params = dict(model.named_parameters())
    missing = set(params) - set(state["model"])
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights {sorted(missing)[:3]}...: a different model")
    with torch.no_grad():
        for name, p in params.items():
            local = _local(state["model"][name], p, group)
            if local.shape != p.shape:
                raise ValueError(f"checkpoint {checkpoint}: {name} has shape {tuple(local.shape)}, the model {tuple(p.shape)}")
            p.copy_(local)
    owners = _owners(optimizer)
    for key, value in state["optim"].items():
        name, *path = key.split("/")
        p = params[name]
        owner = owners[p]
        if len(path) == 1:
            owner.state[p][path[0]] = _local(value, p, group).to(p.device)
        else:
            layout = _part_layouts(owner, p)[int(path[0].removeprefix("part"))]
            owner.state[p].setdefault(path[0], {})[path[1]] = _part_local(value, layout).to(p.device)
