"""The speed levers of the WARP core (issue 5) change nothing but speed and memory.

Fast forecast loop (own backward), activation checkpointing, padding, compiled root and the
precision of the dense products, each against the plain path on the CPU (float64 where the
maths is exact); GPU-only checks are marked `gpu` and skipped without CUDA.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from warp_phys.priors.blackbox import BlackBoxRoot

from warp_phys.errors import UserError
from warp_phys.runtime import Runtime
from warp_phys.scan import DenseOp, Residual, scan, scan_reference
from warp_phys.warp import WARP

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)

S, T = 2, 13  # T - 1 = 12 steps: segments, checkpoints and the prefix all split unevenly
EXACT = 1e-12  # float64, relative: the same maths in another order
F32 = 1e-6  # float32, relative: padding and fp32 paths

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


RUNTIME = {f.name for f in dataclasses.fields(Runtime)}


def make_model(*, seed=0, dtype=torch.float64, predict_std=True, **options) -> WARP:
    """A WARP model; options naming `Runtime` fields go to its runtime, the rest to WARP."""
    torch.manual_seed(seed)
    root = BlackBoxRoot(
        state_dim=S, width=8, depth=1, inputs="tau_y", predict_std=predict_std, residual=False
    )
    runtime = Runtime(**{k: v for k, v in options.items() if k in RUNTIME})
    options = {k: v for k, v in options.items() if k not in RUNTIME}
    model = WARP(root=root, state_dim=S, dt=0.1, runtime=runtime, **options).to(dtype)
    with torch.no_grad():  # leave the init (A = I, B = 0) so that every path matters
        for name, p in model.named_parameters():
            scale = 0.01 if name.startswith("transition") else 0.05
            p.add_(scale * torch.randn_like(p))
    return model


def data(B=3, seed=1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    phase = torch.rand(B, 1, generator=g, dtype=torch.float64)
    ys = torch.stack((torch.sin(2 * math.pi * t + phase), torch.cos(3 * t + phase)), -1)
    return ys.to(dtype)  # (B, T, S)


def run(model, ys, context, p=0.5):
    """Return outputs and parameter gradients of one loss (mean and std both used)."""
    model.zero_grad()
    out = model(ys, context=context, teacher_prob=p, generator=torch.Generator().manual_seed(3))
    loss = 0.5 * ((out.mean - ys[:, 1:]) ** 2).mean()
    if out.std is not None:
        loss = loss + out.std.log().mean()
    loss.backward()
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    return out, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_same(got, want, tol):
    (out_a, g_a), (out_b, g_b) = got, want
    assert rel(out_a.mean, out_b.mean) < tol
    if out_b.std is not None:
        assert rel(out_a.std, out_b.std) < tol
    assert g_a.keys() == g_b.keys()
    for name in g_b:
        assert rel(g_a[name], g_b[name]) < tol, name


MODES = [
    dict(transition="dense"),
    dict(transition="dense", anchored=True, init_state="learned"),
    dict(transition="diagonal", time_channel=True),
    dict(transition="rotation", anchored=True),
]


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("context", [1, 5])
def test_fast_loop_equals_autograd_loop(options, context):
    ys = data()
    want = run(make_model(fast_loop=False, **options), ys, context)
    got = run(make_model(fast_loop=True, **options), ys, context)
    assert_same(got, want, EXACT)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_fast_loop_with_all_or_no_teacher_forcing(p):
    ys = data()
    want = run(make_model(fast_loop=False, transition="dense"), ys, 2, p)
    got = run(make_model(fast_loop=True, transition="dense"), ys, 2, p)
    assert_same(got, want, EXACT)


def test_fast_loop_without_std_and_under_no_grad():
    ys = data()
    want = run(make_model(fast_loop=False, predict_std=False), ys, 3)
    got = run(make_model(fast_loop=True, predict_std=False), ys, 3)
    assert got[0].std is None
    assert_same(got, want, EXACT)
    with torch.no_grad():
        out = make_model(fast_loop=True, predict_std=False)(ys, context=3)
    assert rel(out.mean, make_model(fast_loop=False, predict_std=False)(ys, context=3).mean) == 0


def test_fp32_paths_equal_the_plain_loop_bitwise():
    """precision="fp32": the fast loop's forward is the plain loop's, operation for operation."""
    ys = data(dtype=torch.float32)
    options = dict(dtype=torch.float32, transition="dense", precision="fp32")
    plain = make_model(fast_loop=False, **options)
    fast = make_model(fast_loop=True, **options)
    for context in (1, 5, T):
        a = plain(ys, context=context, teacher_prob=0.5, generator=torch.Generator().manual_seed(0))
        b = fast(ys, context=context, teacher_prob=0.5, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)


def test_fp32_equals_the_reference_recurrence():
    """The model's θ trajectory is the textbook loop θ_t = (I + Ã) θ_{t-1} + B Δy_t."""
    model, ys = make_model(transition="dense", precision="fp32"), data()
    theta = model.theta_trajectory(ys)  # (B, T-1, D)
    A = model.transition.matrix()
    th = model.initial_state(ys[:, 0])
    want = [th]
    for t in range(1, T - 1):
        th = th @ A.T + (ys[:, t] - ys[:, t - 1]) @ model.input_map.T
        want.append(th)
    assert rel(theta, torch.stack(want, 1)) < EXACT


