"""Precision of the dense products h Rᵀ with A = I + R: ``fp32``, ``tf32``, ``bf16``, ``fp16``.

Only the product h Rᵀ is reduced (float32 states only; float64 is always exact): the identity
part of A = I + R is added exactly, and products accumulate and return in float32 (fp16 with
R scaled by a power of two into its range; ``fp32`` is IEEE also when TF32 is switched on
globally). The error of a reduced product is relative to the operand, so the loops multiply
the change of the state since an anchor a, h Rᵀ = a Rᵀ + (h - a) Rᵀ, with a Rᵀ computed once
in IEEE float32: the state moves little per step while A is near I, so the rounded operand is
small. On a CPU there are no TF32/bf16/fp16 matrix units: the rounding of the operands is
emulated (float32 products of rounded operands), for tests; the CPU default is fp32.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)


PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_PEAK = 2.0**8  # fp16 copies of R are scaled so that max |R| lands near this


def grad_precision(precision: str) -> str:
    """Return the precision of backward products: fp16 has too little range for gradients."""
    return "bf16" if precision == "fp16" else precision


class _Fp32Mode(contextlib.AbstractContextManager):
    """Set CUDA's float32 matmul mode ("ieee" or "tf32") for a block, then restore it."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __enter__(self):
        m = torch.backends.cuda.matmul
        try:
            self.old = ("new", m.fp32_precision)
            m.fp32_precision = self.mode
        except (AttributeError, RuntimeError):  # torch < 2.9, or the legacy flag in use
            self.old = ("legacy", m.allow_tf32)
            m.allow_tf32 = self.mode == "tf32"
        return self

    def __exit__(self, *exc):
        api, value = self.old
        if api == "new":
            torch.backends.cuda.matmul.fp32_precision = value
        else:
            torch.backends.cuda.matmul.allow_tf32 = value
        return False


def _mode(precision: str, t: Tensor):
    if not t.is_cuda:
        return contextlib.nullcontext()
    return _Fp32Mode("tf32" if precision == "tf32" else "ieee")


def _round_tf32(x: Tensor) -> Tensor:
    """Round float32 to TF32's 10 mantissa bits (nearest): CPU emulation of TF32 operands."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


_MM_OUT_DTYPE: list[bool] = []  # whether torch.mm(..., out_dtype=float32) works here


def _mm_low(a: Tensor, b: Tensor) -> Tensor:
    """Return a @ b in float32 for bf16/fp16 operands (float32 accumulation and result)."""
    differentiable = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if a.is_cuda and not differentiable and _MM_OUT_DTYPE != [False]:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError) as err:
            log.warning("torch.mm(out_dtype=float32) unavailable (%s): emulating", err)
            _MM_OUT_DTYPE[:] = [False]
        else:
            _MM_OUT_DTYPE[:] = [True]
            return out
    return a.float() @ b.float()  # exact products of the rounded operands, float32 sums


def matmul(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """Return a @ b for float32 a ``(N, K)``, b ``(K, M)`` at `precision` (fp16 -> bf16:
    no scaling for arbitrary operands), accumulated in float32."""
    if a.dtype != torch.float32 or precision in ("fp32", "tf32"):
        if precision == "tf32" and not a.is_cuda and a.dtype == torch.float32:
            return _round_tf32(a) @ _round_tf32(b)
        with _mode(precision, a):
            return a @ b
    dtype = _LOW[grad_precision(precision)]
    if a.is_cuda:
        return _mm_low(a.to(dtype), b.to(dtype))
    return a.to(dtype).float() @ b.to(dtype).float()


class Anchor(NamedTuple):
    """A reference state a and its exact product c = a Rᵀ (see the module docstring)."""

    a: Tensor
    c: Tensor


class Residual:
    """A = I + R prepared for repeated products h ↦ A h at one precision."""

    def __init__(self, R: Tensor, precision: str) -> None:
        self.R = R
        self.precision = precision if R.dtype == torch.float32 else "fp32"
        self.low = self.inv = None
        if self.precision in _LOW:
            R32 = R
            if self.precision == "fp16":  # a power of two: the scaling is exact
                amax = R.detach().abs().amax()
                e = torch.floor(torch.log2(FP16_PEAK / amax)).clamp(-60, 60)
                scale = torch.where(amax > 0, torch.exp2(e), torch.ones_like(amax))
                R32, self.inv = R * scale, 1.0 / scale
            self.low = R32.to(_LOW[self.precision])
            if not R.is_cuda:
                self.low = self.low.float()
        elif self.precision == "tf32" and not R.is_cuda:
            self.low = _round_tf32(R)

    def product(self, x: Tensor, scaled: bool = False) -> Tensor:
        """Return x Rᵀ ``(N, D)`` for x ``(N, D)`` (float32, or already in the low dtype) at
        this precision; with `scaled`, fp16 leaves the product scaled (times 1 / `inv`)."""
        if self.low is None:
            with _mode(self.precision, x):
                return x @ self.R.mT
        if self.precision == "tf32":  # CPU emulation
            return _round_tf32(x) @ self.low.mT
        xl = x.to(_LOW[self.precision])
        out = _mm_low(xl, self.low.mT) if x.is_cuda else xl.float() @ self.low.mT
        return out if self.inv is None or scaled else out.mul_(self.inv)

    def accurate(self, h: Tensor) -> Tensor:
        """Return h Rᵀ in IEEE float32 (or float64)."""
        with _mode("fp32", h):
            return h @ self.R.mT

    def anchor(self, a: Tensor) -> Anchor | None:
        """Return the anchor at state a ``(..., D)``, or None where it gains nothing."""
        if self.precision == "fp32":
            return None
        flat = a.reshape(-1, a.shape[-1])
        return Anchor(flat, self.accurate(flat))

    def apply(
        self,
        h: Tensor,
        anchor: Anchor | None = None,
        *,
        add: Tensor | None = None,
        update: tuple[Tensor, Tensor] | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """Return A h (+ add + U V) for h ``(..., D)``: h + h Rᵀ, the identity part exact.

        add: an input ``(..., D)``; update: (U ``(..., k)``, V ``(k, D)``), a low-rank input
        added in IEEE float32; out: write the result there (no autograd).
        """
        flat = h.reshape(-1, h.shape[-1])  # (N, D)
        base, x = flat, flat
        if anchor is not None:
            base = flat + anchor.c
            x = flat - anchor.a
            if self.low is not None and flat.is_cuda and not torch.is_grad_enabled():
                x = torch.sub(flat, anchor.a, out=flat.new_empty(flat.shape, dtype=self.low.dtype))
        if add is not None:
            add = add.reshape(flat.shape)
            base = base + add if base is flat or torch.is_grad_enabled() else base.add_(add)
        if update is not None:
            U, V = update
            with _mode("fp32", h):
                base = torch.addmm(base, U.reshape(-1, U.shape[-1]), V)  # (N, D)
        dest = None if out is None else out.view(flat.shape)  # (N, D), a view of out
        if self.low is None:  # fp32, tf32 on CUDA, float64: one addmm, identity in its epilogue
            with _mode(self.precision, h):
                return torch.addmm(base, x, self.R.mT, out=dest).view(h.shape)
        p = self.product(x, scaled=True)
        if self.inv is not None:
            return torch.addcmul(base, p, self.inv, out=dest).view(h.shape)
        return torch.add(base, p, out=dest).view(h.shape)
