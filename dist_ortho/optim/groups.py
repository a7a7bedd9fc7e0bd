"""Same-shape parameters held as groups through the whole step: one stacked tensor per group and per state key.

A :class:`ParamStack` is the parameters of one param group that have the same local shape, dtype, device and
global layout (and, when split, the same fused-QKV parts): every elementwise part of the step (momentum,
Nesterov, weight decay, the update) is one op on a stacked tensor of all of them, and their Newton-Schulz and
members' updates run as one batch. The host cost of a step is then per group, not per matrix.

State stays per parameter for everything outside the step: :class:`GroupState` keeps one stacked tensor per
key and puts a view of each member's slice into that member's own state dict, so ``state_dict()``,
checkpoints and resharding see one entry per parameter, as before. A state tensor that is no longer such a
view (``load_state_dict`` replaced it, or a user assigned one) is stacked again at its next use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dist_ortho.optim.layouts import matrix_view
from dist_ortho.parameters.layout import Layout
from dist_ortho.tp import NsSpec

SCRATCH_MAX_NUMEL = 2**16
"""Matrices of at most this many elements keep a stacked scratch buffer between steps, with one view per
member made once: making a view costs a few microseconds, more than the work on a small matrix. Larger
ones are stacked afresh each step (no memory held between steps)."""


class GroupState(MutableMapping):
    """The state of a group of members (parameters, or one fused-QKV part of each): per key one stacked tensor
    of ``count`` matrices per member, and in each member's own state dict a view of its slice.

    ``entries()`` gives the members' state dicts, in order (read at every :meth:`refresh`)."""

    def __init__(self, entries: Callable[[], list[dict[str, Any]]], count: int = 1) -> None:
        self._entries = entries
        self.count = count
        self._read: list[dict[str, Any]] | None = None
        self._buffers: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @property
    def entries(self) -> list[dict[str, Any]]:
        if self._read is None:
            self._read = self._entries()
        return self._read

    def refresh(self) -> None:
        """Read the members' state dicts again at the next use (load_state_dict replaces them)."""
        self._read = None

    def _views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        if self.count == 1:
            return list(buffer.unbind(0))
        return list(buffer.split(self.count))

    def _held(self, key: str) -> torch.Tensor | None:
        """The stacked tensor of ``key`` while every member's entry is still its view."""
        held = self._buffers.get(key)
        if held is None:
            return None
        buffer, views = held
        for entry, view in zip(self.entries, views):
            if entry.get(key) is not view:
                return None
        return buffer

    def _store(self, key: str, buffer: torch.Tensor) -> torch.Tensor:
        views = self._views(buffer)
        for entry, view in zip(self.entries, views):
            entry[key] = view
        self._buffers[key] = (buffer, views)
        return buffer

    def _stack(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(parts)) if self.count == 1 else torch.cat(list(parts))

    def __getitem__(self, key: str) -> torch.Tensor:
        buffer = self._held(key)
        if buffer is not None:
            return buffer
        if not self.entries or any(key not in entry for entry in self.entries):
            raise KeyError(key)
        return self._store(key, self._stack([entry[key] for entry in self.entries]))

    def setdefault(self, key: str, default: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The stacked ``key``; members that lack it start from their slice of ``default``."""
        buffer = self._held(key)
        if buffer is not None:
            return buffer
        present = [key in entry for entry in self.entries]
        if not any(present):
            return self._store(key, default)
        slices = self._views(default)
        return self._store(key, self._stack([e[key] if has else s for e, has, s in zip(self.entries, present, slices)]))

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._store(key, value)

    def __delitem__(self, key: str) -> None:
        self._buffers.pop(key, None)
        for entry in self.entries:
            del entry[key]

    def __iter__(self) -> Iterator[str]:
        keys = set(self.entries[0]) if self.entries else set()
        return iter(sorted(k for k in keys if all(k in e and torch.is_tensor(e[k]) for e in self.entries)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Scratch:
    """A stacked buffer kept between steps, with its per-member views made once (for small matrices)."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []

    def stack(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``torch.stack(tensors)`` and one view per tensor; kept for the next call when the matrices are small."""
        first = tensors[0]
        if first.numel() > SCRATCH_MAX_NUMEL:
            stacked = torch.stack(list(tensors))
            return stacked, list(stacked.unbind(0))
        shape = (len(tensors), *first.shape)
        buffer = self._buffer
        if buffer is None or buffer.shape != shape or buffer.dtype != first.dtype or buffer.device != first.device:
            buffer = self._buffer = torch.empty(shape, dtype=first.dtype, device=first.device)
            self.views = list(buffer.unbind(0))
        torch.stack(list(tensors), out=buffer)
        return buffer, self.views


StackKind = Literal["matrix", "flatten", "experts", "conv_batched"]


class Buffers:
    """Tensors a stack's step writes (stacked gradients, new momentum, direction), kept between steps on the CPU,
    where a fresh large allocation costs its page faults again at every step (measured: a new 16 MB result
    ~10x the time of the same op into an existing buffer); elsewhere (CUDA's caching allocator) made fresh."""

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            return torch.empty(tuple(shape), dtype=dtype, device=device)
        held = self._held.get(role)
        if held is None or held.shape != tuple(shape) or held.dtype != dtype or held.device != device:
            held = self._held[role] = torch.empty(tuple(shape), dtype=dtype, device=device)
        return held


@dataclass(eq=False)
class Part:
    """The matrices a stack's members contribute to one orthogonalization batch: all of each member (``index``
    None) or the rows ``index`` of each (a fused QKV component, ``number``), with their global layout and
    state (None: the stack's own)."""

    index: torch.Tensor | None
    layout: Layout
    state: GroupState | None = None
    number: int | None = None
    ns: NsSpec | None = None  # set when the plan is made
    mode: str | None = None  # the TP mode it runs (auto resolved), set when the plan is made


@dataclass(eq=False)
class ParamStack:
    """Parameters stepped together (see the module doc).

    ``kind``: "matrix" (2D weights), "flatten" (convolution weights as (out, in * k...)), "experts" (3D
    weights [E, out, in]: ``count`` = E matrices each) or "conv_batched" (one convolution weight, a matrix per
    spatial position). ``batched`` False: the member's update is written for one matrix, so the stack holds
    one parameter and its contexts carry its matrix (matrices, for conv_batched / experts) without a batch dim.
    """

    params: list[torch.Tensor]
    options: dict[str, Any]
    layout: Layout  # the global layout of one matrix of a member (of the whole weight when split)
    state: GroupState
    parts: list[Part]
    kind: StackKind = "matrix"
    count: int = 1
    batched: bool = True
    names: list[str] = field(default_factory=list)
    held_apart: bool = False  # some member's tensors are not itself (a DTensor's local, a gathered block): looked up
    owner_key: tuple[int, ...] | None = None  # the ranks of the members' owner group (None: every holder steps them)
    weights: Scratch = field(default_factory=Scratch)
    buffers: Buffers = field(default_factory=Buffers)

    @property
    def matrix_state(self) -> GroupState:
        """The state the weight-update phase reads: the matrices' (the whole weights' when split)."""
        return self.state if self.split else self.parts[0].state  # type: ignore[return-value]

    @property
    def split(self) -> bool:
        """The members are fused QKV weights, orthogonalized part by part."""
        return self.parts[0].index is not None

    def matrices(self, t: torch.Tensor) -> torch.Tensor:
        """The members' stacked tensor ``t`` (size, *local shape) as matrices: (size * count, rows, cols), or
        for conv_batched (positions, out, in)."""
        if self.kind == "flatten":
            return t.reshape(t.size(0), t.size(1), -1)
        if self.kind == "experts":
            return t.reshape(-1, *t.shape[-2:])
        if self.kind == "conv_batched":
            return matrix_view(t[0], "batched")
        return t

    def view_shape(self, local_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape :meth:`view` gives for members of ``local_shape``."""
        size = len(self.params)
        if self.kind == "flatten":
            shape = (size, local_shape[0], math.prod(local_shape[1:]))
        elif self.kind == "experts":
            shape = (size * local_shape[0], *local_shape[-2:])
        elif self.kind == "conv_batched":
            shape = (math.prod(local_shape[2:]), *local_shape[:2])
        else:
            shape = (size, *local_shape)
        return shape if self.batched or self.kind in ("conv_batched", "experts") else shape[1:]

    def view(self, matrices: torch.Tensor) -> torch.Tensor:
        """What a context carries: the batch (batched), or one member's matrix or matrices."""
        if self.batched or self.kind in ("conv_batched", "experts"):
            return matrices
        return matrices[0]

    def unview(self, t: torch.Tensor) -> torch.Tensor:
        """A context's tensor back as a batch (inverse of :meth:`view`)."""
        return t if self.batched or self.kind in ("conv_batched", "experts") else t.unsqueeze(0)
