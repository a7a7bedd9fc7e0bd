"""Checks of optimizer options: numbers, choices, and the keyword arguments a constructor accepts."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, high_open: bool = False) -> float:
    """Raise unless ``value`` is a finite number with ``low <= value <= high`` (``< high`` when ``high_open``)."""
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _own_init(cls: type) -> Any:
    return cls.__dict__.get("__init__")


@functools.cache
def accepted_keywords(factory: Any) -> frozenset[str]:
    """The keyword arguments an optimizer class (or functools.partial of one) accepts, following
    ``**kwargs`` that an ``__init__`` forwards to its base class (up to a class that sets
    ``forwards_to_torch_optimizer = True``: its ``**kwargs`` are its subclasses' own options)."""
    if isinstance(factory, functools.partial):
        return accepted_keywords(factory.func)
    names: set[str] = set()
    for cls in factory.__mro__ if isinstance(factory, type) else ():
        init = _own_init(cls)
        if init is None:
            continue
        forwards = False
        # A base reached through **kwargs takes only the options it lets subclasses forward.
        allowed = cls.__dict__.get("forwarded_options") if cls is not factory else None
        for param in list(inspect.signature(init).parameters.values())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif param.kind is not inspect.Parameter.VAR_POSITIONAL and param.name != "params":
                if allowed is None or param.name in allowed:
                    names.add(param.name)
        if not forwards or cls.__dict__.get("forwards_to_torch_optimizer", False):
            break
    return frozenset(names)


def reject_unknown(owner: str, kwargs: dict[str, Any], accepted: frozenset[str]) -> None:
    """TypeError naming every key of ``kwargs`` not in ``accepted``, and the accepted ones."""
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"{owner} got unknown keyword argument(s) {unknown}; it accepts: {sorted(accepted)}")
