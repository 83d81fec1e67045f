"""Tables and figures of a compare run.

Figures are drawn with `matplotlib.figure.Figure` objects, never pyplot: importing this
module or saving a plot leaves the process's matplotlib backend as it was (a notebook keeps
its inline backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

REFERENCES = ("persistence", "zero", "mean", "linear_fit", "ode_fit")


def _fmt(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def _vpt(r: dict) -> str:
    v = r.get("vpt")
    return f"{_fmt(v['mean'])} / {_fmt(v['median'])}" if v else "-"


def results_table(summary: dict) -> str:
    """Markdown table: per split and model, forecast errors, robust figures, references."""
    lines = [f"# {summary['name']}: {summary['system']}, context L = {summary['context']}", ""]
    if summary.get("noise"):
        lines += [
            f"Observation noise {summary['noise']:g} of each state's std: models and references "
            f"see noisy observations, errors are against the clean trajectories.",
            "",
        ]
    models = summary["models"]
    ok = {lab: res for lab, res in models.items() if "failed" not in res}
    chaos = any("vpt" in res["splits"][s] for res in ok.values() for s in res["splits"])
    for split in ("test", "test_ood"):
        lines += [f"## {split}", ""]
        head = "| model | MSE | median MSE | MAE | in-range MSE | out-of-range MSE |"
        head += " VPT mean / median (Lyapunov times) |" if chaos else ""
        head += " MSE / best reference | params | train s |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        best = ""
        for label, res in models.items():
            if "failed" in res:
                lines.append(f"| {label} | failed: {res['failed']} |")
                continue
            r = res["splits"][split]
            best = r.get("best_reference", best)
            lines.append(
                f"| {label} | {_fmt(r['mse'])} | {_fmt(r['median_mse'])} | {_fmt(r['mae'])} | "
                f"{_fmt(r.get('in_range', {}).get('mse', '-'))} | {_fmt(r.get('out_of_range', {}).get('mse', '-'))} | "
                + (f"{_vpt(r)} | " if chaos else "")
                + f"{_fmt(r.get('ratio_to_best_reference', '-'))} | {res['n_params']:,} | {res['train_seconds']:.0f} |"
            )
        refs = next(iter(ok.values()))["splits"][split]["references"] if ok else {}
        for ref in REFERENCES:
            r = refs.get(ref)
            if r is None:
                continue
            if "not_applicable" in r:
                lines.append(f"| *{ref}* | not applicable: {r['not_applicable']} |")
                continue
            cost = (
                f" {1e3 * r['seconds_per_trajectory']:.2g} ms/trajectory"
                if "seconds_per_trajectory" in r
                else ""
            )
            lines.append(
                f"| *{ref}* | {_fmt(r['mse'])} | {_fmt(r['median_mse'])} | | "
                f"{_fmt(r.get('in_range', {}).get('mse', '-'))} | {_fmt(r.get('out_of_range', {}).get('mse', '-'))} | "
                + (f"{_vpt(r)} | " if chaos else "")
                + f"{'best' if ref == best else ''} | |{cost} |"
            )
        lines.append("")
        blew = [
            f"{lab} {res['splits'][split]['n_nonfinite']}"
            for lab, res in ok.items()
            if res["splits"][split].get("n_nonfinite")
        ]
        if blew:
            lines += [
                "Trajectories whose forecast blew up (inf or NaN, counted as infinite error): "
                + ", ".join(blew),
                "",
            ]
        rec = [(lab, res["splits"][split]["recovery"]) for lab, res in ok.items()]
        rec += [("ode_fit (reference)", refs.get("ode_fit", {}).get("recovery", {}))]
        rec = [(lab, r) for lab, r in rec if r]
        if rec:
            lines += [
                "Recovered parameters, median (mean) relative error at the end of the context:",
                "",
            ]
            for lab, r in rec:
                parts = ", ".join(
                    f"{k}: {_fmt(v['median_rel_error'])} ({_fmt(v['mean_rel_error'])})"
                    for k, v in r.items()
                )
                lines.append(f"- {lab}: {parts}")
            lines.append("")
    notes = [
        f"- {lab}: {res['skipped_batches']} batches skipped (non-finite loss or gradient)"
        + (f"; stopped early: {res['stopped']}" if res["stopped"] else "")
        for lab, res in models.items()
        if res.get("skipped_batches") or res.get("stopped")
    ]
    if notes:
        lines += ["## Training", "", *notes, ""]
    return "\n".join(lines)


def plot_forecasts(ds: xr.Dataset, path: Path, n: int = 3) -> None:
    """A few test trajectories: truth, each model's prediction, the context shaded."""
    states = list(ds.state.values)
    L = int(ds.attrs["context"])
    t = ds.time.values
    fig = Figure(figsize=(4.5 * len(states), 2.4 * n))
    axes = fig.subplots(n, len(states), squeeze=False)
    picks = np.linspace(0, ds.sizes["trajectory"] - 1, n).astype(int)
    for row, i in enumerate(picks):
        for col, s in enumerate(states):
            ax = axes[row, col]
            ax.axvspan(t[0], t[L - 1], color="0.9", label="context" if row == col == 0 else None)
            ax.plot(
                t,
                ds.truth.isel(trajectory=i).sel(state=s),
                "k",
                lw=1.5,
                label="truth" if row == col == 0 else None,
            )
            for m in ds.model.values:
                ax.plot(
                    t,
                    ds.prediction.sel(model=m).isel(trajectory=i).sel(state=s),
                    lw=1,
                    label=str(m) if row == col == 0 else None,
                )
            ax.set_ylabel(s)
            if row == n - 1:
                ax.set_xlabel("t")
    fig.legend(loc="lower center", ncol=len(ds.model) + 2, fontsize=8)
    fig.suptitle(f"{ds.attrs['system']} ({ds.attrs['split']}), example forecasts", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


def plot_horizon(summary: dict, times: np.ndarray, context: int, path: Path) -> None:
    """Forecast MSE against horizon (steps after the context), per model, test and test_ood."""
    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, split in zip(axes, ("test", "test_ood"), strict=True):
        for label, res in summary["models"].items():
            if "failed" in res:
                continue
            curve = np.asarray(res["splits"][split]["per_horizon_mse"], dtype=float)
            ax.semilogy(np.arange(1, len(curve) + 1), curve, label=label)
        ax.set_title(split)
        ax.set_xlabel("forecast horizon (steps)")
    axes[0].set_ylabel("MSE")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_recovery(summary: dict, path: Path) -> None:
    """Recovered against true physical parameters (physics priors only)."""
    items = [
        (lab, split, name, r)
        for lab, res in summary["models"].items()
        for split in res["splits"]
        for name, r in res["splits"][split]["recovery"].items()
    ]
    if not items:
        fig = Figure(figsize=(4, 2))
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no model recovers physical parameters", ha="center", va="center")
        ax.axis("off")
    else:
        names = sorted({(lab, name) for lab, _, name, _ in items})
        fig = Figure(figsize=(3.8 * len(names), 3.6))
        axes = fig.subplots(1, len(names), squeeze=False)
        for ax, (lab, name) in zip(axes[0], names, strict=True):
            for l2, split, n2, r in items:
                if (l2, n2) == (lab, name):
                    ax.scatter(r["true"], r["estimate"], s=6, alpha=0.6, label=split)
            lims = [
                min(ax.get_xlim()[0], ax.get_ylim()[0]),
                max(ax.get_xlim()[1], ax.get_ylim()[1]),
            ]
            ax.plot(lims, lims, "k:", lw=0.8)
            ax.set_title(f"{lab}: {name}", fontsize=9)
            ax.set_xlabel("true")
            ax.set_ylabel("recovered")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
