"""`warp-phys generate lorenz63 --out X --n-train 4096`, the command a user types, against a
scipy DOP853 loop over the same trajectories (issue 14, item 4).

The command runs as its own process with its default flags (rtol = atol = 1e-8, chunk 256,
the automatic integration batch), timed from outside: imports, the probe, integration,
compression and writing of all four splits (4096 + 128 + 128 + 128 trajectories), and the
interpreter's exit. It runs `--runs` times, half before and half after the scipy loop, so that
both sides see the same mix of load from other jobs on this shared machine (single runs vary by
+-15% here); the speedup uses the mean. A last run with ``--batch 256`` (one chunk integrated
at a time, the earlier behaviour) shows what the batch is worth.

The baseline is how dysts and the paper's scripts generate data: ``solve_ivp(method="DOP853")``
one trajectory at a time with a plain numpy right-hand side, at the store's tolerances and save
times, on the store's own initial states and parameters. A full loop takes many minutes here,
so it runs on `--sample` trajectories of every split and its time is extrapolated from the
mean time per trajectory of each split (the loop's cost is linear in the trajectories).
Accuracy: on the first `--check` trajectories of the train split, the maximum error over
t <= 1 against DOP853 at rtol = atol = 1e-12, for the store and for the loop.

    python benchmarks/generate_cli.py            # writes benchmarks/results/generate_cli.*
    python benchmarks/generate_cli.py --quick    # 256 trajectories, writes nothing
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zarr
from lorenz_generation import load, lorenz, machine, max_errors
from scipy.integrate import solve_ivp

RESULTS = Path(__file__).parent / "results"
SPLITS = ("train", "val", "test", "test_ood")
REF_TOL = 1e-12
HORIZON = 1.0


def run_cli(out: Path, n_train: int, extra: list[str]) -> dict:
    """Run the command as a user would (a fresh process) and time it from outside."""
    cmd = ["warp-phys", "generate", "lorenz63", "--out", str(out), "--n-train", str(n_train)]
    cmd += extra
    exe = [sys.executable, "-m", "warp_phys", *cmd[1:]]  # the same entry point as `warp-phys`
    before = load()
    start = time.perf_counter()
    proc = subprocess.run(exe, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "command": shlex.join(cmd).replace(str(out), "X"),  # the temporary folder, as X
        "wall_s": wall,
        "peak_rss_mb_so_far": peak_mb,
        "load_before": before,
        "load_after": load(),
    }


def solve(y0, params, ts, tol) -> np.ndarray:
    sol = solve_ivp(
        lorenz, (float(ts[0]), float(ts[-1])), y0, method="DOP853", rtol=tol, atol=tol,
        t_eval=ts, args=tuple(params),
    )  # fmt: skip
    if not sol.success:
        raise RuntimeError(sol.message)
    return sol.y.T  # (T, 3)


def scipy_loop(store: Path, sample: int, tol: float) -> dict:
    """Time the loop on the first `sample` trajectories of every split; extrapolate."""
    root = zarr.open_group(str(store), mode="r")
    per_split, total = {}, 0.0
    for split in SPLITS:
        group = root[split]
        ts = np.asarray(group["time"][:])
        n = group["y0"].shape[0]
        k = min(sample, n)
        y0, params = group["y0"][:k], group["params"][:k]
        start = time.perf_counter()
        for i in range(k):
            solve(y0[i], params[i], ts, tol)
        per = (time.perf_counter() - start) / k
        per_split[split] = {"n": n, "sampled": k, "s_per_trajectory": per}
        total += per * n
    return {"per_split": per_split, "estimated_s": total}


def accuracy(store: Path, check: int, tol: float) -> dict:
    group = zarr.open_group(str(store), mode="r")["train"]
    ts = np.asarray(group["time"][:])
    y0, params, ys = group["y0"][:check], group["params"][:check], group["y"][:check]
    ref = np.stack([solve(y0[i], params[i], ts, REF_TOL) for i in range(check)])
    loop = np.stack([solve(y0[i], params[i], ts, tol) for i in range(check)])
    early = ts <= ts[0] + HORIZON
    return {"store": max_errors(ys, ref, early), "scipy_loop": max_errors(loop, ref, early)}


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="generate-cli-"))
    try:
        stores = [work / f"run{i}.zarr" for i in range(args.runs)]
        half = (args.runs + 1) // 2
        runs = [run_cli(path, args.n_train, []) for path in stores[:half]]
        attrs = zarr.open_group(str(stores[0]), mode="r").attrs["warp_phys"]["arguments"]
        tol = float(attrs["rtol"])
        assert float(attrs["atol"]) == tol
        loop_before = load()
        loop = scipy_loop(stores[0], args.sample, tol)
        loop["load_before"], loop["load_after"] = loop_before, load()
        runs += [run_cli(path, args.n_train, []) for path in stores[half:]]
        one_chunk = run_cli(work / "batch256.zarr", args.n_train, ["--batch", "256"])
        same = all(
            np.array_equal(
                zarr.open_group(str(stores[0]))[s]["y"][:],
                zarr.open_group(str(other))[s]["y"][:],
            )
            for other in stores[1:] + [work / "batch256.zarr"]
            for s in SPLITS
        )
        acc = accuracy(stores[0], args.check, tol)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mean = sum(r["wall_s"] for r in runs) / len(runs)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "n_train": args.n_train,
        "tolerance": tol,
        "cli": runs,
        "cli_mean_s": mean,
        "cli_batch_256": one_chunk,
        "scipy_loop": loop,
        "speedup": loop["estimated_s"] / mean,
        "speedup_batch_256": loop["estimated_s"] / one_chunk["wall_s"],
        "identical_bytes_between_runs": same,
        "accuracy": acc,
        "error_ratio_t_le_1": acc["store"]["max_t_le_1"] / acc["scipy_loop"]["max_t_le_1"],
    }


def markdown(r: dict) -> str:
    m, loop = r["machine"], r["scipy_loop"]
    a = r["cli"][0]
    n = len(r["cli"])
    half = (n + 1) // 2
    each = "\n".join(
        f"| run {i + 1}{' (after the loop)' if i >= half else ''} | {c['wall_s']:.2f} | | "
        f"{c['load_before']} → {c['load_after']} |"
        for i, c in enumerate(r["cli"])
    )
    rows = "\n".join(
        f"| {s} | {v['n']} | {v['sampled']} | {1e3 * v['s_per_trajectory']:.1f} |"
        for s, v in loop["per_split"].items()
    )
    acc = r["accuracy"]
    header = "  \n".join([
        "Command: `python benchmarks/generate_cli.py`",
        f"Date: {r['date']}",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, scipy {m['scipy']}, "
        f"Python {m['python']}",
        "The machine is shared: load average (1, 5, 15 min) is recorded around every run.",
    ])  # fmt: skip
    return f"""# `warp-phys generate lorenz63 --n-train {r["n_train"]}`: the command, whole process

