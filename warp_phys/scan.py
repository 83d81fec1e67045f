"""Linear recurrence h_t = A h_{t-1} + u_t over a whole sequence, sequential or parallel.

WARP's teacher-forced hidden states follow a linear time-invariant recurrence, so all of
them can be computed without a Python step per time step. Shapes are batch first:
``u (B, T, D)``, ``h0 (B, D)`` (the state before the first input, zero when None) and the
result ``h (B, T, D)`` with ``h_t = A h_{t-1} + u_t``.

A is a linear operator (a small named tuple of tensors):

- `DenseOp(R)`: A = I + R. Only R is multiplied; the identity is added exactly, so a
  reduced-precision product (TF32, bf16) keeps the small deviation of A from I.
- `BlockDiagOp(a, b, c)`: P damped 2x2 rotations [[a, -b], [b, a]] acting on coordinate
  pairs (0, 1), (2, 3), ... (a complex diagonal a + ib), then a real diagonal c on the
  remaining coordinates. A plain diagonal transition is the case P = 0.

Algorithms, exact to float tolerance and differentiable through one custom backward (the
adjoint is the same recurrence run backwards with Aᵀ, and dL/dA is one batched product):

- ``sequential``: T steps of ``(B, D)`` products.
- ``chunked``: split time into C chunks of K. Pass 1 runs all chunks at once from zero
  (K steps of ``(B*C, D)`` products) to get each chunk's final local state; pass 2 carries
  the true state across chunk boundaries with A^K (C steps); pass 3 reruns all chunks at once
  from their true starting states. About 2x the loop's flops in K + C + K steps, each a
  wider product, plus log2(K) squarings of A.
- ``doubling``: Hillis-Steele scan with shared powers A^(2^l) (log2 T levels, each over the
  whole sequence): the fewest steps, log2(T) times the loop's flops.

`scan(...)` picks one (`method="auto"`, see `choose_method`).

Precision of the dense products (`precision=`): see `precision.py`; only the product h Rᵀ
is reduced, the identity part of A = I + R is added exactly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from warp_phys.precision import PRECISIONS, Residual, grad_precision, matmul

METHODS = ("auto", "loop", "sequential", "chunked", "doubling")


class DenseOp(NamedTuple):
    """A = I + R, R ``(D, D)``."""

    R: Tensor

    def apply(self, h: Tensor) -> Tensor:
        """Return A h for h ``(..., D)``: h + h Rᵀ with the identity part exact."""
        flat = h.reshape(-1, h.shape[-1])  # (N, D)
        return torch.addmm(flat, flat, self.R.mT).view(h.shape)

    def transpose(self) -> DenseOp:
        return DenseOp(self.R.mT)

    def compose(self, other: DenseOp) -> DenseOp:
        """Return self∘other = (I + R)(I + S) = I + R + S + RS, in residual form."""
        return DenseOp(torch.addmm(self.R + other.R, self.R, other.R))

    def param_grads(self, g: Tensor, h_prev: Tensor, precision: str = "fp32") -> tuple[Tensor]:
        """dL/dR = Σ_{b,t} g_{bt} h_prev_{bt}ᵀ, one product (at `precision`, float32 sum)."""
        D = g.shape[-1]
        return (matmul(g.reshape(-1, D).mT, h_prev.reshape(-1, D), precision),)  # (D, D)


class BlockDiagOp(NamedTuple):
    """P rotations (a, b) ``(P,)`` on the first 2P coordinates, then diagonal c ``(Q,)``."""

    a: Tensor
    b: Tensor
    c: Tensor

    def apply(self, h: Tensor) -> Tensor:
        """Return A h for h ``(..., 2P + Q)``."""
        P = self.a.shape[0]
        if P == 0:
            return h * self.c
        pairs = h[..., : 2 * P].unflatten(-1, (P, 2))  # (..., P, 2)
        x, y = pairs.unbind(-1)
        rot = torch.stack((self.a * x - self.b * y, self.b * x + self.a * y), -1).flatten(-2)
        if self.c.shape[0] == 0:
            return rot
        return torch.cat((rot, h[..., 2 * P :] * self.c), -1)

    def transpose(self) -> BlockDiagOp:
        return BlockDiagOp(self.a, -self.b, self.c)

    def compose(self, other: BlockDiagOp) -> BlockDiagOp:
        """Complex product of the rotations, elementwise product of the diagonals."""
        a = self.a * other.a - self.b * other.b
        b = self.a * other.b + self.b * other.a
        return BlockDiagOp(a, b, self.c * other.c)

    def param_grads(
        self, g: Tensor, h_prev: Tensor, precision: str = "fp32"
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Sum over batch and time of the elementwise products that make A h (float32)."""
        P = self.a.shape[0]
        D = g.shape[-1]
        g2, h2 = g.reshape(-1, D), h_prev.reshape(-1, D)  # (N, D)
        gx, gy = g2[:, 0 : 2 * P : 2], g2[:, 1 : 2 * P : 2]  # (N, P)
        x, y = h2[:, 0 : 2 * P : 2], h2[:, 1 : 2 * P : 2]  # (N, P)
        da = (gx * x + gy * y).sum(0)
        db = (gy * x - gx * y).sum(0)
        dc = (g2[:, 2 * P :] * h2[:, 2 * P :]).sum(0)
        return da, db, dc


