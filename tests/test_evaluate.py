"""Forecast metrics: exact values, and a forecast that blew up."""

import math

import torch

from warp_phys.evaluate import forecast_errors, linear_fit_forecast


def test_forecast_errors_are_the_mse_mae_and_median_over_trajectories():
    truth = torch.zeros(3, 4, 2)
    pred = torch.stack([torch.full((4, 2), v) for v in (1.0, 2.0, 3.0)])  # MSE 1, 4, 9
    got = forecast_errors(pred, truth)
    assert got["per_trajectory_mse"] == [1.0, 4.0, 9.0]
    assert got["mse"] == 14 / 3 and got["median_mse"] == 4.0 and got["mae"] == 2.0
    assert got["per_horizon_mse"] == [14 / 3] * 4 and got["n_nonfinite"] == 0


def test_a_forecast_that_blew_up_counts_as_infinite_error_not_nan():
    truth = torch.zeros(3, 4, 2)
    pred = torch.stack([torch.full((4, 2), v) for v in (1.0, 2.0, 3.0)])
    pred[2, 2:, 0] = float("nan")  # the third trajectory exploded half way
    got = forecast_errors(pred, truth)
    assert got["n_nonfinite"] == 1 and got["per_trajectory_mse"][2] == math.inf
    assert got["mse"] == got["mae"] == math.inf  # the mean error really is unbounded
    assert got["median_mse"] == 4.0  # the median still ranks it, as the worst
    assert got["per_horizon_mse"][:2] == [14 / 3] * 2 and got["per_horizon_mse"][2] == math.inf


def test_linear_fit_is_exact_on_a_linear_recurrence():
    A = torch.tensor([[0.99, 0.05], [-0.05, 0.98]], dtype=torch.float64)
    y = torch.zeros(2, 30, 2, dtype=torch.float64)
    y[:, 0] = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=torch.float64)
    for t in range(1, 30):
        y[:, t] = y[:, t - 1] @ A.T
    fit = linear_fit_forecast(y, 10)
    assert torch.allclose(fit.double(), y, atol=1e-5)
