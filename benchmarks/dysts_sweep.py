"""Every flow of the dysts catalogue through warp-phys at its defaults (issue 11, item 4).

Per flow: which path it takes (symbolic / numpy callback / delay, refused) and which physics
prior applies; a small store generated at the defaults (`warp_phys.dysts.DEFAULTS`, the
train and test_ood ranges); whether its trajectories stay in a bounded region (every state
within the box of a reference trajectory, at dysts' parameters from dysts' `ic` over the
same span, widened by BOX_MARGIN box widths on either side; phase states that dysts marks
unbounded excepted) and whether they settle onto a fixed point; the largest error of a
stored trajectory over one period against dysts' own right-hand side integrated by scipy
DOP853 at rtol = atol = 1e-12; and, where a prior applies, that the prior builds and that
`ode_fit` (the physics reference) fits and forecasts the test trajectories, with its valid
prediction time.

    python benchmarks/dysts_sweep.py                      # all flows; writes benchmarks/results/
    python benchmarks/dysts_sweep.py --flows Lorenz Rossler --no-write
    python benchmarks/dysts_sweep.py --y0-fraction 0.05 --no-write --flows ...   # other defaults
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

import warp_phys.dysts
from warp_phys.dysts import DEFAULTS, describe_catalogue, entry, flow, flow_names
from warp_phys.errors import UserError
from warp_phys.evaluate import valid_prediction_time
from warp_phys.identify import ode_fit
from warp_phys.root import build_root
from warp_phys.store import generate_store, open_split
from warp_phys.system import get_system

RESULTS = Path(__file__).parent / "results"
BOX_MARGIN = 2.0  # bounded region: the reference box widened by this many widths each side
SETTLED = 1e-3  # std over the last period below this fraction of dysts' std: a fixed point
REF_TOL = 1e-12  # scipy's tolerances for the cross-check
CONTEXT = 100  # ode_fit context, as the compare presets


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout


def cross_check(name: str, ds) -> float:
    """Largest error over one period, relative to each state's largest |y| there, of stored
    trajectory 0 against dysts' rhs (its own parameters) integrated by scipy DOP853."""
    import dysts.flows

    f = flow(name)
    flat = dict(zip([str(p) for p in ds["parameter"].values], ds["params"].values[0], strict=True))
    params = {}
    for key, value in f.meta["parameters"].items():
        shape = np.shape(value)
        cells = [flat["_".join([key, *map(str, i)]) if shape else key] for i in np.ndindex(shape)]
        params[key] = np.array(cells).reshape(shape) if shape else cells[0]
    obj = getattr(dysts.flows, name)(parameters=params)
    t = ds["time"].values
    keep = t <= t[0] + float(f.meta["period"])
    y = ds["y"].values[0]
    sol = solve_ivp(
        lambda tt, yy: np.asarray(obj.rhs(yy, tt), dtype=np.float64),
        (t[0], t[keep][-1]),
        y[0],
        method="DOP853",
        rtol=REF_TOL,
        atol=REF_TOL,
        t_eval=t[keep],
    )
    if sol.status != 0:
        raise RuntimeError(f"scipy failed: {sol.message}")
    scale = np.abs(sol.y.T).max(0) + 1e-300
    return float((np.abs(sol.y.T - y[keep]) / scale).max())


