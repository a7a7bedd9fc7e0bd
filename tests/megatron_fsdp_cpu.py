"""Run Megatron-FSDP (the ``megatron-fsdp`` package, v1 ``fully_shard`` and v2 ``experimental.fully_shard``) on CPU
tensors over gloo (test fixture; listed in docs/megatron.md).

Megatron-FSDP calls a few CUDA functions unconditionally: side streams and their events (``torch.cuda.Stream``,
``current_stream``, ``stream``, ``Event``), ``current_device``, ``device``, ``synchronize``, ``empty_cache``,
NVTX ranges and ``Tensor.cuda()``. :func:`install` replaces them with no-ops (a stream that waits for nothing:
every operation already ran on the CPU, in order), ``current_device`` with 0. Gloo has no PREMUL_SUM, so
:func:`import_megatron_fsdp` makes DistributedDataParallelConfig's ``gradient_reduce_div_fusion`` False (the
gradients are then divided after the reduction, as Megatron-FSDP does for bf16). With megatron-core importable
(our test venv has it), megatron_fsdp reads megatron-core's DistributedDataParallelConfig, which lacks fields
megatron-fsdp 0.6.1 sets: megatron-core is hidden while megatron_fsdp is imported. Nothing else changes: its
buckets, reduce-scatters, all-gathers, DTensors and optimizer hooks run as they are. Install once per worker
process (the torch.cuda changes are for good there).
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any

import torch


class _NoStream:
    """A CUDA stream or event on the CPU: every wait, record and query is done already."""

    device = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _NoStream:
        return _NoStream()

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> _NoStream:
        return self

    def __exit__(self, *args: Any) -> bool:
        return False


def install() -> None:
    """Replace the CUDA calls Megatron-FSDP makes by CPU no-ops (see the module doc)."""
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.Stream = cuda.Event = _NoStream
    cuda.current_stream = lambda *args, **kwargs: _NoStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.device = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda *args, **kwargs: None
    cuda.nvtx.range_pop = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


_HIDDEN = ("megatron.core", "megatron.core.distributed", "megatron.core.distributed.distributed_data_parallel_config",
           "megatron.core.utils", "megatron.core.tensor_parallel", "megatron.core.nccl_allocator")


def import_megatron_fsdp() -> types.ModuleType:
    """megatron_fsdp, imported with megatron-core hidden and its gradient division made gloo's (module doc)."""
    if "megatron_fsdp" not in sys.modules:
        saved = {name: sys.modules.get(name) for name in _HIDDEN}
        sys.modules.update(dict.fromkeys(_HIDDEN))  # None: "import megatron.core..." raises ImportError
        try:
            import megatron_fsdp
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
        config = megatron_fsdp.DistributedDataParallelConfig
        init = config.__init__

        def gloo_init(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            self.gradient_reduce_div_fusion = False  # gloo has no PREMUL_SUM

        config.__init__ = gloo_init
    return sys.modules["megatron_fsdp"]
