"""Byte-level text data with no download: by default the Python standard library's own source files.

Batches are a pure function of (seed, step, split), so a resumed run sees exactly the batches an
unstopped one would.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch


def stdlib_corpus(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated top-level .py files of the running interpreter's standard library (sorted, capped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        out.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def load_corpus(path: str | None) -> bytes:
    if path is None:
        return stdlib_corpus()
    if not os.path.isfile(path):
        raise ValueError(f"--data {path!r}: no such file")
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"--data {path!r} is empty")
    return data


class ByteData:
    """Train on the first 90% of the bytes, evaluate on the last 10%."""

    def __init__(self, corpus: bytes, seq_len: int, seed: int = 0):
        tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        split = int(len(tokens) * 0.9)
        self.splits = {"train": tokens[:split], "eval": tokens[split:]}
        self.seq_len, self.seed = seq_len, seed
        for name, t in self.splits.items():
            if len(t) <= seq_len + 1:
                raise ValueError(f"the corpus is too small: its {name} split has {len(t)} bytes, needs > {seq_len + 1}")

    def batch(self, step: int, batch_size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.splits[split]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 2 + (split == "eval"))
        starts = torch.randint(0, len(tokens) - self.seq_len - 1, (batch_size,), generator=gen)
        rows = torch.stack([tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]