def sweep_flow(name: str, n: int, timeout: float) -> dict:
    row: dict = {"name": name}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(int(timeout))
    stage = "catalogue"
    try:
        e = entry(name)
        row |= {"dim": e.dim, "n_params": len(e.params), "path": e.path, "prior": e.prior}
        row["why"] = e.why
        if e.path == "delay":
            return row
        system = get_system(f"dysts:{name}")
        stage = "generate"
        with tempfile.TemporaryDirectory() as tmp:
            counts = {"train": n, "test": n, "test_ood": n}
            generate_store(system, Path(tmp) / "s.zarr", counts=counts, seed=0, progress=False)
            splits = {s: open_split(Path(tmp) / "s.zarr", s).load() for s in counts}
        row["generate_s"] = round(time.perf_counter() - start, 2)
        stage = "checks"
        row |= bounded(flow(name), system, splits)
        stage = "cross-check"
        row["cross_check_rel_err"] = cross_check(name, splits["test"])
        if e.prior != "none":
            stage = f"prior {e.prior}"
            build_root(e.prior, state_dim=system.state_dim, system=system)
            stage = "ode_fit"
            row |= fit(system, splits["test"])
    except Timeout:
        row.setdefault("failures", []).append(f"{stage}: over the {timeout:g} s limit")
    except Exception as err:  # noqa: BLE001 - a sweep reports every failure and goes on
        text = " ".join(str(err).split())[:300]
        kind = "" if isinstance(err, UserError) else f"{type(err).__name__}: "
        row.setdefault("failures", []).append(f"{stage}: {kind}{text}")
    finally:
        signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def bounded(f, system, splits) -> dict:
    """Bounded-region and settling checks over every stored trajectory."""
    from warp_phys.simulate import simulate

    ic = torch.as_tensor(np.asarray(f.meta["initial_conditions"], dtype=np.float64))[None]
    ref = simulate(system, ic, system.default_params()[None], system.times())[0].numpy()
    lo, hi = ref.min(0), ref.max(0)
    width = np.maximum(hi - lo, 1e-6 * np.maximum(np.abs(hi), 1.0))
    std = np.asarray(f.meta["std"])
    phase = set(f.meta.get("unbounded_indices") or [])
    keep = [i for i in range(f.dim) if i not in phase]
    out: dict = {"phase_states": sorted(phase)}
    worst, settled = 0.0, 0
    for ds in splits.values():
        y = ds["y"].values  # (N, T, S)
        t = ds["time"].values
        late = y[:, t >= t[-1] - float(f.meta["period"]), :].std(1)  # (N, S): the last period
        settled += int((late / np.where(std > 0, std, 1.0) < SETTLED).all(-1).sum())
        if keep:  # distance outside the reference box, in box widths
            out_of = np.maximum(lo[keep] - y[..., keep], y[..., keep] - hi[keep]) / width[keep]
            worst = max(worst, float(out_of.max()))
    out["box_widths_outside"] = max(worst, 0.0)
    out["settled"] = settled
    if worst > BOX_MARGIN:
        out["failures"] = [
            f"leaves the bounded region: a state goes {worst:.3g} box widths beyond the "
            f"reference trajectory's range"
        ]
    return out


def fit(system, ds) -> dict:
    y = torch.as_tensor(ds["y"].values)
    res = ode_fit(system, torch.as_tensor(ds["time"].values), y, CONTEXT)
    dt = float(ds["time"].values[1] - ds["time"].values[0])
    out = {"ode_fit": res.method}
    if system.lyapunov_time:
        vpt = valid_prediction_time(res.forecast, y[:, CONTEXT:].float(), dt, system.lyapunov_time)
        out["ode_fit_vpt_median"] = float(vpt.median())
    return out


