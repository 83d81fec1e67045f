"""Rollout with context and forecast metrics, beside the reference forecasts.

The first L steps of each test trajectory are context (observations fed to the model); the
model then feeds itself. Metrics cover the forecast steps t = L .. T-1 only, in physical
units, averaged over states, against the clean trajectories (with observation noise, models
and references see only the noisy observations). References on the same steps:
- persistence: the last context observation held;
- zero and mean: 0, and the training set's mean trajectory;
- linear_fit: y_{t+1} ≈ E y_t + c fitted on each trajectory's context, rolled forward
  (exact for linear systems such as the MSD);
- ode_fit: the system's own unknown parameters fitted to each context (least squares of the
  integral form of its equation) and integrated from the last context observation: the fit a
  scientist does by hand (`warp_phys.identify`). On a store with observation noise the fit
  is refined by output error (the fitted equation integrated through the context, matched
  to the observations), and the forecast starts from the end of that fitted path.
For systems that declare a Lyapunov time, the valid prediction time of every forecast is
reported too (`valid_prediction_time`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from warp_phys.data import Dataset
from warp_phys.errors import UserError
from warp_phys.forecaster import AbstractForecaster
from warp_phys.identify import ode_fit

VPT_THRESHOLD = 30.0  # sMAPE (percent) at which a forecast stops being valid (Gilpin 2023)


@torch.no_grad()
def rollout(
    model: AbstractForecaster,
    ys: Tensor,
    context: int,
    *,
    batch: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor | None]:
    """Return the model's predictions of y_1..y_{T-1} ``(N, T-1, S)`` (and std) with context L."""
    model.eval()
    means, stds = [], []
    for i in range(0, len(ys), batch):
        out = model(ys[i : i + batch].to(device), context=context)
        means.append(out.mean.float().cpu())
        stds.append(None if out.std is None else out.std.float().cpu())
    std = None if stds[0] is None else torch.cat(stds)
    return torch.cat(means), std


def linear_fit_forecast(ys: Tensor, context: int) -> Tensor:
    """Fit y_{t+1} = E y_t + c on the context of each trajectory and roll it out, ``(N, T, S)``."""
    y = ys.double()
    N, T, S = y.shape
    X = torch.cat(
        [y[:, : context - 1], torch.ones(N, context - 1, 1, dtype=y.dtype)], -1
    )  # (N, L-1, S+1)
    Y = y[:, 1:context]  # (N, L-1, S)
    W = torch.linalg.lstsq(X, Y).solution  # (N, S+1, S)
    out = y.clone()
    for t in range(context, T):
        out[:, t] = torch.einsum("ns,nsk->nk", out[:, t - 1], W[:, :S]) + W[:, S]
    return out.float()


def forecast_errors(pred: Tensor, truth: Tensor) -> dict:
    """Metrics of forecasts ``pred, truth (N, H, S)``: mean/median MSE, MAE, per-horizon MSE.

    A forecast that blew up (inf or NaN) has an infinite error: the means become inf, and the
    median stays meaningful (it counts that trajectory as the worst), with `n_nonfinite` beside.
    """
    err = pred.double() - truth.double()
    err = torch.where(torch.isfinite(err), err, torch.inf)
    sq = err**2
    per_traj = sq.mean(dim=(1, 2))  # (N,)
    finite = torch.isfinite(per_traj)
    return {
        "mse": float(per_traj.mean()),
        "mae": float(err.abs().mean()),
        "median_mse": float(per_traj.median()),
        "per_horizon_mse": sq.mean(dim=(0, 2)).tolist(),
        "per_trajectory_mse": per_traj.tolist(),
        "n_nonfinite": int((~finite).sum()),
    }


def reference_forecasts(ys: Tensor, context: int, train_mean: Tensor) -> dict[str, Tensor]:
    """Return the model-free reference forecasts of steps L..T-1, each ``(N, T-L, S)``."""
    H = ys.shape[1] - context
    return {
        "persistence": ys[:, context - 1 : context].expand(-1, H, -1),
        "zero": torch.zeros_like(ys[:, context:]),
        "mean": train_mean[context:].expand(len(ys), -1, -1),
        "linear_fit": linear_fit_forecast(ys, context)[:, context:],
    }


