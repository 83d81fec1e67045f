"""WARP: one recurrence, teacher-forced by scan or looped, with the paper's init."""

from __future__ import annotations

import math

import pytest
import torch
from warp_phys.priors.blackbox import BlackBoxRoot

from warp_phys.errors import UserError
from warp_phys.root import AbstractRoot
from warp_phys.runtime import Runtime
from warp_phys.transition import IDENTITY_NU, Dense, Rotation, build_transition
from warp_phys.warp import WARP

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)

S, T = 2, 13  # T - 1 = 12 steps: chunked and looped paths both exercised
EXACT = 1e-10  # float64, same maths in another order


def make_model(*, seed=0, perturb=True, scan_method="auto", **options) -> WARP:
    torch.manual_seed(seed)
    root = BlackBoxRoot(state_dim=S, width=8, depth=1, inputs="tau_y", predict_std=True)
    runtime = Runtime(scan_method=scan_method)
    model = WARP(root=root, state_dim=S, dt=0.1, runtime=runtime, **options).double()
    if perturb:  # leave the init (A = I, B = 0, φ constant) so that every path matters
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def data(B=3, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    phase = torch.rand(B, 1, generator=g, dtype=torch.float64)
    return torch.stack(
        (torch.sin(2 * math.pi * t + phase), torch.cos(3 * t + phase)), -1
    )  # (B, T, S)


MODES = [
    dict(transition="dense"),
    dict(transition="dense", anchored=True, init_state="learned"),
    dict(transition="diagonal", time_channel=True),
    dict(transition="rotation", anchored=True),
    dict(transition="rotation", scan_method="doubling"),
]


@pytest.mark.parametrize("options", MODES)
def test_autoregressive_with_full_teacher_forcing_equals_teacher_forced(options):
    model, ys = make_model(**options), data()
    tf = model(ys, context=T)
    for context in (1, 5):
        ar = model(ys, context=context, teacher_prob=1.0)
        assert (ar.mean - tf.mean).abs().max() < EXACT and (ar.std - tf.std).abs().max() < EXACT
    assert tf.mean.shape == (3, T - 1, S)


def test_scan_methods_agree_inside_the_model():
    model, ys = make_model(transition="dense"), data()
    outs = []
    for method in ("sequential", "chunked", "doubling"):
        model.scan_method = method
        outs.append(model.theta_trajectory(ys))
    assert all((o - outs[0]).abs().max() < EXACT for o in outs)


@pytest.mark.parametrize("init_state", ["hypernet", "learned"])
def test_at_init_the_model_ignores_its_inputs(init_state):
    model = make_model(perturb=False, init_state=init_state)
    ys, other = data(seed=1), data(seed=2)
    other[:, 0] = ys[:, 0]  # same first state (θ_0 = φ(y_0)), different path
    assert torch.equal(model.theta_trajectory(ys), model.theta_trajectory(other))
    theta = model.theta_trajectory(ys)
    assert torch.equal(theta, theta[:, :1].expand_as(theta))  # θ_t = θ_0: B = 0, A = I


def test_hypernet_sizes_and_start_at_root_init():
    model = make_model(perturb=False)
    phi = model.phi
    D = model.n_weights
    assert phi[0].out_features == int(2 / 3 * S + 1 / 3 * D) and phi[2].out_features == int(
        1 / 3 * S + 2 / 3 * D
    )
    ys = data()
    assert torch.equal(model.theta_trajectory(ys)[:, 0], phi[-1].bias.expand(3, -1))


@pytest.mark.parametrize("dim", [10, 11])
def test_rotation_is_stable_with_half_the_blocks_at_identity(dim):
    rot = Rotation(dim)
    lam = rot.eigenvalues().detach()
    assert torch.equal(lam[0::2], torch.ones_like(lam[0::2]))  # exactly I in float32
    assert (
        (lam[1::2].abs() < 1).all()
        and (lam[1::2].abs() >= 0.9).all()
        and (lam[1::2].angle() > 0).all()
    )
    assert lam[1::2].angle().unique().numel() == lam[1::2].numel()  # a spread of frequencies
    if dim % 2:  # the odd leftover coordinate starts at the identity too
        assert rot.nu_tail.item() == IDENTITY_NU and rot.operator().c.item() == 1.0
    with torch.no_grad():
        for p in rot.parameters():
            p.copy_(5 * torch.randn_like(p))
    A = rot.apply(torch.eye(dim)).T  # columns A e_i
    assert torch.linalg.eigvals(A).abs().max() <= 1 + 1e-6


@pytest.mark.parametrize("transition", ["dense", "diagonal", "rotation"])
def test_padding_is_invisible(transition):
    torch.manual_seed(0)
    root = BlackBoxRoot(state_dim=S, width=8, depth=1, inputs="tau_y")
    plain = WARP(root=root, state_dim=S, dt=0.1, transition=transition)
    padded = WARP(root=root, state_dim=S, dt=0.1, transition=transition, runtime=Runtime(pad_to=16))
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    padded.load_state_dict(plain.state_dict())
    assert padded.padded_dim % 16 == 0 and padded.padded_dim > plain.padded_dim
    assert padded.n_params() == plain.n_params()
    # float64: the rollouts grow to O(100) here, where float32 kernels of different widths
    # (AVX2 vs AVX512 reductions) legitimately differ by 1e-2; padding itself changes nothing
    plain, padded, ys = plain.double(), padded.double(), data().double()
    for context in (T, 4):
        a, b = plain(ys, context=context), padded(ys, context=context)
        scale = a.mean.abs().max().item()
        assert (a.mean - b.mean).abs().max() < 1e-12 * max(scale, 1.0)  # float64 rounding


def test_dense_transition_residual_form_equals_plain_matrix():
    dense = Dense(7).double()
    with torch.no_grad():
        dense.residual.normal_()
    h = torch.randn(4, 7, dtype=torch.float64)
    assert (dense.apply(h) - h @ dense.matrix().T).abs().max() < 1e-13


def test_hold_after_context_keeps_theta_fixed():
    model, ys = make_model(hold_after_context=True), data()
    theta = model.theta_trajectory(ys, context=5)  # θ_0..θ_{T-2}
    assert torch.equal(theta[:, 5:], theta[:, 4:5].expand_as(theta[:, 5:]))
    assert not torch.equal(theta[:, 3], theta[:, 4])  # the context still moves θ
    free = make_model(hold_after_context=False).theta_trajectory(ys, context=5)
    assert not torch.equal(free[:, 5], free[:, 4])


@pytest.mark.parametrize(
    "options", [dict(transition="dense"), dict(transition="rotation", anchored=True)]
)
def test_gradient_reaches_transition_input_map_and_hypernet(options):
    model, ys = make_model(**options), data()
    for context in (T, 3):
        model.zero_grad()
        out = model(
            ys, context=context, teacher_prob=0.5, generator=torch.Generator().manual_seed(0)
        )
        ((out.mean - ys[:, 1:]) ** 2).mean().backward()
        for name, p in model.named_parameters():
            if not name.startswith("root"):
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_teacher_prob_is_reproducible_with_a_generator():
    model, ys = make_model(), data()
    runs = [
        model(ys, context=2, teacher_prob=0.5, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].mean, runs[1].mean)


class _ToyPhysicalRoot(AbstractRoot):
    """Root reading one 'parameter' straight from θ, to test the plumbing."""

    n_weights = 3

    def init_weights(self, generator=None):
        return torch.ones(3)

    def forward(self, theta, tau, y_prev, dt):
        return y_prev * theta[:, :1], None

    def physical_params(self, theta, tau, y_prev):
        return {"k": theta[:, 0] + tau}

    def penalty(self, theta, tau, y_prev):
        return theta[:, 1] ** 2


def test_physical_params_along_the_rollout():
    assert make_model().physical_params(data(), 4) == {}
    model = WARP(root=_ToyPhysicalRoot(), state_dim=S, dt=0.1, init_state="learned").double()
    got = model.physical_params(data(), 4)
    assert got["k"].shape == (3, T - 1)
    assert torch.allclose(got["k"][0], 1 + torch.arange(1, T, dtype=torch.float64) / (T - 1))


def test_penalty_of_the_root_along_the_trajectory():
    assert make_model().penalty(data()) is None  # black-box root: no penalty
    model = WARP(root=_ToyPhysicalRoot(), state_dim=S, dt=0.1, init_state="learned").double()
    pen = model.penalty(data())
    assert pen.shape == (3, T - 1) and torch.allclose(pen, torch.ones_like(pen))
    pen.sum().backward()
    assert model.theta0.grad[1] > 0


def test_loss_falls_on_a_small_sine_problem():
    torch.manual_seed(0)
    root = BlackBoxRoot(state_dim=1, width=16, depth=2)
    model = WARP(root=root, state_dim=1, dt=1 / 15, transition="rotation", anchored=True)
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, 16)
    ys = torch.sin(
        2 * math.pi * t + (torch.rand(32, 1, generator=g) - 0.5) * math.pi / 3
    ).unsqueeze(-1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = ((model(ys, context=16).mean - ys[:, 1:]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_bad_options_and_inputs_are_clear_errors():
    root = BlackBoxRoot(state_dim=S, width=4, depth=1)
    with pytest.raises(UserError, match="unknown transition 'lru'"):
        WARP(root=root, state_dim=S, dt=0.1, transition="lru")
    with pytest.raises(UserError, match="unknown init_state"):
        WARP(root=root, state_dim=S, dt=0.1, init_state="zeros")
    with pytest.raises(UserError, match="unknown transition"):
        build_transition("lru", 4)
    model = WARP(root=root, state_dim=S, dt=0.1)
    with pytest.raises(UserError, match=r"expects ys \(batch, time >= 2, 2\)"):
        model(torch.zeros(2, 5, 3), context=2)
    with pytest.raises(UserError, match="context must be at least 1"):
        model(torch.zeros(2, 5, 2), context=0)
