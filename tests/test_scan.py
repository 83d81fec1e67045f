"""The parallel scans equal the sequential loop, values and gradients."""

from __future__ import annotations

import pytest
import torch

from warp_phys.scan import (
    BlockDiagOp,
    DenseOp,
    choose_method,
    power,
    scan,
    scan_reference,
)

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)

F64_TOL = 1e-10  # float64: algorithms differ only by summation order
F32_REL = 1e-5  # float32, relative to the largest state
SHAPES = [(1, 1, 3), (2, 7, 5), (3, 37, 8), (2, 64, 6), (1, 100, 9)]  # (B, T, D), T not 2^k
KINDS = ["dense", "rotation", "diagonal"]
PARALLEL = ["chunked", "doubling"]


def make_op(kind: str, D: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":  # A = 0.97 Q, Q orthogonal: states neither blow up nor vanish
        Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        return DenseOp((0.97 * Q - torch.eye(D, dtype=torch.float64)).to(dtype))
    P = D // 2 if kind == "rotation" else 0
    r = 0.8 + 0.2 * torch.rand(P, generator=g, dtype=dtype)
    w = 3.0 * torch.rand(P, generator=g, dtype=dtype)
    c = 0.8 + 0.2 * torch.rand(D - 2 * P, generator=g, dtype=dtype)
    return BlockDiagOp(r * torch.cos(w), r * torch.sin(w), c)


def inputs(B, T, D, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=dtype), torch.randn(
        B, D, generator=g, dtype=dtype
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", PARALLEL)
def test_parallel_scan_matches_sequential(shape, kind, method):
    op = make_op(kind, shape[2])
    u, h0 = inputs(*shape)
    ref = scan_reference(op, u, h0)
    for chunk in (None, 1, 4, 1000):
        got = scan(op, u, h0, method=method, chunk=chunk)
        assert (got - ref).abs().max() < F64_TOL
    assert (scan(op, u, method=method) - scan_reference(op, u)).abs().max() < F64_TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["sequential", *PARALLEL])
def test_parallel_scan_matches_sequential_float32(kind, method):
    op64 = make_op(kind, 33)
    u64, h064 = inputs(4, 300, 33)
    ref = scan_reference(op64, u64, h064)
    op = type(op64)(*(t.float() for t in op64))
    got = scan(op, u64.float(), h064.float(), method=method).double()
    assert (got - ref).abs().max() / ref.abs().max() < F32_REL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["loop", "sequential", *PARALLEL])
def test_scan_gradients_match_autograd_through_the_loop(kind, method):
    op = make_op(kind, 7)
    u, h0 = inputs(2, 23, 7)
    weights = torch.randn(2, 23, 7, dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (u, h0, *op)]
        out = fn(type(op)(*leaves[2:]), leaves[0], leaves[1])
        (out * weights).sum().backward()
        return [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]

    want = grads(scan_reference)
    got = grads(lambda o, uu, hh: scan(o, uu, hh, method=method, chunk=5))
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(w, g, rtol=0, atol=F64_TOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["sequential", *PARALLEL])
def test_scan_backward_passes_gradcheck(kind, method):
    op = make_op(kind, 5)
    u, h0 = inputs(2, 6, 5)
    leaves = [t.clone().requires_grad_() for t in (u, h0, *op)]

    def fn(uu, hh, *tensors):
        return scan(type(op)(*tensors), uu, hh, method=method, chunk=4)

    assert torch.autograd.gradcheck(fn, leaves)


def test_residual_dense_form_equals_plain_matrix_product():
    op = make_op("dense", 9)
    A = torch.eye(9, dtype=torch.float64) + op.R
    h = torch.randn(4, 9, dtype=torch.float64)
    assert (op.apply(h) - h @ A.T).abs().max() < 1e-14
    for k in (1, 2, 5, 16):
        assert (
            torch.eye(9, dtype=torch.float64) + power(op, k).R - torch.linalg.matrix_power(A, k)
        ).abs().max() < 1e-12


def test_residual_form_keeps_small_deviation_in_float32():
    """A = I + 1e-6 Ã: a plain float32 matrix A would round the deviation away; I + Ã keeps it."""
    R = 1e-6 * torch.randn(16, 16, dtype=torch.float64)
    h = torch.randn(3, 16, dtype=torch.float64)
    exact = h @ R.T  # the deviation's effect on one step
    got = DenseOp(R.float()).apply(h.float()).double() - h.float().double()
    assert (got - exact).abs().max() / exact.abs().max() < 0.1


def test_block_diagonal_operator_is_complex_multiplication():
    op = make_op("rotation", 7)
    h = torch.randn(3, 7, dtype=torch.float64)
    z = torch.complex(h[:, 0:6:2], h[:, 1:6:2]) * torch.complex(op.a, op.b)
    got = op.apply(h)
    assert torch.allclose(got[:, 0:6:2], z.real) and torch.allclose(got[:, 1:6:2], z.imag)
    assert torch.allclose(got[:, 6], op.c * h[:, 6])
    z5 = torch.complex(op.a, op.b) ** 5
    p5 = power(op, 5)
    assert (
        torch.allclose(p5.a, z5.real)
        and torch.allclose(p5.b, z5.imag)
        and torch.allclose(p5.c, op.c**5)
    )


def test_auto_dispatch_is_exact_and_short_sequences_use_the_loop():
    op = make_op("dense", 8)
    u, h0 = inputs(2, 70, 8)
    assert (scan(op, u, h0) - scan_reference(op, u, h0)).abs().max() < F64_TOL
    assert choose_method(op, 2, 4, 8, torch.device("cpu")) == "sequential"
    rot = make_op("rotation", 8)
    assert choose_method(rot, 2, 4, 8, torch.device("cpu"), grad=True) == "loop"


def test_scan_rejects_bad_method_and_shapes():
    op = make_op("dense", 4)
    u, h0 = inputs(2, 5, 4)
    with pytest.raises(ValueError, match="scan method must be one of"):
        scan(op, u, method="magic")
    with pytest.raises(ValueError, match="expects u"):
        scan(op, u, h0[:, :3])
