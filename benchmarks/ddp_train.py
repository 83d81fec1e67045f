"""Training on 2 gloo processes (torchrun) against one process, on this machine's CPU (issue 10).

The commands a user types, whole processes, timed from outside, on the same store, model and
global batch:

    warp-phys train --data STORE --model warp --out ONE ...
    torchrun --nproc-per-node 2 -m warp_phys train --data STORE --model warp --out TWO ...

Steps per second per phase come from rank 0's history.json (step times, startup excluded);
the two loss curves are compared. The communication of a step is measured apart, on 2 gloo
processes: an all-reduce of the model's gradient (what DistributedDataParallel sends, in
buckets, overlapped with the backward) and the one scalar all-reduce of the loss; its share
is that time over the 2-process step time (an upper bound: DDP overlaps it).

    python benchmarks/ddp_train.py            # writes benchmarks/results/ddp_train.json
    python benchmarks/ddp_train.py --quick    # a few steps, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> dict:
    before = load()
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "load_before": before, "load_after": load()}


def rates(run_dir: Path) -> dict:
    """Steps per second of each phase, from the step times rank 0 recorded."""
    history = [h for h in json.loads((run_dir / "history.json").read_text()) if "loss" in h]
    out = {}
    for phase in ("teacher", "auto"):
        times = [h["time"] for h in history if h["phase"] == phase]
        if len(times) > 2:  # the first step of a phase pays its warm-up
            out[phase] = (len(times) - 2) / (times[-1] - times[1])
    out["losses"] = [h["loss"] for h in history]
    return out


def _comm(rank: int, world: int, port: int, n_params: int, repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grad, scalar = torch.randn(n_params), torch.zeros(1, dtype=torch.float64)
    for _ in range(3):
        dist.all_reduce(grad)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grad)  # the gradient
        dist.all_reduce(scalar)  # the loss (distributed.all_mean)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps({"median_s": float(np.median(times))}))
    dist.destroy_process_group()


def comm_time(n_params: int, repeats: int = 50) -> float:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "comm.json")
        mp.spawn(_comm, args=(2, free_port(), n_params, repeats, out), nprocs=2)
        return json.loads(Path(out).read_text())["median_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 6 if args.quick else args.steps
    tmp = Path(tempfile.mkdtemp(prefix="ddp-bench-"))
    try:
        store = tmp / "msd.zarr"
        gen = [sys.executable, "-m", "warp_phys", "generate", "msd", "--out", str(store)]
        run(
            gen
            + ["--n-train", "512", "--n-val", "64", "--n-test", "64", "--n-test-ood", "64", "-q"]
        )
        sets = [f"train.steps={steps}", "train.max_seconds=0", f"train.batch_size={args.batch}",
                "train.eval_every=1000000", "train.teacher_forced_fraction=0.5", "data.context=100"]  # fmt: skip
        opts = ["--data", str(store), "--model", "warp", "-q"]
        opts += [a for s in sets for a in ("--set", s)]
        one = [sys.executable, "-m", "warp_phys", "train", *opts, "--out", str(tmp / "one")]
        two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        two += ["--master-port", str(free_port()), "-m", "warp_phys", "train", *opts]
        two += ["--out", str(tmp / "two")]
        runs = {"one_process": run(one), "two_processes": run(two)}
        for name, folder in (("one_process", "one"), ("two_processes", "two")):
            runs[name] |= rates(tmp / folder)
        summary = json.loads((tmp / "one" / "train_summary.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = (np.array(runs[k].pop("losses")) for k in ("one_process", "two_processes"))
    comm = comm_time(summary["n_params"])
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "steps": steps,
        "global_batch": args.batch,
        "n_params": summary["n_params"],
        "runs": runs,
        "max_relative_loss_difference": float(np.max(np.abs(a - b) / np.abs(a))),
        "comm_s_per_step": comm,
        "comm_share": {phase: comm * runs["two_processes"][phase] for phase in ("teacher", "auto")},
        "speedup": {
            phase: runs["two_processes"][phase] / runs["one_process"][phase]
            for phase in ("teacher", "auto")
        },
    }
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ddp_train.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