@pytest.mark.parametrize("options", MODES)
@pytest.mark.parametrize("K", [1, 3, 5, 100])
def test_checkpointed_paths_equal_plain(options, K):
    ys = data()
    for context in (1, 4, T):  # rollout only, prefix and rollout, teacher-forced only
        want = run(make_model(**options), ys, context)
        got = run(make_model(checkpoint_every=K, **options), ys, context)
        assert_same(got, want, EXACT)


@pytest.mark.parametrize("transition", ["dense", "rotation"])
def test_padding_is_invisible_to_outputs_and_gradients(transition):
    ys = data(dtype=torch.float32)
    plain = make_model(dtype=torch.float32, transition=transition, precision="fp32")
    padded = make_model(dtype=torch.float32, transition=transition, precision="fp32", pad_to=16)
    padded.load_state_dict(plain.state_dict())
    assert padded.padded_dim % 16 == 0 and padded.padded_dim > plain.padded_dim
    for context in (T, 4):
        got, want = run(padded, ys, context), run(plain, ys, context)
        assert (got[0].mean - want[0].mean).abs().max() < F32
        for name in want[1]:
            assert rel(got[1][name], want[1][name]) < 1e-5, name


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_residual_dense_form_equals_plain_form_in_float64(precision):
    """In float64 every precision is exact: A h = h + h Rᵀ = (I + R) h, anchored or not."""
    g = torch.Generator().manual_seed(0)
    R = torch.randn(9, 9, generator=g, dtype=torch.float64)
    h, a = torch.randn(2, 4, 9, generator=g, dtype=torch.float64).unbind(0)
    lin = Residual(R, precision)
    want = h @ (torch.eye(9, dtype=torch.float64) + R).T
    assert (lin.apply(h) - want).abs().max() < 1e-13
    anchor = lin.anchor(a)
    assert (lin.apply(h, anchor) - want).abs().max() < 1e-13


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_reduced_precision_keeps_the_identity_exact(precision):
    """A = I exactly stays I; A = I + 1e-5 Ã errs relative to the deviation, not to θ."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 64, generator=g)
    assert torch.equal(Residual(torch.zeros(64, 64), precision).apply(h), h)
    R = 1e-5 * torch.randn(64, 64, generator=g, dtype=torch.float64)
    exact = h.double() @ R.T  # the deviation's effect on one step
    lin = Residual(R.float(), precision)
    for anchor in (None, lin.anchor(h + 0.01 * torch.randn(4, 64, generator=g))):
        got = lin.apply(h, anchor).double() - h.double()
        assert rel(got, exact) < {"tf32": 2e-3, "bf16": 2e-2, "fp16": 2e-3}[precision]


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
@pytest.mark.parametrize("method", ["sequential", "chunked"])
def test_anchored_scan_in_reduced_precision_tracks_float64(precision, method):
    """A near I, a state that moves little: the anchored products stay near float32."""
    g = torch.Generator().manual_seed(0)
    D, B, L = 96, 3, 200
    R = 1e-3 * torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    u = 1e-3 * torch.randn(B, L, D, generator=g, dtype=torch.float64)
    want = scan_reference(DenseOp(R), u, h0)
    got = scan(DenseOp(R.float()), u.float(), h0.float(), method=method, precision=precision)
    # unanchored the same products err 2e-5 (tf32, fp16) and 2e-4 (bf16)
    assert rel(got.double(), want) < {"tf32": 6e-6, "bf16": 4e-5, "fp16": 6e-6}[precision]


def test_reduced_precision_model_runs_forward_and_backward_on_cpu():
    """bf16/fp16 emulated on a CPU: fast and plain loops agree, gradients are finite."""
    ys = data(dtype=torch.float32)
    for precision in ("bf16", "fp16"):
        options = dict(dtype=torch.float32, transition="dense", precision=precision)
        got = run(make_model(fast_loop=True, **options), ys, 4)
        want = run(make_model(fast_loop=False, **options), ys, 4)
        assert rel(got[0].mean, want[0].mean) < F32
        for name in want[1]:
            assert torch.isfinite(got[1][name]).all()
            assert rel(got[1][name], want[1][name]) < 1e-2, name  # bf16 backward products


def test_auto_precision_is_fp32_on_cpu_and_options_are_checked():
    model = make_model()
    assert model.resolved_precision(torch.device("cpu")) == "fp32"
    assert make_model(precision="bf16").resolved_precision(torch.device("cpu")) == "bf16"
    with pytest.raises(UserError, match="unknown precision 'fp8'"):
        Runtime(precision="fp8")
    with pytest.raises(UserError, match="checkpoint_every"):
        Runtime(checkpoint_every=-1)
    with pytest.raises(ValueError, match="scan precision"):
        scan(DenseOp(torch.zeros(2, 2)), torch.zeros(1, 3, 2), precision="half")


@pytest.mark.slow
def test_compiled_root_equals_eager():
    ys = data()
    want = run(make_model(transition="dense", anchored=True), ys, 4)
    model = make_model(transition="dense", anchored=True, compile_root=True)
    got = run(model, ys, 4)
    assert model.compile  # compiled, not fallen back to eager
    assert_same(got, want, 1e-10)


# -- GPU only ---------------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_gpu_fast_loop_equals_plain_loop(precision):
    ys = data(B=8, dtype=torch.float32).cuda()
    options = dict(dtype=torch.float32, transition="dense", precision=precision, pad_to=16)
    got = run(make_model(fast_loop=True, **options).cuda(), ys, 4)
    want = run(make_model(fast_loop=False, **options).cuda(), ys, 4)
    assert rel(got[0].mean, want[0].mean) < 1e-5
    for name in want[1]:
        assert rel(got[1][name], want[1][name]) < 2e-2, name


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_gpu_reduced_precision_keeps_the_identity_exact(precision):
    h = torch.randn(64, 256, device="cuda")
    assert torch.equal(Residual(torch.zeros(256, 256, device="cuda"), precision).apply(h), h)
    R = 1e-5 * torch.randn(256, 256, device="cuda", dtype=torch.float64)
    exact = h.double() @ R.T
    got = Residual(R.float(), precision).apply(h).double() - h.double()
    assert rel(got, exact) < {"tf32": 5e-3, "bf16": 2e-2, "fp16": 5e-3}[precision]


@pytest.mark.gpu
@cuda
def test_gpu_graph_captured_training_step_equals_eager():
    """A whole training step (forward, backward, optimiser) replays as one CUDA graph."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    ys = data(B=8, dtype=torch.float32).cuda()
    models = [make_model(dtype=torch.float32, transition="dense", pad_to=16).cuda() for _ in "ab"]
    losses = []
    for model, graphed in zip(models, (False, True), strict=True):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graphed)

        def loss_fn(model=model):
            out = model(ys, context=4, teacher_prob=1.0)
            return 0.5 * ((out.mean - ys[:, 1:]) ** 2).mean()

        def body(loss_fn=loss_fn, opt=opt):
            loss = loss_fn()
            loss.backward()
            opt.step()
            return loss.detach()

        step = bench.GraphedStep(body, opt, graph=graphed, warmup=1)
        losses.append(torch.stack([step().clone() for _ in range(4)]))
    assert rel(losses[1], losses[0]) < 1e-5