LinearOp = DenseOp | BlockDiagOp


class Elementwise:
    """A block-diagonal op behind the same interface as `Residual` (no precision to set)."""

    def __init__(self, op: BlockDiagOp) -> None:
        self.op = op
        # A h = α ⊙ h + β ⊙ swap(h), swap exchanging each pair: 3 kernels a step, not 8
        P, Q = op.a.shape[0], op.c.shape[0]
        self.alpha = torch.cat((op.a.repeat_interleave(2), op.c))  # (D,)
        self.beta = torch.cat((torch.stack((-op.b, op.b), -1).flatten(), op.c.new_zeros(Q)))
        pairs = torch.arange(2 * P, device=op.a.device).view(P, 2).flip(-1).flatten()
        self.swap = torch.cat((pairs, torch.arange(2 * P, 2 * P + Q, device=op.a.device)))

    def anchor(self, a: Tensor) -> None:
        return None

    def apply(self, h: Tensor, anchor: None = None, *, add=None, update=None, out=None) -> Tensor:
        """Return A h (+ add + U V), as `Residual.apply`."""
        r = h * self.alpha
        if self.op.a.shape[0]:
            r = torch.addcmul(r, h.index_select(-1, self.swap), self.beta)
        if add is not None:
            r = r + add
        if update is not None:
            U, V = update
            r = r + U @ V
        return r if out is None else out.copy_(r)


def prepare(op: LinearOp, precision: str = "fp32") -> Residual | Elementwise:
    """Return `op` ready for repeated products at `precision` (cast copies made once)."""
    return Residual(op.R, precision) if isinstance(op, DenseOp) else Elementwise(op)


def power(op: LinearOp, k: int) -> LinearOp:
    """Return A^k (k >= 1) by binary exponentiation, staying in each op's own form."""
    result, base = None, op
    while True:
        if k & 1:
            result = base if result is None else result.compose(base)
        k >>= 1
        if not k:
            return result
        base = base.compose(base)


def scan_reference(op: LinearOp, u: Tensor, h0: Tensor | None = None) -> Tensor:
    """Plain loop differentiated by autograd step by step: the reference for tests."""
    h = torch.zeros_like(u[:, 0]) if h0 is None else h0
    out = []
    for u_t in u.unbind(1):  # one unbind: indexing u[:, t] would cost a full-size grad per step
        h = op.apply(h) + u_t
        out.append(h)
    return torch.stack(out, 1)  # (B, T, D)


def _autograd_loop(lin, u: Tensor, h0: Tensor | None) -> Tensor:
    """T steps differentiated by autograd step by step (the "loop" method)."""
    h, out = h0, []
    for u_t in u.unbind(1):  # one unbind: indexing u[:, t] would cost a full-size grad per step
        h = u_t if h is None else lin.apply(h) + u_t
        out.append(h)
    return torch.stack(out, 1)  # (B, T, D)


def _sequential(
    op: LinearOp, u: Tensor, h0: Tensor | None, chunk: int, powers: dict, precision: str
) -> Tensor:
    lin = prepare(op, precision)
    out = torch.empty_like(u)
    h, anchor = h0, None
    for t in range(u.shape[1]):
        if h is None:
            h = u[:, t]
        else:
            anchor = anchor or lin.anchor(h)  # the first state multiplied
            h = lin.apply(h, anchor, add=u[:, t], out=out[:, t])
            continue
        out[:, t] = h
    return out