def write(rows: list[dict], seconds: float, args, load: tuple, reused_names=()) -> None:
    from warp_phys.dysts import catalogue

    counts = describe_catalogue(catalogue())
    d = warp_phys.dysts.DEFAULTS  # as run (--y0-fraction changes it)
    generated = [r for r in rows if r.get("path") in ("symbolic", "callback")]
    ok = [r for r in generated if not r.get("failures")]
    fails = [r for r in rows if r.get("failures")]
    with_prior = [r for r in ok if r.get("prior") in ("lsq", "ode")]
    lines = [
        "# The dysts catalogue through warp-phys: every flow at its defaults",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Date: {datetime.now(UTC).isoformat(timespec='seconds')}  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average "
        f"{load[0]} at the start, {load[1]} at the end (a shared machine)  ",
        f"Total time: {seconds / 60:.1f} min"
        + (
            f" (this run's wall time plus the own times of the {len(reused_names)} flows taken "
            f"from `--reuse {args.reuse}`, a run stopped by a bug since fixed)"
            if reused_names
            else " (wall time)"
        )
        + f"; {args.n} trajectories per split "
        f"(train, test, test_ood), per-flow limit {args.timeout:g} s",
        "",
        f"Defaults: parameters p0 (1 ± {d.train_fraction:g}) for train/test, "
        f"p0 (1 ± {d.ood_fraction:g}) for test_ood, y0 = ic ± {d.y0_fraction:g} "
        f"std, {d.periods:g} periods at ~{d.points_per_period} steps per period.",
        "",
        "## Coverage",
        "",
        "| | flows |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in counts.items()],
        f"| generated and bounded at the defaults (of {len(generated)} tried) | {len(ok)} |",
        f"| ... with a physics prior that builds and an ode_fit that runs | {len(with_prior)} |",
        f"| ... with the lsq prior | {sum(r['prior'] == 'lsq' for r in with_prior)} |",
        "",
        "## Failures at the defaults",
        "",
        "| flow | path | prior | reason |",
        "|---|---|---|---|",
        *[f"| {r['name']} | {r.get('path', '')} | {r.get('prior', '')} | {'; '.join(r['failures'])} |"
          for r in fails],
        "",
        "## Every flow",
        "",
        "Columns: outside: how far the stored trajectories go beyond the reference box, in "
        f"box widths (phase states excepted; over {BOX_MARGIN:g} is a failure); "
        "trajectories settled onto a fixed point; cross-check: largest relative error over one "
        "period against dysts' rhs with scipy DOP853 at 1e-12; ode_fit VPT: median valid "
        "prediction time of the physics reference on test, in Lyapunov times.",
        "",
        "| flow | dim | params | path | prior | outside | settled | cross-check | ode_fit VPT | s | note |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        note = "; ".join(r.get("failures", [])) or r.get("why", "")
        lines.append(
            f"| {r['name']} | {r.get('dim', '')} | {r.get('n_params', '')} | {r.get('path', '')} "
            f"| {r.get('prior', '')} | {_g(r.get('box_widths_outside'))} | {r.get('settled', '')} "
            f"| {_g(r.get('cross_check_rel_err'))} | {_g(r.get('ode_fit_vpt_median'))} "
            f"| {r.get('seconds', '')} | {note} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dysts_sweep.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "dysts_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")


def _g(v) -> str:
    return "" if v is None else f"{v:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", nargs="*", help="flow names (default: the whole catalogue)")
    parser.add_argument("--n", type=int, default=4, help="trajectories per split (default 4)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per flow")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--y0-fraction", type=float, help="override DEFAULTS.y0_fraction (an experiment)"
    )
    parser.add_argument(
        "--reuse",
        metavar="LOG",
        help="take the rows of flows already in LOG (this script's JSON-lines output) as they are",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.y0_fraction is not None:  # before any flow becomes a system
        warp_phys.dysts.DEFAULTS = replace(DEFAULTS, y0_fraction=args.y0_fraction)
    load0 = tuple(round(x, 2) for x in os.getloadavg())
    start = time.perf_counter()
    reused = {}
    if args.reuse:
        for line in Path(args.reuse).read_text().splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                reused[row["name"]] = row
    rows = []
    for name in args.flows or flow_names():
        row = reused.get(name) or sweep_flow(name, args.n, args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    seconds = time.perf_counter() - start + sum(r["seconds"] for r in reused.values())
    load1 = tuple(round(x, 2) for x in os.getloadavg())
    if not args.no_write:
        write(rows, seconds, args, (load0, load1), sorted(reused))


if __name__ == "__main__":
    main()
