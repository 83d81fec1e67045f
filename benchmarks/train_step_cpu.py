"""Time one training step of each model of a preset on this CPU (issue 3, item 10).

    python benchmarks/train_step_cpu.py [--preset msd_small] [--threads 1 2] [--repeats 5]

Generates the preset's dataset if missing. Reports the median wall time of a full training
step (loss, backward, optimiser) in each phase: teacher-forced (one-step loss, WARP's
parallel scan) and autoregressive (context L, teacher forcing 0.5). Writes
benchmarks/results/train_step_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from warp_phys.cli import tune_allocator
from warp_phys.config import load_config
from warp_phys.models import build_model
from warp_phys.optim import Optimiser
from warp_phys.run import prepare_data
from warp_phys.train import step_loss


def time_steps(model, opt, ys, scale, *, context, teacher_prob, repeats) -> float:
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        t0 = time.perf_counter()
        loss = step_loss(
            model,
            ys,
            scale,
            context=context,
            teacher_prob=teacher_prob,
            generator=gen,
            loss="mse",
            penalty_weight=0.0,
        )
        opt.step(loss, 0.5)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="msd_small")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/train_step_cpu.md")
    args = ap.parse_args()
    tune_allocator()  # what the command line does before any work: time what a user gets
    load_before = os.getloadavg()
    cfg = load_config(args.preset)
    data = prepare_data(cfg, progress=False)
    ys = data.splits["train"].y[: cfg.train.batch_size]
    scale, T, L = data.scale(), data.n_steps, cfg.data.context
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label in cfg.models:
            torch.manual_seed(0)
            model = build_model(cfg.model_for(label), data)
            opt = Optimiser(
                cfg.train_for(cfg.model_for(label)),
                [p for p in model.parameters() if p.requires_grad],
            )
            tf = time_steps(
                model, opt, ys, scale, context=T, teacher_prob=0.0, repeats=args.repeats
            )
            ar = time_steps(
                model, opt, ys, scale, context=L, teacher_prob=0.5, repeats=args.repeats
            )
            n = sum(p.numel() for p in model.parameters())
            rows.append((threads, label, n, tf * 1e3, ar * 1e3))
            print(
                f"threads {threads} {label:10s} params {n:>10,}  teacher-forced {tf * 1e3:8.1f} ms  "
                f"autoregressive {ar * 1e3:8.1f} ms",
                flush=True,
            )
    load = os.getloadavg()
    lines = [
        f"# One training step per model, preset `{args.preset}` (batch {cfg.train.batch_size}, T {T}, L {L})",
        "",
        f"Command: `python benchmarks/train_step_cpu.py --preset {args.preset} --threads "
        f"{' '.join(map(str, args.threads))} --repeats {args.repeats}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"load average {load_before[0]:.1f} before and {load[0]:.1f} at the end (a shared "
        f"machine: other jobs ran at the same time; compare models within this run).",
        "",
        "Median of the timed steps after one warm-up; a step is loss + backward + optimiser update.",
        "",
        "| threads | model | parameters | teacher-forced step (ms) | autoregressive step (ms) |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [f"| {t} | {lab} | {n:,} | {tf:.1f} | {ar:.1f} |" for t, lab, n, tf, ar in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
