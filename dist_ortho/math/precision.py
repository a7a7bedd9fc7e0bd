"""Matmul precision: the one definition of the ``fp32_matmul_prec`` choices and of the compute dtype.

``"medium"`` means "the fast reduced precision of this device": bfloat16 on CUDA and on CPUs whose
oneDNN has a native bf16 matmul (AVX512-BF16, AMX, Arm bf16: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``),
float32 on other CPUs, where a bf16 matmul is emulated and measured ~66x slower than float32 (AVX2).
The choice is logged once per device type. Override it with :func:`set_medium_dtype` or the
environment variable ``DIST_ORTHO_MEDIUM_DTYPE`` (``bfloat16`` or ``float32``), e.g. to run the bf16
numerics on any CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Literal, get_args

import torch

logger = logging.getLogger(__name__)
MEDIUM_DTYPE_ENV = "DIST_ORTHO_MEDIUM_DTYPE"
_MEDIUM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_medium_override: torch.dtype | None = None

MatmulPrecision = Literal["highest", "high", "medium"]
MATMUL_PRECISIONS: tuple[str, ...] = get_args(MatmulPrecision)

NsDtype = Literal["bf16", "fp16", "fp32"]
NS_DTYPES: tuple[str, ...] = get_args(NsDtype)
_NS_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextlib.contextmanager
def matmul_precision(precision: MatmulPrecision) -> Iterator[None]:
    """Run the block under ``torch.set_float32_matmul_precision(precision)``, then restore the old one."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def set_medium_dtype(dtype: torch.dtype | None) -> None:
    """Run float32 Newton-Schulz under "medium" in ``dtype`` (bfloat16 or float32) on every device; None:
    back to the environment variable, else the device's capability."""
    global _medium_override
    if dtype is not None and dtype not in _MEDIUM_DTYPES.values():
        raise ValueError(f"set_medium_dtype takes torch.bfloat16, torch.float32 or None, got {dtype!r}")
    _medium_override = dtype


@functools.cache
def _device_medium_dtype(device_type: str) -> torch.dtype:
    if device_type == "cpu":
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        dtype = torch.bfloat16 if native else torch.float32
        reason = f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 matmul: {native}"
    else:
        dtype, reason = torch.bfloat16, f"device type {device_type}"
    logger.info("fp32_matmul_prec='medium' runs Newton-Schulz in %s on %s (%s; override with %s)",
                str(dtype).removeprefix("torch."), device_type, reason, MEDIUM_DTYPE_ENV)
    return dtype


def medium_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The dtype float32 Newton-Schulz runs in under "medium" on ``device`` (see the module doc)."""
    if _medium_override is not None:
        return _medium_override
    name = os.environ.get(MEDIUM_DTYPE_ENV)
    if name:
        if name not in _MEDIUM_DTYPES:
            raise ValueError(f"{MEDIUM_DTYPE_ENV} must be one of {sorted(_MEDIUM_DTYPES)}, got {name!r}")
        return _MEDIUM_DTYPES[name]
    return _device_medium_dtype(torch.device(device if device is not None else "cpu").type)


def check_ns_dtype(ns_dtype: object) -> NsDtype | None:
    """``ns_dtype`` as given when it is None or one of :data:`NS_DTYPES`, else a ValueError naming it."""
    if ns_dtype is not None and ns_dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be None (fp32_matmul_prec decides) or one of {NS_DTYPES}, got {ns_dtype!r}")
    return ns_dtype  # type: ignore[return-value]


@functools.cache
def log_ns_dtype(ns_dtype: NsDtype) -> None:
    """One log line per process and ``ns_dtype`` (the optimizer calls it for each group's choice)."""
    logger.info("ns_dtype=%r: Newton-Schulz of float32, bfloat16 and float16 matrices runs in %s (float64 in float64)",
                ns_dtype, str(_NS_TORCH_DTYPES[ns_dtype]).removeprefix("torch."))


def compute_dtype(dtype: torch.dtype, device: torch.device | str | None = None, ns_dtype: NsDtype | None = None) -> torch.dtype:
    """dtype the Newton-Schulz iterations run in.

    ``ns_dtype`` given: that dtype for float32, bfloat16 and float16 inputs (float64 stays float64; torch's
    float32 matmul precision still applies to float32 products). None: float32 runs in :func:`medium_dtype`
    when ``torch.get_float32_matmul_precision() == "medium"`` and in float32 under "high" / "highest";
    bfloat16, float16 and float64 run in their own dtype. Results are always returned in the input's dtype.
    """
    if ns_dtype is not None and dtype != torch.float64:
        return _NS_TORCH_DTYPES[ns_dtype]
    if dtype == torch.float32 and _medium_precision():
        return medium_dtype(device)
    return dtype


@torch.compiler.assume_constant_result
def _medium_precision() -> bool:
    """torch's fp32 matmul precision is "medium" (a constant to torch.compile: it is read when tracing)."""
    return torch.get_float32_matmul_precision() == "medium"
