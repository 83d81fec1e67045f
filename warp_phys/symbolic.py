"""Systems declared with sympy: the vector field, Jacobian and LaTeX derived from expressions.

    @register_system("lorenz63")
    class Lorenz63(SymbolicSystem):
        state = ("x", "y", "z")
        params = {"sigma": Param(10.0, ...), "rho": ..., "beta": ...}
        rhs = ("sigma*(y - x)", "x*(rho - z) - y", "x*y - beta*z")

Each entry of `rhs` is a sympy expression (or a string sympy parses) in the state names,
the parameter names and `t`. The torch vector field is generated once per class with
`sympy.lambdify`, batched like a hand-written one.
"""

from __future__ import annotations

import functools
from functools import cached_property

import sympy
import torch
from sympy.printing.pycode import PythonCodePrinter
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.system import ParamView, System

# sympy function name -> torch function, for lambdify
_TORCH_FUNCS = {
    name: getattr(torch, name)
    for name in ("sin", "cos", "tan", "exp", "log", "sqrt", "tanh", "sinh", "cosh", "abs", "sign")
}
_TORCH_FUNCS.update({"Abs": torch.abs, "asin": torch.asin, "acos": torch.acos, "atan": torch.atan})
_TORCH_FUNCS["atan2"] = torch.atan2


def _heaviside(x: Tensor, h0: float = 0.5) -> Tensor:
    """H(x) with H(0) = h0 (sympy's convention); no gradient, like a comparison."""
    return (x > 0).to(x.dtype) + h0 * (x == 0).to(x.dtype)


# Piecewise functions the Python printer would inline as `a if x == 0 else b` (which a tensor
# cannot take): renamed to plain functions before lambdify, and given torch definitions here.
# DiracDelta (the derivative of Heaviside or sign) is zero almost everywhere.
def _extremum(op):
    def f(*args):
        like = next(a for a in args if isinstance(a, Tensor))
        return functools.reduce(op, [torch.as_tensor(a).to(like) for a in args])

    return f


_PIECEWISE = {
    sympy.sign: "torch_sign",
    sympy.Heaviside: "heaviside",
    sympy.DiracDelta: "dirac",
    sympy.Max: "torch_max",
    sympy.Min: "torch_min",
}
_TORCH_FUNCS.update(
    {
        "torch_sign": torch.sign,
        "heaviside": _heaviside,
        "dirac": lambda x, *_: torch.zeros_like(x),
        "torch_max": _extremum(torch.maximum),
        "torch_min": _extremum(torch.minimum),
    }
)


def _lambdify(args, exprs):
    """Lambdify `exprs` (nested lists) to a torch function of `args`."""

    def plain(e):
        if isinstance(e, list):
            return [plain(x) for x in e]
        for fn, name in _PIECEWISE.items():
            e = e.replace(fn, sympy.Function(name))
        return e

    printer = _Printer(
        {
            "fully_qualified_modules": False,
            "inline": True,
            "allow_unknown_functions": True,
            "user_functions": {name: name for name in _TORCH_FUNCS},
        }
    )  # the settings lambdify gives its own printer
    return sympy.lambdify(args, plain(exprs), modules=[_TORCH_FUNCS, "math"], printer=printer)


class _Printer(PythonCodePrinter):
    """lambdify's printer, with the terms of a sum that print with a minus sign after the
    others: ``y - x`` instead of ``-x + y``, one tensor op (sub) instead of two (neg, add)."""

    def _as_ordered_terms(self, expr, order=None):
        terms = super()._as_ordered_terms(expr, order=order)
        return sorted(terms, key=lambda t: t.could_extract_minus_sign()) if expr.is_Add else terms


class SymbolicSystem(System):
    """A `System` whose vector field is given as sympy expressions in `rhs`."""

    rhs: tuple[str | sympy.Expr, ...] = ()

    @cached_property
    def symbols(self) -> tuple[sympy.Symbol, tuple[sympy.Symbol, ...], tuple[sympy.Symbol, ...]]:
        """Return (t, state symbols, parameter symbols)."""
        t = sympy.Symbol("t", real=True)
        ys = tuple(sympy.Symbol(s, real=True) for s in self.state)
        ps = tuple(sympy.Symbol(p, real=True) for p in self.params)
        return t, ys, ps

    @cached_property
    def expressions(self) -> tuple[sympy.Expr, ...]:
        t, ys, ps = self.symbols
        if len(self.rhs) != len(self.state):
            raise UserError(
                f"system {self.name!r} declares {len(self.state)} states but {len(self.rhs)} "
                f"right-hand sides; give one expression per state"
            )
        local = {s.name: s for s in (t, *ys, *ps)}
        exprs = tuple(sympy.sympify(e, locals=local) for e in self.rhs)
        unknown = set().union(*(e.free_symbols for e in exprs)) - set(local.values())
        if unknown:
            raise UserError(
                f"system {self.name!r}: unknown symbols {sorted(map(str, unknown))} in rhs; "
                f"use the state names {list(self.state)}, parameters {list(self.params)} or t"
            )
        return exprs

    @cached_property
    def _field(self):
        t, ys, ps = self.symbols
        return _lambdify((t, ys, ps), list(self.expressions))

    @cached_property
    def _jac(self):
        t, ys, ps = self.symbols
        jac = sympy.Matrix(self.expressions).jacobian(ys)
        return _lambdify((t, ys, ps), jac.tolist())

    def vector_field(self, t: Tensor, y: Tensor, p: ParamView) -> Tensor:
        t = _tensor(t, y)
        ys = y.unbind(-1)
        rows = self._field(t, ys, _columns(self, p))
        return torch.stack([_full(r, ys[0]) for r in rows], -1)

    def jacobian(self, t: Tensor, y: Tensor, p: ParamView) -> Tensor:
        t = _tensor(t, y)
        ys = y.unbind(-1)
        rows = self._jac(t, ys, _columns(self, p))
        full = [torch.stack([_full(e, ys[0]) for e in row], -1) for row in rows]
        return torch.stack(full, -2)  # (..., state, state)

    # printed once per instance: a store writes them into every split's attributes, and
    # sympy's printers take tens of milliseconds per call
    @cached_property
    def equations(self) -> tuple[str, ...]:  # type: ignore[override]
        _, ys, _ = self.symbols
        return tuple(f"{y}' = {sympy.sstr(e)}" for y, e in zip(ys, self.expressions, strict=True))

    @cached_property
    def _latex(self) -> tuple[str, ...]:
        _, ys, _ = self.symbols
        return tuple(
            rf"\dot{{{sympy.latex(y)}}} = {sympy.latex(e)}"
            for y, e in zip(ys, self.expressions, strict=True)
        )

    def latex(self) -> list[str]:
        return list(self._latex)


def _columns(system: SymbolicSystem, p: ParamView) -> tuple[Tensor, ...]:
    """The parameters of `system` from `p`, in declaration order: one op when `p` holds
    exactly them (as `System.view` makes it), a lookup per name otherwise."""
    names = tuple(system.params)
    return p.values.unbind(-1) if p.names == names else tuple(getattr(p, n) for n in names)


def _tensor(t, like: Tensor) -> Tensor:
    """`t` as a tensor: a fixed-step stepper passes a float, which torch.cos cannot take."""
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=like.dtype, device=like.device)


def _full(value, like: Tensor) -> Tensor:
    """Return `value` (a tensor or a constant of a sympy row) with the shape of `like`."""
    if isinstance(value, Tensor) and value.shape == like.shape:
        return value  # the common case: no extra op on the integrator's hot path
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like)
