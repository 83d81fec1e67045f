"""Parallel scan against the sequential loop on this CPU (issue 3, item 10).

    .venv/bin/python benchmarks/scan_cpu.py --out benchmarks/results/scan_cpu.md

For each (batch, T, Dθ) and transition (dense I + Ã, rotation blocks) it times, in float32:
forward only (no autograd) and forward + backward (gradients of u, h0 and A), for the loop
(T steps, plain autograd through them: the baseline), the sequential and chunked algorithms
(both with the custom backward of `warp_phys.scan`), the doubling scan where its
log2(T)-times flops are affordable, and marks which one `scan(method="auto")` picks. The
best of `--rounds` interleaved runs (at least two for a method past `--budget` seconds).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from pathlib import Path

import torch

from warp_phys.scan import choose_method, scan
from warp_phys.transition import Dense, Rotation

SHAPES = [(8, 1024, 1030), (64, 256, 1030), (16, 256, 4898)]  # (batch, T, Dθ)


def timed(fns: dict, rounds: int, budget: float) -> dict[str, float]:
    """Return the best wall time in ms of each fn over interleaved rounds.

    The machine is shared, so background load only ever adds time: the minimum is the
    least disturbed figure, and interleaving lets every method see the same load. Each fn
    runs `rounds` times (the first also warms up), or at least twice once its own
    cumulative time passes `budget` seconds.
    """
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            if r >= 2 and sum(runs[name]) > budget:
                continue
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    return {name: 1e3 * min(v) for name, v in runs.items()}


@torch.no_grad()
def make_op(kind: str, D: int):
    torch.manual_seed(0)
    if kind == "dense":
        tr = Dense(D)
        tr.residual.normal_(0, 1e-2 / math.sqrt(D))  # a trained-looking A = I + small
    else:
        tr = Rotation(D)
    return tr.operator()


def bench_case(kind: str, B: int, T: int, D: int, rounds: int, budget: float) -> list[dict]:
    op = make_op(kind, D)
    u, h0, w = torch.randn(B, T, D), torch.randn(B, D), torch.randn(B, T, D)
    methods = ["loop", "sequential", "chunked"]
    if kind != "dense" or math.log2(T) * B * T * D * D < 5e10:  # doubling: log2(T)x the flops
        methods.append("doubling")
    auto = {
        "forward": choose_method(op, B, T, D, u.device),
        "forward+backward": choose_method(op, B, T, D, u.device, grad=True),
    }
    rows = []
    with torch.no_grad():
        ref = scan(op, u, h0, method="loop")
        err = {}
        for m in methods:
            got = scan(op, u, h0, method=m)
            err[m] = float((got - ref).abs().max() / ref.abs().max())
        del got, ref
        fwd = timed({m: lambda m=m: scan(op, u, h0, method=m) for m in methods}, rounds, budget)
    for m in methods:
        rows.append(
            dict(kind=kind, shape=(B, T, D), pass_="forward", method=m, ms=fwd[m], err=err[m])
        )
    leaves = [t.clone().requires_grad_() for t in (u, h0, *op)]

    def fwd_bwd(fn):
        for leaf in leaves:
            leaf.grad = None
        (fn(type(op)(*leaves[2:]), leaves[0], leaves[1]) * w).sum().backward()

    fns = {}
    for m in methods:
        fns[m] = lambda m=m: fwd_bwd(lambda o, x, h: scan(o, x, h, method=m))
    both = timed(fns, rounds, budget)
    for m, ms in both.items():
        rows.append(dict(kind=kind, shape=(B, T, D), pass_="forward+backward", method=m, ms=ms))
    for r in rows:
        r["auto"] = auto
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| transition | (batch, T, Dθ) | pass | method | ms | loop / method | max rel. diff |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    loop = {}
    for r in rows:
        if r["method"] == "loop":
            loop[(r["kind"], r["shape"], r["pass_"])] = r["ms"]
    for r in rows:
        base = loop[(r["kind"], r["shape"], r["pass_"])]
        name = r["method"] + (" (auto)" if r["method"] == r["auto"][r["pass_"]] else "")
        err = f"{r['err']:.1e}" if "err" in r else ""
        lines.append(
            f"| {r['kind']} | {r['shape']} | {r['pass_']} | {name} | {r['ms']:.3g} | "
            f"{base / r['ms']:.2f} | {err} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    ap.add_argument("--rounds", type=int, default=5, help="runs per method (the first warms up)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per method and case")
    ap.add_argument("--kinds", default="dense,rotation")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default). On a machine shared beyond its cores use 1: "
        "every multi-threaded op then waits for a descheduled partner thread",
    )
    ap.add_argument("--shapes", default=None, help="e.g. 8x1024x1030,64x256x1030")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for B, T, D in shapes:
        for kind in args.kinds.split(","):
            rows += bench_case(kind, B, T, D, args.rounds, args.budget)
            print(table([r for r in rows if r["shape"] == (B, T, D) and r["kind"] == kind]))
    if args.out:
        head = (
            f"# Scan on CPU: parallel against the sequential loop\n\n"
            f"Command: `.venv/bin/python benchmarks/scan_cpu.py --threads {args.threads} "
            f"--out {args.out}`\n\n"
            f"Date {datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32, "
            f"load average at the end {os.getloadavg()[0]:.1f} (machine shared).\n\n"
        )
        args.out.write_text(head + table(rows) + "\n")


if __name__ == "__main__":
    main()
