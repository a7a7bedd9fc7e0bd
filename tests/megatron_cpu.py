"""Run megatron-core's optimizer wrappers on CPU tensors (test fixture; listed in docs/megatron.md).

megatron-core 0.16's FP32Optimizer / Float16OptimizerWithFloat16Params and its grad clipping allocate
small tensors with ``device='cuda'`` unconditionally (the loss scale of one, the multi-tensor-apply
overflow flag, the norm buffer, the local multi-tensor L2 norm's result in megatron.core.utils; on >= 0.17
also the grad-norm-group flag and LayerWiseDistributedOptimizer's buffers) and check parameters by CUDA type names (``param.type() ==
'torch.cuda.FloatTensor'``). Inside :func:`megatron_on_cpu`:
- those modules see a ``torch`` whose ``tensor`` / ``zeros`` / ``ones`` / ``empty`` put ``device='cuda'``
  on the CPU (every other attribute is torch's own);
- their ``torch.distributed.all_gather`` accepts blocks of different sizes (LayerWiseDistributedOptimizer
  all-gathers uneven shards, which NCCL does and gloo does not) by padding to the largest;
- their ``torch.cuda.synchronize()`` does nothing and ``torch.cuda.current_device()`` is "cpu" (the
  checkpoint writer's, before it copies tensors and for its failure flag);
- the model-parallel CUDA RNG tracker's ``fork()`` (around attention dropout) does nothing: the tests
  use no dropout;
- megatron-core 0.16.1's MoE router refers to ``te_general_gemm``, left undefined without
  TransformerEngine: it is set to None, so that the router's own (non-TE) path runs;
- ``Tensor.type()`` without arguments names a CPU float32 / bfloat16 / float16 tensor by its CUDA type name.
Nothing else of megatron-core changes: its param groups, wrappers, clipping and chaining run as they are.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
from collections.abc import Iterator

import torch

MODULES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads", "megatron.core.utils",
           "megatron.core.optimizer.layer_wise_optimizer", "megatron.core.dist_checkpointing.strategies.filesystem_async",
           "megatron.core.dist_checkpointing.strategies.state_dict_saver", "megatron.core.transformer.moe.router",
           "megatron.core.tensor_parallel.mappings", "megatron.core.optimizer.grad_scaler")
_CUDA_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
               torch.float16: "torch.cuda.HalfTensor"}


def _on_cpu(make):
    def made(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return make(*args, **kwargs)
    return made


def _uneven_all_gather(tensor_list, tensor, group=None, async_op=False):
    """all_gather into blocks of different sizes (NCCL does it, gloo needs equal sizes): pad to the largest."""
    sizes = [t.numel() for t in tensor_list]
    if len(set(sizes)) == 1:
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    padded = [torch.empty(max(sizes), dtype=tensor.dtype) for _ in sizes]
    mine = torch.zeros(max(sizes), dtype=tensor.dtype)
    mine[: tensor.numel()] = tensor.reshape(-1)
    torch.distributed.all_gather(padded, mine, group=group)
    for out, block, n in zip(tensor_list, padded, sizes):
        out.reshape(-1).copy_(block[:n])
    return None


def _cpu_torch() -> types.ModuleType:
    shim = types.ModuleType("torch_on_cpu")
    shim.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[method-assign]
    for name in ("tensor", "zeros", "ones", "empty"):
        setattr(shim, name, _on_cpu(getattr(torch, name)))
    distributed = types.ModuleType("distributed_on_gloo")
    distributed.__getattr__ = lambda name: getattr(torch.distributed, name)  # type: ignore[method-assign]
    distributed.all_gather = _uneven_all_gather
    shim.distributed = distributed
    cuda = types.ModuleType("cuda_on_cpu")
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)  # type: ignore[method-assign]
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.current_device = lambda: "cpu"
    shim.cuda = cuda
    return shim


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    modules = [importlib.import_module(m) for m in MODULES if importlib.util.find_spec(m) is not None]
    saved = [m.torch for m in modules]
    original_type = torch.Tensor.type

    def cuda_named_type(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_NAMES:
            return _CUDA_NAMES[self.dtype]
        return original_type(self, *args, **kwargs)

    shim = _cpu_torch()
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    tracker = random.get_cuda_rng_tracker()
    original_fork = tracker.fork
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):  # 0.16.1 names it without TransformerEngine: its fallback runs
        moe_utils.te_general_gemm = None
    try:
        for m in modules:
            m.torch = shim
        torch.Tensor.type = cuda_named_type
        tracker.fork = lambda *args, **kwargs: contextlib.nullcontext()
        yield
    finally:
        tracker.fork = original_fork
        torch.Tensor.type = original_type
        for m, t in zip(modules, saved):
            m.torch = t