def valid_prediction_time(pred: Tensor, truth: Tensor, dt: float, lyapunov_time: float) -> Tensor:
    """Valid prediction time of each forecast ``(N,)``, in Lyapunov times.

    The first forecast time at which the symmetric mean absolute percentage error over the
    states, sMAPE_t = 200/S Σ_s |ŷ_s - y_s| / (|ŷ_s| + |y_s|), exceeds `VPT_THRESHOLD` = 30,
    as in W. Gilpin, "Model scale versus domain knowledge in statistical forecasting of chaotic
    systems", Phys. Rev. Research 5, 043252 (2023), and Lai, Bao & Gilpin, "Panda" (2025),
    built on the dysts catalogue. A forecast valid to the end scores its whole horizon; a
    non-finite one fails at its first non-finite step. pred, truth: ``(N, H, S)``, step i at
    (i + 1)·dt after the last context value.
    """
    p, y = pred.double(), truth.double()
    denom = p.abs() + y.abs()
    ratio = torch.where(denom > 0, (p - y).abs() / denom, torch.zeros_like(denom))
    smape = 200.0 * ratio.mean(-1)  # (N, H)
    bad = ~(smape <= VPT_THRESHOLD) | ~torch.isfinite(p).all(-1)  # a blow-up fails at once
    H = smape.shape[1]
    first = torch.where(
        bad.any(1), bad.float().argmax(1), torch.full_like(bad[:, 0], H, dtype=torch.long)
    )
    return first.double() * dt / lyapunov_time


def references_for(data: Dataset, split: str, context: int) -> dict:
    """Reference forecasts and their metrics for one split (cached on `data`: every model of a
    compare is measured against the same references, computed once)."""
    key = ("references", split, context)
    if key in data.cache:
        return data.cache[key]
    obs, truth = data.splits[split].y, data.splits[split].truth
    train_mean = data.splits["train"].y.mean(dim=0)  # (T, S)
    preds = reference_forecasts(obs, context, train_mean)
    extra: dict = {}
    try:
        times = torch.tensor(data.times)
        fit = ode_fit(data.system, times, obs, context, refine=data.noise > 0)
        preds["ode_fit"] = fit.forecast
        extra["ode_fit"] = {
            "seconds_per_trajectory": fit.seconds_per_trajectory,
            "method": fit.method,
            "recovery": parameter_errors(
                data, split, {k: v.numpy() for k, v in fit.estimates.items()}
            ),
        }
    except UserError as err:
        extra["ode_fit"] = {"not_applicable": str(err)}
    metrics = {}
    for name, pred in preds.items():
        metrics[name] = forecast_errors(pred, truth[:, context:]) | extra.get(name, {})
        add_vpt(metrics[name], data, pred, truth[:, context:])
    if "not_applicable" in extra.get("ode_fit", {}):
        metrics["ode_fit"] = extra["ode_fit"]
    data.cache[key] = {"metrics": metrics, "forecasts": preds}
    return data.cache[key]


def add_vpt(entry: dict, data: Dataset, pred: Tensor, truth: Tensor) -> None:
    """Add the valid prediction time (mean, median, per trajectory) when the system declares
    a Lyapunov time."""
    lyap = data.system.lyapunov_time
    if not lyap:
        return
    vpt = valid_prediction_time(pred, truth, data.dt, lyap)
    entry["vpt"] = {
        "mean": float(vpt.mean()),
        "median": float(vpt.median()),
        "per_trajectory": vpt.tolist(),
    }


def best_reference(references: dict) -> tuple[str, float]:
    """Return the reference with the lowest finite positive mean MSE, and that MSE."""
    scored = [
        (v["mse"], k)
        for k, v in references.items()
        if "mse" in v and np.isfinite(v["mse"]) and v["mse"] > 0
    ]
    if not scored:
        return "", float("nan")
    mse, name = min(scored)
    return name, mse


def in_train_range(data: Dataset, params: np.ndarray) -> np.ndarray:
    """Boolean ``(N,)``: every sampled parameter lies inside the training ranges."""
    inside = np.ones(len(params), dtype=bool)
    for j, name in enumerate(data.parameter):
        lo, hi = data.system.params[name].range("train")
        inside &= (params[:, j] >= lo - 1e-12) & (params[:, j] <= hi + 1e-12)
    return inside


