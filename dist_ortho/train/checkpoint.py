"""Checkpoints that load at any TP size, written with torch.distributed.checkpoint.

Weights and optimizer state are saved as GLOBAL tensors: a sharded parameter (and every state tensor
sharded like it) is gathered along its partition_dim; DCP writes each replicated tensor once. Loading
takes each rank's block for the TP size at hand, so a TP=2 checkpoint resumes at TP=1 or TP=4.
A checkpoint is written to a fresh folder and ``latest`` is switched atomically after it is complete,
so an interrupted save never damages the previous one. meta.json records the SHA-256 of every file; a
checkpoint is trusted only when every file is there with its checksum (:func:`damage`), and
:func:`newest_intact` finds the newest one that is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dist_ortho import comm
from dist_ortho.optim.holding import declares, holding, owns, state_tensors
from dist_ortho.parameters.dtensor import gather_pieces, is_dtensor, local, piece_like
from dist_ortho.parameters.protocol import held_like_param


def sharded(model: torch.nn.Module) -> None:
    """Put an FSDP2 model's sharded parameters back in place (a forward without backward, e.g. an
    evaluation, leaves the root module's unsharded ones registered)."""
    reshard = getattr(model, "reshard", None)
    if callable(reshard):
        reshard()


def global_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any) -> dict[str, Any]:
    """Weights and optimizer state as global tensors, keyed by parameter name (never by rank)."""
    finish = getattr(optimizer, "finish", None)
    if callable(finish):  # a step's share in flight (overlap=True): the weights are read next
        finish()
    sharded(model)
    model_sd, optim_sd = {}, {}
    for name, p in model.named_parameters():
        model_sd[name] = gather_pieces(p.detach()) if is_dtensor(p) else held_like_param(p, group).to_global(p.detach())
        for path, value in state_tensors(optimizer.state[p]):
            t = value if torch.is_tensor(value) else torch.tensor(value)
            if is_dtensor(t):  # a torch optimizer's state of a DTensor parameter (AdamW under FSDP2)
                optim_sd["/".join([name, *path])] = gather_pieces(t)
                continue
            optim_sd["/".join([name, *path])] = holding(optimizer, p, path, group).to_global(t)
    return {"model": model_sd, "optim": optim_sd}


def save(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any, meta: dict, run_group: Any = "tp"
) -> None:
    """Write the checkpoint of ``meta["step"]`` under path/step_N and point path/latest at it.

    ``group`` is the TP group (shards are gathered over it); ``run_group`` holds every rank of the run (the
    TP group when there is no DP, None for the world). Under DP each replica writes the state it owns."""
    run_group = group if run_group == "tp" else run_group
    final = path / f"step_{meta['step']:06d}"
    tmp = path / f".tmp_step_{meta['step']:06d}"
    state = global_state(model, optimizer, group)
    leader = comm.group_rank(run_group) == 0 if run_group is not None else dist.get_rank() == 0
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier(group=run_group)
    dcp.save(state, checkpoint_id=str(tmp), process_group=run_group)
    dist.barrier(group=run_group)
    if leader:
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "meta.json").write_text(json.dumps({**meta, "files": files}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = path / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, path / "latest")
    dist.barrier(group=run_group)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def latest(path: Path) -> Path | None:
    marker = path / "latest"
    return path / marker.read_text().strip() if marker.is_file() else None


def read_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


def damage(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` (a missing or unreadable meta.json, a missing file, a checksum
    that does not match), or None when every file is intact."""
    try:
        files = read_meta(checkpoint)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is missing or unreadable ({type(e).__name__})"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != expected:
            return f"{name} does not match its checksum"
    return None


def newest_intact(path: Path) -> Path | None:
    """The newest step_* checkpoint under ``path`` with no damage."""
    for candidate in sorted(path.glob("step_*"), reverse=True):
        if candidate.is_dir() and damage(candidate) is None:
            return candidate
    return None


def load(
    checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Any, run_group: Any = "tp"
) -> None:
    """Fill the model and optimizer from ``checkpoint`` (any TP and DP size), taking this rank's blocks and
    the state of the parameters this rank's replica owns (all of them without DP)."""
    run_group = group if run_group == "tp" else run_group
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    sharded(model)
    params = dict(model.named_parameters())
    state: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}}
    for key, meta in metadata.items():
        section, name = key.split(".", 1)
        if section == "optim" and name.split("/")[0] in params and not owns(optimizer, params[name.split("/")[0]]):
            continue
        state[section][name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    dcp.load(state, checkpoint_id=str(checkpoint), process_group=run_group)
    missing = set(params) - set(state["model"])
    if missing:
        raise ValueError(f"checkpoint {checkpoint} lacks weights {sorted(missing)[:3]}...: a different model")
    with torch.no_grad():
        for name, p in params.items():
            if is_dtensor(p):
                if tuple(state["model"][name].shape) != tuple(p.shape):
                    raise ValueError(f"checkpoint {checkpoint}: {name} has shape {tuple(state['model'][name].shape)}, "
                                     f"the model {tuple(p.shape)}")
                local(p).copy_(piece_like(state["model"][name], p))
                continue
            mine = held_like_param(p, group).to_local(state["model"][name])
            if mine.shape != p.shape:
                raise ValueError(f"checkpoint {checkpoint}: {name} has shape {tuple(mine.shape)}, the model {tuple(p.shape)}")
            p.copy_(mine)
    for key, value in state["optim"].items():
        name, *path = key.split("/")
        p = params[name]
        target = optimizer.state[p]
        for part in path[:-1]:
            target = target.setdefault(part, {})
        if is_dtensor(p) and not declares(optimizer, p) and tuple(value.shape) == tuple(p.shape):
            from torch.distributed.tensor import DTensor

            target[path[-1]] = DTensor.from_local(piece_like(value, p).clone().to(local(p).device), p.device_mesh, p.placements,
                                                  shape=p.shape, stride=p.stride())
            continue
        target[path[-1]] = holding(optimizer, p, path, group).to_local(value).to(p.device)