def _chunked(
    op: LinearOp, u: Tensor, h0: Tensor | None, chunk: int, powers: dict, precision: str
) -> Tensor:
    B, T, D = u.shape
    K = max(1, min(chunk, T))
    C = -(-T // K)
    if C * K != T:  # zero inputs after the end change nothing before it
        u = torch.cat((u, u.new_zeros(B, C * K - T, D)), 1)
    uc = u.view(B, C, K, D)  # (B, C, K, D)
    lin = prepare(op, precision)
    # pass 1: each chunk's final state from a zero start (the last chunk's is never needed);
    # local states are small, so no anchor
    s = uc[:, :-1, 0]
    for j in range(1, K):
        s = lin.apply(s) + uc[:, :-1, j]  # (B, C-1, D)
    # pass 2: true state before each chunk
    starts = u.new_empty(B, C, D)
    h = torch.zeros_like(u[:, 0]) if h0 is None else h0
    starts[:, 0] = h
    if C > 1:
        if K not in powers:  # A^K costs log2(K) D x D products: computed once per forward
            powers[K] = power(op, K)
        AK, anchor = prepare(powers[K], precision), None
        for c in range(1, C):
            if h0 is None and c == 1:
                h = s[:, 0]  # A^K 0 + s_0
            else:
                anchor = anchor or AK.anchor(h)
                h = AK.apply(h, anchor) + s[:, c - 1]
            starts[:, c] = h
    # pass 3: rerun every chunk from its true start, anchored there
    out = torch.empty_like(uc)
    h = starts
    anchor = lin.anchor(starts)
    for j in range(K):
        h = lin.apply(h, anchor, add=uc[:, :, j], out=out[:, :, j])  # (B, C, D)
    return out.view(B, C * K, D)[:, :T]


def _doubling(
    op: LinearOp, u: Tensor, h0: Tensor | None, chunk: int, powers: dict, precision: str
) -> Tensor:
    T = u.shape[1]
    h = u.clone()
    if h0 is not None:
        h[:, 0] += prepare(op, precision).apply(h0)
    shift = 1
    while shift < T:
        if shift not in powers:  # kept for the backward: log2(T) D x D matrices
            powers[shift] = op if shift == 1 else powers[shift // 2].compose(powers[shift // 2])
        # h_t <- h_t + A^shift h_{t-shift}: after this level h_t sums 2*shift inputs
        lin = prepare(powers[shift], precision)
        h = torch.cat((h[:, :shift], h[:, shift:] + lin.apply(h[:, :-shift])), 1)
        shift *= 2
    return h


_ALGOS = {"sequential": _sequential, "chunked": _chunked, "doubling": _doubling}


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, algo, chunk, precision, op_type, u, h0, *tensors):
        op = op_type(*tensors)
        powers: dict[int, LinearOp] = {}
        h = _ALGOS[algo](op, u, h0, chunk, powers, precision)
        ctx.algo, ctx.chunk, ctx.op_type, ctx.has_h0 = algo, chunk, op_type, h0 is not None
        ctx.precision = grad_precision(precision)
        ctx.powers = powers  # (A^k)ᵀ = (Aᵀ)^k: the backward reuses them
        ctx.save_for_backward(h, *(() if h0 is None else (h0,)), *tensors)
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gh):
        h, *rest = ctx.saved_tensors
        h0 = rest.pop(0) if ctx.has_h0 else None
        op = ctx.op_type(*rest)
        opT = op.transpose()
        # adjoint: g_t = dL/dh_t + Aᵀ g_{t+1}, the same recurrence backwards in time
        powers = {k: p.transpose() for k, p in ctx.powers.items()}
        g = _ALGOS[ctx.algo](opT, gh.flip(1), None, ctx.chunk, powers, ctx.precision).flip(1)
        first = torch.zeros_like(h[:, :1]) if h0 is None else h0.unsqueeze(1)
        h_prev = torch.cat((first, h[:, :-1]), 1)  # (B, T, D)
        grads = (
            op.param_grads(g, h_prev, ctx.precision)
            if any(ctx.needs_input_grad[6:])
            else (None,) * len(rest)
        )
        g_h0 = prepare(opT, ctx.precision).apply(g[:, 0]) if ctx.needs_input_grad[5] else None
        return None, None, None, None, g, g_h0, *grads


