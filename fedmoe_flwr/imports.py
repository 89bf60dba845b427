"""Objects named by import strings in the config (``dataset.loader``, ``model.factory``).

``"my_pkg.data:load"`` (or ``"my_pkg.data.load"``) names ``load`` in module ``my_pkg.data``;
the module must be importable (installed, or on ``PYTHONPATH``). A string that does not
resolve raises ValueError naming the setting it came from.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable


def import_object(spec: str, setting: str):
    """The object ``spec`` names; ``setting`` (e.g. ``"dataset.loader"``) labels errors."""
    spec = str(spec or "").strip()
    if not spec:
        raise ValueError(f"{setting} is empty; give an import string such as {setting}=my_pkg.module:function")
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{setting}={spec!r} is not an import string like my_pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as ex:
        raise ValueError(f"{setting}={spec!r}: cannot import module {module_name!r} ({ex}); "
                         "is its package installed or on PYTHONPATH?") from ex
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{setting}={spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_with_accepted(fn: Callable, available: dict, setting: str):
    """``fn(**kwargs)`` with the keyword arguments of ``available`` that ``fn`` names (all of
    them if it takes ``**kwargs``). A required parameter that is not available raises
    TypeError naming ``setting`` and what is available."""
    if not callable(fn):
        raise ValueError(f"{setting} names a {type(fn).__name__}, not a function or class")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: call it plainly
        return fn()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in available]
    if missing:
        raise TypeError(f"{setting}: {getattr(fn, '__qualname__', fn)} requires {missing}; it may take any of "
                        f"{sorted(available)}")
    return fn(**{n: v for n, v in available.items() if n in params})