{header}

Task: `{a["command"]}` with its default flags (rtol = atol = {r["tolerance"]:g}, chunk 256, the
automatic integration batch): {r["n_train"]} train + 128 val + 128 test + 128 test_ood
Lorenz-63 trajectories, 1,001 saved times each, integrated, compressed and written, timed from
outside the process (imports included).

| | wall time (s) | speedup over the scipy loop | load before → after |
|---|---:|---:|---|
| scipy DOP853 loop, one trajectory at a time (estimated, below) | {loop["estimated_s"]:.1f} | 1 | {loop["load_before"]} → {loop["load_after"]} |
| **`warp-phys generate`, defaults (mean of {n} runs)** | **{r["cli_mean_s"]:.2f}** | **{r["speedup"]:.0f}x** | |
{each}
| `--batch 256` (one chunk integrated at a time) | {r["cli_batch_256"]["wall_s"]:.2f} | {r["speedup_batch_256"]:.0f}x | {r["cli_batch_256"]["load_before"]} → {r["cli_batch_256"]["load_after"]} |

The scipy loop ran on the first trajectories of each split, at the store's tolerances and save
times, on the store's own initial states and parameters; its time is the mean per trajectory
times the split's size:

| split | trajectories | timed | ms per trajectory |
|---|---:|---:|---:|
{rows}

Peak resident memory of the generate processes: {max(c["peak_rss_mb_so_far"] for c in r["cli"]):.0f} MB (the largest
child of this script so far). Every run, `--batch 256` included, wrote the same bytes as
the first: {r["identical_bytes_between_runs"]}.

Accuracy on the first train trajectories against DOP853 at rtol = atol = 1e-12 (max |error|
over states and save times):

| | max, t <= 1 | median per trajectory, t <= 1 | max, whole span (chaotic) |
|---|---:|---:|---:|
| store | {acc["store"]["max_t_le_1"]:.3g} | {acc["store"]["median_t_le_1"]:.3g} | {acc["store"]["max_full_span"]:.3g} |
| scipy loop | {acc["scipy_loop"]["max_t_le_1"]:.3g} | {acc["scipy_loop"]["median_t_le_1"]:.3g} | {acc["scipy_loop"]["max_full_span"]:.3g} |

Error ratio store / scipy loop over t <= 1: {r["error_ratio_t_le_1"]:.3f}. Speedup of the
command a user types: {r["speedup"]:.0f}x (target >= 50: {"met" if r["speedup"] >= 50 else "not met"}).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 trajectories, write nothing")
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--sample", type=int, default=128, help="scipy-loop trajectories per split")
    parser.add_argument("--check", type=int, default=32, help="trajectories checked for accuracy")
    parser.add_argument("--runs", type=int, default=4, help="default runs of the command")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.sample, args.check, args.runs = 256, 4, 2, 2
    result = run(args)
    text = markdown(result)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "generate_cli.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "generate_cli.md").write_text(text)


if __name__ == "__main__":
    main()