def evaluate_split(
    model: AbstractForecaster,
    data: Dataset,
    split: str,
    context: int,
    *,
    device: torch.device | str = "cpu",
    batch: int = 256,
) -> dict:
    """Forecast metrics for one split, with references, robust figures and raw predictions.

    The model sees the observations; errors are against the clean trajectories."""
    obs, clean = data.splits[split].y, data.splits[split].truth
    mean, std = rollout(model, obs, context, batch=batch, device=device)
    pred = mean[:, context - 1 :]  # (N, T-L, S): predictions of y_L..y_{T-1}
    truth = clean[:, context:]
    result = {"model": forecast_errors(pred, truth)}
    add_vpt(result["model"], data, pred, truth)
    refs = references_for(data, split, context)["metrics"]
    result["references"] = {k: dict(v) for k, v in refs.items()}
    for k, ref in result["references"].items():
        if "mse" in ref:
            r = ref["mse"]
            result["model"][f"ratio_to_{k}"] = result["model"]["mse"] / r if r > 0 else float("inf")
    name, mse = best_reference(result["references"])
    result["model"]["best_reference"] = name
    result["model"]["ratio_to_best_reference"] = (
        result["model"]["mse"] / mse if name else float("nan")
    )
    if split == "test_ood":
        inside = in_train_range(data, data.splits[split].params)
        for entry in (result["model"], *result["references"].values()):
            if "per_trajectory_mse" not in entry:
                continue
            per = torch.tensor(entry["per_trajectory_mse"], dtype=torch.float64)
            entry["in_range"], entry["out_of_range"] = _subset(per, inside), _subset(per, ~inside)
    result["recovery"] = recovered_params(model, data, split, context, device=device, batch=batch)
    return {"metrics": result, "mean": mean, "std": std}


def _subset(per: Tensor, mask: np.ndarray) -> dict:
    m = torch.from_numpy(mask)
    if not m.any():
        return {"n": 0, "mse": float("nan"), "median_mse": float("nan")}
    return {"n": int(m.sum()), "mse": float(per[m].mean()), "median_mse": float(per[m].median())}


@torch.no_grad()
def recovered_params(
    model: AbstractForecaster,
    data: Dataset,
    split: str,
    context: int,
    *,
    device: torch.device | str = "cpu",
    batch: int = 256,
) -> dict:
    """Physical parameters read at the end of the context against the true ones.

    Returns {} for black-box models. Reports the identifiable combinations the system declares
    (e.g. k/m for the MSD), else each learned parameter, with the median relative error.
    """
    model.eval()
    ys = data.splits[split].y
    chunks: dict[str, list[Tensor]] = {}
    for i in range(0, len(ys), batch):
        got = model.physical_params(ys[i : i + batch].to(device), context)
        for k, v in got.items():
            v = v if v.dim() == 1 else v[:, context - 1]  # value at the end of the context
            chunks.setdefault(k, []).append(v.double().cpu())
    if not chunks:
        return {}
    est = {k: torch.cat(v).numpy() for k, v in chunks.items()}
    learned = model.learned_names()
    return parameter_errors(data, split, est, None if learned is None else set(learned))


def parameter_errors(
    data: Dataset, split: str, est: dict[str, np.ndarray], learned: set[str] | None = None
) -> dict:
    """Relative errors of estimated parameters ``{name: (N,)}`` against the truth of `split`.

    Names may be parameters or the system's identifiable combinations (e.g. "k/m"): the
    identifiable ones are reported, computed from full parameter estimates when needed."""
    true_params = data.splits[split].params
    truth = {n: true_params[:, j] for j, n in enumerate(data.parameter)}
    out = {}
    for name, (e, t) in _identifiable(data, est, truth, learned).items():
        rel = np.abs(e - t) / np.maximum(np.abs(t), 1e-12)
        out[name] = {
            "median_rel_error": float(np.median(rel)),
            "mean_rel_error": float(np.mean(rel)),
            "estimate": np.asarray(e, dtype=float).tolist(),
            "true": np.asarray(t, dtype=float).tolist(),
        }
    return out


def _identifiable(data: Dataset, est: dict, truth: dict, learned: set[str] | None) -> dict:
    """Pairs (estimate, truth): the system's identifiable combinations when it declares them
    (the MSD's trajectories fix k/m and c/m, never m, k, c alone), else each learned parameter."""
    declared = data.system.identifiable
    pairs = {
        n: (est[n], truth[n])
        for n in est
        if not declared
        and n in truth
        and data.system.params[n].train is not None
        and (learned is None or n in learned)
    }
    pt = np.stack([truth[n] for n in data.parameter], -1)
    for name, fn in declared.items():
        if name in est:  # estimated directly (a fit in the identifiable coefficients)
            pairs[name] = (np.asarray(est[name]), np.asarray(fn(data.system.view(pt))))
        elif all(n in est for n in data.parameter):
            pe = np.stack([est[n] for n in data.parameter], -1)
            pt = np.stack([truth[n] for n in data.parameter], -1)
            pairs[name] = (
                np.asarray(fn(data.system.view(pe))),
                np.asarray(fn(data.system.view(pt))),
            )
    return pairs
