"""Trace numeric Python into sympy: run a right-hand side written for numpy on symbols.

Catalogues such as dysts write their vector fields as plain Python over numbers and numpy
arrays. Called with sympy symbols instead, arithmetic builds the expression; numpy's
elementary functions do not (``np.sin(Symbol)`` looks for a ``.sin()`` method), so the code is
re-run with a stand-in for ``np`` whose elementary functions dispatch on their argument:

    fn = with_numpy(rhs, SYMPY_NUMPY, SYMPY_BUILTINS)   # the same code, reading SYMPY_NUMPY as `np`
    fn(sympy.Symbol("x"), ...)             # -> sympy expressions

Anything the stand-in cannot follow (a branch on a symbolic value, ``np.min`` of symbols,
``np.where``) raises, and the caller falls back to numbers. A trace is a claim, not a proof:
callers verify the traced expressions against the original code at random points.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import sympy


def _elementwise(symbolic: Callable, numeric: Callable) -> Callable:
    """Return f(x, *args): `symbolic` on sympy objects (elementwise over object arrays), else
    `numeric` (numpy's own function on numbers)."""

    def f(x, *args):
        if isinstance(x, np.ndarray) and x.dtype == object:
            return np.vectorize(lambda v: f(v, *args), otypes=[object])(x)
        if isinstance(x, sympy.Basic) or any(isinstance(a, sympy.Basic) for a in args):
            return symbolic(x, *args)
        return numeric(x, *args)

    return f


class SympyNumpy(types.SimpleNamespace):
    """`numpy` with its elementary functions (sin, exp, heaviside, ...) taught sympy.

    Every other attribute is numpy's own, so array code (``np.zeros_like``, ``np.matmul`` on
    object arrays, ``np.sum``) keeps working on arrays of expressions."""

    def __getattr__(self, name: str) -> Any:  # only called for names not set below
        return getattr(np, name)


_FUNCTIONS = {
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "arcsin": sympy.asin,
    "arccos": sympy.acos,
    "arctan": sympy.atan,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
    "exp": sympy.exp,
    "log": sympy.log,
    "sqrt": sympy.sqrt,
    "abs": sympy.Abs,
    "absolute": sympy.Abs,
    "sign": sympy.sign,
    "heaviside": sympy.Heaviside,
    "arctan2": sympy.atan2,
}
SYMPY_NUMPY = SympyNumpy(
    pi=sympy.pi, **{name: _elementwise(fn, getattr(np, name)) for name, fn in _FUNCTIONS.items()}
)


def _extremum(symbolic: Callable, numeric: Callable) -> Callable:
    """Builtin max/min that return sympy's Max/Min when an argument is symbolic."""

    def f(*args, **kwargs):
        if not kwargs and len(args) > 1 and any(isinstance(a, sympy.Basic) for a in args):
            return symbolic(*args)
        return numeric(*args, **kwargs)

    return f


# builtins a right-hand side may call on symbols (``max(0, x)``)
SYMPY_BUILTINS = {"max": _extremum(sympy.Max, max), "min": _extremum(sympy.Min, min)}


def with_numpy(fn: Callable, numpy_module: Any, builtins: dict[str, Any] | None = None) -> Callable:
    """Return a copy of the plain function `fn` whose global ``np`` is `numpy_module` (and
    whose globals `builtins` shadow those builtins).

    A numba dispatcher is unwrapped to the Python function it compiles (``.py_func``)."""
    fn = getattr(fn, "py_func", fn)
    scope = {**fn.__globals__, **(builtins or {}), "np": numpy_module}
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy
