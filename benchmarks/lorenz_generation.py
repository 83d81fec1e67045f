"""Lorenz-63 ensemble generation: warp_phys.simulate against a scipy solve_ivp loop.

The task (issue 2, item 10): N trajectories with random initial states and parameters near
the classic values (the `lorenz63` train ranges), STEPS saved steps over t in [0, 10], at
rtol = atol = 1e-8. The baseline is how dysts and the paper's scripts generate data: a loop
of ``solve_ivp(method="DOP853", t_eval=...)``, one trajectory at a time, with a plain numpy
right-hand side. Accuracy: on a subset, the maximum error over t <= 1 against DOP853 at
rtol = atol = 1e-12; the target is ours <= 2 x the scipy loop's.

    python benchmarks/lorenz_generation.py            # full size, writes benchmarks/results/
    python benchmarks/lorenz_generation.py --quick    # a smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.integrate import solve_ivp

from warp_phys import get_system
from warp_phys.simulate import MIN_WORKER_BATCH, default_workers, simulate

RTOL = ATOL = 1e-8  # the task's tolerances, both sides
REF_TOL = 1e-12  # the accuracy reference
T_SPAN = (0.0, 10.0)
HORIZON = 1.0  # errors are compared over t <= 1 (chaos amplifies them afterwards)
RESULTS = Path(__file__).parent / "results"


def lorenz(t, y, sigma, rho, beta):
    """The baseline's right-hand side: plain numpy, one state at a time."""
    x, yy, z = y
    return np.array([sigma * (yy - x), x * (rho - z) - yy, x * yy - beta * z])


def scipy_solve(y0, params, ts, tol) -> np.ndarray:
    sol = solve_ivp(
        lorenz, T_SPAN, y0, method="DOP853", rtol=tol, atol=tol, t_eval=ts, args=tuple(params)
    )
    if not sol.success:
        raise RuntimeError(sol.message)
    return sol.y.T  # (T, 3)


def timed(fn):
    """Return fn(), its wall time and the CPU time of this process and its (forked) workers."""
    wall, cpu, kids = time.perf_counter(), time.process_time(), _children_cpu()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu + _children_cpu() - kids


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "cpu": cpu,
        "cores": cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def max_errors(ys: np.ndarray, ref: np.ndarray, early: np.ndarray) -> dict:
    err = np.abs(ys[: len(ref)] - ref)  # (n_ref, T, 3)
    per_trajectory = err[:, early].max(axis=(1, 2))
    return {
        "max_t_le_1": float(per_trajectory.max()),
        "median_t_le_1": float(np.median(per_trajectory)),
        "max_full_span": float(err.max()),
    }


def run(args: argparse.Namespace) -> dict:
    system = get_system("lorenz63")
    params, y0 = system.sample(np.random.default_rng(args.seed), args.n, "train")
    ts = np.linspace(*T_SPAN, args.steps)
    tt, p, y = torch.tensor(ts), torch.tensor(params), torch.tensor(y0)
    n_scipy = min(args.scipy_n or args.n, args.n)
    n_ref = min(args.ref_n, n_scipy)
    load_start = load()

    simulate(system, y[:64], p[:64], tt[:50])  # warm-up: torch's first-call costs
    configs = ["default"] + [str(w) for w in args.workers]  # "default": workers=None
    ours, runs = None, {c: {"walls": [], "cpus": [], "processes": []} for c in configs}

    def time_ours() -> None:  # each configuration, once per call
        nonlocal ours
        for c in configs:
            w = None if c == "default" else int(c)
            used = max(1, min(w or default_workers(), args.n // MIN_WORKER_BATCH))
            ys, wall, cpu = timed(
                lambda w=w: simulate(system, y, p, tt, rtol=RTOL, atol=ATOL, workers=w).numpy()
            )
            print(f"warp_phys dop853, {used} process(es) ({c}): {args.n} in {wall:.2f} s")
            if ours is not None and not np.array_equal(ys, ours):
                raise AssertionError("results must not depend on the number of workers")
            ours = ys
            for key, value in (("walls", wall), ("cpus", cpu), ("processes", used)):
                runs[c][key].append(value)

    # Ours is timed before and after the long scipy loop and averaged, so that both sides
    # see the same mix of load from other jobs on this shared machine.
    time_ours()
    loop, loop_wall, loop_cpu = timed(
        lambda: np.stack([scipy_solve(y0[i], params[i], ts, RTOL) for i in range(n_scipy)])
    )
    loop_wall_n = loop_wall * args.n / n_scipy  # linear extrapolation when n_scipy < n
    print(f"scipy loop: {n_scipy} in {loop_wall:.1f} s", flush=True)
    time_ours()
    for r in runs.values():
        r["wall"], r["cpu"] = float(np.mean(r["walls"])), float(np.mean(r["cpus"]))

    tde_wall, tde = None, None
    if not args.skip_torchdiffeq:
        tde, tde_wall, _ = timed(
            lambda: simulate(
                system, y, p, tt, method="torchdiffeq:dopri5", rtol=RTOL, atol=ATOL
            ).numpy()
        )
        print(f"torchdiffeq dopri5, one batched call: {tde_wall:.2f} s", flush=True)

    ref = np.stack([scipy_solve(y0[i], params[i], ts, REF_TOL) for i in range(n_ref)])
    early = ts <= HORIZON
    accuracy = {
        "warp_phys": max_errors(ours, ref, early),
        "scipy_loop": max_errors(loop, ref, early),
    }
    if tde is not None:
        accuracy["torchdiffeq_dopri5"] = max_errors(tde, ref, early)
    ratio = accuracy["warp_phys"]["max_t_le_1"] / accuracy["scipy_loop"]["max_t_le_1"]
    headline = "default"
    speedups = {w: loop_wall_n / r["wall"] for w, r in runs.items()}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": load(),
        "task": {
            "n": args.n,
            "steps": args.steps,
            "t_span": list(T_SPAN),
            "rtol": RTOL,
            "atol": ATOL,
            "seed": args.seed,
        },
        "timing_s": {
            "warp_phys_by_workers": runs,
            "headline_workers": headline,
            "scipy_loop_wall": loop_wall,
            "scipy_loop_cpu": loop_cpu,
            "scipy_loop_trajectories": n_scipy,
            "scipy_loop_wall_for_n": loop_wall_n,
            "scipy_loop_extrapolated": n_scipy < args.n,
            "torchdiffeq_dopri5_wall": tde_wall,
        },
        "speedup": speedups[headline],
        "speedup_by_workers": speedups,
        "speedup_torchdiffeq_dopri5": loop_wall_n / tde_wall if tde_wall else None,
        "accuracy": {
            "reference": f"DOP853 rtol=atol={REF_TOL:g}",
            "trajectories": n_ref,
            **accuracy,
        },
        "error_ratio_vs_scipy": ratio,
        "targets_met": {
            "speedup_ge_50": bool(speedups[headline] >= 50),
            "error_le_2x_scipy": bool(ratio <= 2),
        },
    }


def markdown(r: dict) -> str:
    t, a, m, task = r["timing_s"], r["accuracy"], r["machine"], r["task"]
    loop = "scipy `solve_ivp` DOP853, a loop over trajectories"
    if t["scipy_loop_extrapolated"]:
        loop += f" (timed on {t['scipy_loop_trajectories']}, extrapolated linearly)"
    lines = [
        "# Lorenz-63 generation: warp_phys.simulate vs a scipy solve_ivp loop",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, scipy {m['scipy']}, "
        f"numpy {m['numpy']}, Python {m['python']}  ",
        f"Load average (1, 5, 15 min): {r['load_average_start']} at the start, "
        f"{r['load_average_end']} at the end. The machine is shared: other jobs competed for "
        "the same two cores during the run, slowing both sides.",
        "",
        f"Task: {task['n']} trajectories, {task['steps']} saved steps over t in [0, 10], "
        f"rtol = atol = {task['rtol']:g}, lorenz63 train ranges, seed {task['seed']}.",
        "",
        "| integrator | wall time (s) | speedup |",
        "|---|---:|---:|",
        f"| {loop} | {t['scipy_loop_wall_for_n']:.1f} | 1 |",
    ]
    if t["torchdiffeq_dopri5_wall"]:
        lines.append(
            f"| torchdiffeq dopri5, one batched call | {t['torchdiffeq_dopri5_wall']:.2f} "
            f"| {r['speedup_torchdiffeq_dopri5']:.0f}x |"
        )
    label = {}
    for c, run_ in t["warp_phys_by_workers"].items():
        used = "/".join(str(n) for n in sorted(set(run_["processes"])))
        label[c] = f"{used} process{'es' if used != '1' else ''}"
        name = f"warp_phys `simulate` (dop853, workers={c}: {label[c]})"
        cells = f"{run_['wall']:.2f} | {r['speedup_by_workers'][c]:.0f}x"
        if c == t["headline_workers"]:
            cells = " | ".join(f"**{x.strip()}**" for x in cells.split("|"))
            name = f"**warp_phys `simulate` (dop853, the default: {label[c]})**"
        lines.append(f"| {name} | {cells} |")
    runs = t["warp_phys_by_workers"].items()
    cpu = ", ".join(f"{label[c]} ({c}) {run_['cpu']:.2f} s" for c, run_ in runs)
    each = "; ".join(
        f"{label[c]} ({c}): " + ", ".join(f"{x:.2f}" for x in run_["walls"]) for c, run_ in runs
    )
    lines += [
        "",
        "warp_phys times are the mean of two runs, one before and one after the scipy loop "
        f"({each} s), so that both sides see the same mix of load from other jobs.",
        "",
        f"CPU time (all processes): scipy loop {t['scipy_loop_cpu']:.1f} s for "
        f"{t['scipy_loop_trajectories']} trajectories; warp_phys {cpu}. On an otherwise idle "
        "machine the workers would run side by side: the wall time of the split run would be "
        "about its CPU time divided by the number of workers.",
        "",
        f"Accuracy on the first {a['trajectories']} trajectories against {a['reference']} "
        "(max |error| over states and save times):",
        "",
        "| integrator | max, t <= 1 | median per trajectory, t <= 1 | max, whole span (chaotic) |",
        "|---|---:|---:|---:|",
    ]
    for name, e in a.items():
        if isinstance(e, dict):
            lines.append(
                f"| {name} | {e['max_t_le_1']:.3g} | {e['median_t_le_1']:.3g} "
                f"| {e['max_full_span']:.3g} |"
            )
    met = {k: "met" if v else "NOT met" for k, v in r["targets_met"].items()}
    lines += [
        "",
        f"Error ratio warp_phys / scipy loop over t <= 1: {r['error_ratio_vs_scipy']:.3f} "
        f"(target <= 2: {met['error_le_2x_scipy']}). Speedup of the default: "
        f"{r['speedup']:.0f}x (target >= 50: {met['speedup_ge_50']}).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="trajectories (default 4096)")
    p.add_argument("--steps", type=int, default=1000, help="saved steps (default 1000)")
    p.add_argument("--quick", action="store_true", help="256 trajectories; writes nothing")
    p.add_argument(
        "--scipy-n",
        type=int,
        default=None,
        help="time the scipy loop on this many and extrapolate (default: all)",
    )
    p.add_argument("--ref-n", type=int, default=64, help="trajectories checked for accuracy")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=None,
        help="worker counts to time besides the default (workers=None; default: 1 and cores)",
    )
    p.add_argument("--skip-torchdiffeq", action="store_true", help="do not time torchdiffeq")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.n, args.ref_n = 256, min(args.ref_n, 16)
    args.workers = args.workers or sorted({1, cores()})
    result = run(args)
    report = markdown(result)
    print(report)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "lorenz_generation.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "lorenz_generation.md").write_text(report)


if __name__ == "__main__":
    main()