def default_chunk(T: int) -> int:
    """Chunk length near the minimiser sqrt(T/2) of the step count 2K + T/K, a power of two
    so that A^K takes only log2(K) squarings."""
    return 2 ** max(0, round(math.log2(math.sqrt(T / 2)))) if T > 1 else 1


# Cost model of `choose_method`, per device type. rows: a D x D product with fewer rows than
# this costs as much as this many (memory- or launch-bound). overhead: per elementwise step,
# the cost of that many elements (kernel launches). CPU: fitted on 2 cores
# (benchmarks/results/scan_cpu.md). CUDA: estimates for an H100, to be measured.
COST = {"cpu": {"rows": 64, "overhead": 4e3}, "cuda": {"rows": 512, "overhead": 1e6}}


def scan_costs(op: LinearOp, B: int, T: int, D: int, device: torch.device) -> dict[str, float]:
    """Return the modelled cost of each algorithm (D x D row-products, or elements)."""
    c = COST.get(device.type, COST["cpu"])
    K = default_chunk(T)
    C = -(-T // K)
    levels = max(1, math.ceil(math.log2(T)))
    if isinstance(op, DenseOp):

        def step(rows: int) -> float:
            return max(rows, c["rows"]) * D * D

        return {
            "sequential": T * step(B),
            "chunked": 2 * K * step(B * C) + C * step(B) + math.log2(K) * D**3,
            "doubling": levels * (step(B * T) + D**3),
        }

    def step(n: int) -> float:
        return c["overhead"] + n

    return {
        "sequential": T * step(B * D),
        "chunked": 2 * K * step(B * C * D) + C * step(B * D),
        "doubling": levels * step(B * T * D),
    }


def choose_method(
    op: LinearOp, B: int, T: int, D: int, device: torch.device, grad: bool = False
) -> str:
    """Pick the algorithm with the lowest modelled cost for this shape and device.

    A dense step with few rows is memory-bound on a CPU and launch-bound on a GPU, so the
    chunked scan's fewer, wider products win for small batches, and the loop (half the
    flops, no D^3 powers) wins for wide batches or large D. Elementwise steps are cheap:
    the loop wins unless per-step overhead dominates (tiny B * D, or any GPU). With `grad`
    on a CPU, an elementwise loop is best differentiated step by step by autograd ("loop"):
    its small per-step gradients stay in cache, while the custom backward streams the whole
    (B, T, D) trajectory several times (benchmarks/results/scan_cpu.md).
    """
    if T < 8:  # nothing to gain
        best = "sequential"
    else:
        costs = scan_costs(op, B, T, D, device)
        best = min(costs, key=costs.get)
    if best == "sequential" and grad and isinstance(op, BlockDiagOp) and device.type == "cpu":
        return "loop"
    return best


def scan(
    op: LinearOp,
    u: Tensor,
    h0: Tensor | None = None,
    *,
    method: str = "auto",
    chunk: int | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Return h ``(B, T, D)`` with h_t = A h_{t-1} + u_t and h_{-1} = h0 (zero when None).

    Args:
        op: the transition A (`DenseOp` or `BlockDiagOp`).
        u: inputs ``(B, T, D)``.
        h0: state before the first step ``(B, D)``, or None for zero.
        method: "auto" | "loop" (plain autograd) | "sequential" | "chunked" | "doubling".
        chunk: chunk length for "chunked" (default about sqrt(T/2)).
        precision: "fp32" | "tf32" | "bf16" | "fp16", of the dense products (module
            docstring); the backward uses `grad_precision(precision)`.
    """
    if method not in METHODS:
        raise ValueError(f"scan method must be one of {', '.join(METHODS)}; got {method!r}")
    if precision not in PRECISIONS:
        raise ValueError(
            f"scan precision must be one of {', '.join(PRECISIONS)}; got {precision!r}"
        )
    if u.dim() != 3 or (h0 is not None and h0.shape != (u.shape[0], u.shape[2])):
        raise ValueError(
            f"scan expects u (B, T, D) and h0 (B, D); got u {tuple(u.shape)}, "
            f"h0 {None if h0 is None else tuple(h0.shape)}"
        )
    B, T, D = u.shape
    if T == 0:
        return u.clone()
    if method == "auto":
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, h0, *op)
        )
        method = choose_method(op, B, T, D, u.device, grad)
    if method == "loop":
        return _autograd_loop(prepare(op, precision), u, h0)
    K = chunk or default_chunk(T)
    return _LinearScan.apply(method, K, precision, type(op), u, h0, *op)
