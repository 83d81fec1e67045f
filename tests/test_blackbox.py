"""The black-box MLP root: paper sizes, torch.nn.Linear layout, std and clip."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from warp_phys.priors.blackbox import STD_FLOOR, BlackBoxRoot

from warp_phys.errors import UserError
from warp_phys.root import build_root

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)


def test_paper_msd_root_has_4898_weights():
    paper = BlackBoxRoot(state_dim=2, width=48, depth=3, inputs="tau", residual=False)
    assert paper.n_weights == 4898  # 1 -> 48 -> 48 -> 48 -> 2


def test_cpu_default_root_is_small_and_starts_as_persistence():
    root = BlackBoxRoot(state_dim=2)  # 3 -> 16 -> 16 -> 2 on [τ, y_prev], residual
    assert root.n_weights == 3 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2 == 370
    y = torch.randn(5, 2)
    theta = root.init_weights().expand(5, -1)
    mean, _ = root(theta, torch.rand(5), y, 0.1)
    assert torch.equal(mean, y)  # last layer zero: the persistence forecast


def test_registered_as_blackbox():
    root = build_root("blackbox", state_dim=3, width=8, depth=2, inputs="tau_y")
    assert isinstance(root, BlackBoxRoot) and root.n_weights == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 3 + 3


@pytest.mark.parametrize("inputs", ["tau", "tau_y"])
@pytest.mark.parametrize("predict_std", [False, True])
def test_output_shapes_and_positive_std(inputs, predict_std):
    root = BlackBoxRoot(state_dim=2, width=8, depth=2, inputs=inputs, predict_std=predict_std)
    B = 5
    theta = (
        torch.stack([root.init_weights() for _ in range(B)]) * 30
    )  # large weights: extreme outputs
    mean, std = root(theta, torch.rand(B), torch.randn(B, 2), 0.1)
    assert mean.shape == (B, 2)
    if predict_std:
        assert std.shape == (B, 2) and (std >= STD_FLOOR).all()
    else:
        assert std is None


def test_flat_layout_matches_torch_linear():
    torch.manual_seed(0)
    root = BlackBoxRoot(state_dim=2, width=6, depth=2, inputs="tau_y", residual=False)
    net = nn.Sequential(nn.Linear(3, 6), nn.SiLU(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 2))
    theta = torch.cat([p.detach().flatten() for p in net.parameters()])  # weight, bias per layer
    tau, y = torch.rand(4), torch.randn(4, 2)
    mean, _ = root(theta.expand(4, -1), tau, y, 0.1)
    want = net(torch.cat((tau[:, None], y), -1))
    assert torch.allclose(mean, want, atol=1e-6)


def test_clip_bounds_the_mean():
    root = BlackBoxRoot(state_dim=1, width=4, depth=1, clip=0.5, residual=False)
    theta = 100 * torch.randn(64, root.n_weights)
    mean, _ = root(theta, torch.rand(64), torch.zeros(64, 1), 0.1)
    assert mean.abs().max() <= 0.5 and (mean.abs() == 0.5).any()


def test_bad_options_are_clear_errors():
    with pytest.raises(UserError, match="inputs must be one of"):
        BlackBoxRoot(state_dim=1, inputs="y")
    with pytest.raises(UserError, match="activation must be one of"):
        BlackBoxRoot(state_dim=1, activation="swishy")
    with pytest.raises(UserError, match="clip must be a positive number"):
        BlackBoxRoot(state_dim=1, clip=-1.0)


def test_the_automatic_clip_bounds_a_standardized_forecast_only(model_data):
    """clip="auto": 10 standard deviations when the model standardizes what the root sees
    (build_model sets `standardized`), no bound on raw states (normalize = false)."""
    from warp_phys.config import ModelConfig
    from warp_phys.models import build_model

    theta = 100 * torch.randn(64, BlackBoxRoot(state_dim=1).n_weights)
    for normalize, bound in ((True, 10.0), (False, None)):
        model = build_model(ModelConfig(kind="warp", normalize=normalize), model_data(1))
        root = (model.inner if normalize else model).root
        assert root.bound() == bound
        mean, _ = root(theta, torch.rand(64), torch.zeros(64, 1), 0.1)
        big = float(mean.abs().max())
        assert big <= 10.0 if normalize else big > 10.0
    assert BlackBoxRoot(state_dim=1, clip="none").bound() is None
    with pytest.raises(UserError, match="clip must be a positive number, 'auto' or 'none'"):
        BlackBoxRoot(state_dim=1, clip="big")
