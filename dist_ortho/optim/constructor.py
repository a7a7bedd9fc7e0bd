"""An optimizer class's constructor, made from its settings (dist_ortho.optim.settings).

A class declares ``settings`` (a settings dataclass) and ``positional`` (the names its constructor takes by
position after ``params``); :func:`install` gives it

    __init__(self, params, *positional, *, keyword...)   every field with ``keyword`` true, its default, its type
    the Args section of its docstring                    every such field's doc line

The constructor binds its arguments to that signature (an unknown keyword is a TypeError naming it and the accepted
ones, before anything runs), lets the class ``translate`` them (another library's names, normalization), builds the
frozen settings and hands them to ``_construct``. A class that writes its own ``__init__`` keeps it
(its ``super().__init__(...)`` reaches the generated one of its base).
"""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
from typing import Any

from torch.optim.optimizer import ParamsT

from dist_ortho.optim.options import accepted_keywords, reject_unknown

_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
_KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _default(field: dataclasses.Field) -> Any:
    return inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default


def signature_of(cls: type) -> inspect.Signature:
    """``(self, params, <positional>, *, <the other keywords>)`` of ``cls.settings``."""
    fields = {f.name: f for f in dataclasses.fields(cls.settings) if f.metadata["keyword"]}
    missing = [name for name in cls.positional if name not in fields]
    if missing:
        raise TypeError(f"{cls.__name__}.positional names {missing}, which {cls.settings.__name__} does not take")
    parameters = [inspect.Parameter("self", _POSITIONAL), inspect.Parameter("params", _POSITIONAL, annotation=ParamsT)]
    parameters += [inspect.Parameter(name, _POSITIONAL, default=_default(fields[name]), annotation=fields[name].type)
                   for name in cls.positional]
    parameters += [inspect.Parameter(f.name, _KEYWORD, default=_default(f), annotation=f.type)
                   for f in fields.values() if f.name not in cls.positional]
    return inspect.Signature(parameters)


def args_doc(cls: type) -> str:
    """The Args section of ``cls``'s docstring, from its settings' doc lines."""
    lines = ["Args:", "    params: parameters or parameter groups (or model.named_parameters())."]
    for f in dataclasses.fields(cls.settings):
        if f.metadata["keyword"]:
            scope = "" if f.metadata["scope"] != "group" else " Per group."
            text = f"{f.name}: {f.metadata['doc']}.{scope}"
            lines += textwrap.wrap(text, 112, initial_indent="    ", subsequent_indent="        ")
    return "\n".join(lines)


def _generated_init(cls: type) -> Any:
    signature = signature_of(cls)

    def __init__(self: Any, params: Any, *args: Any, **kwargs: Any) -> None:
        reject_unknown(cls.__name__, kwargs, accepted_keywords(cls))
        bound = signature.bind(self, params, *args, **kwargs)
        given = frozenset(bound.arguments) - {"self", "params"}
        bound.apply_defaults()
        options = {k: v for k, v in bound.arguments.items() if k not in ("self", "params")}
        options = cls.translate(options, given)
        self._construct(params, cls.settings(**options))

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = f"Build a {cls.__name__} (see the class doc's Args)."
    return __init__


def install(cls: type) -> None:
    """Give ``cls`` the constructor and argument docs of its settings, unless it writes its own ``__init__``."""
    if "__init__" in cls.__dict__:
        return
    cls.__init__ = _generated_init(cls)  # type: ignore[misc]
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or f"{cls.__name__} (see the module {cls.__module__}).")
    if "\nArgs:" not in doc:
        cls.__doc__ = f"{doc}\n\n{args_doc(cls)}"
