"""Lorenz-63 generation on a 2-worker dask LocalCluster against one process (issue 10).

The commands a user types, whole processes, timed from outside:

    warp-phys generate lorenz63 --out ONE  --n-train 16384 --chunk C -q
    warp-phys generate lorenz63 --out DASK --n-train 16384 --chunk C -q --dask local:2

then the two stores compared array by array (every array of every group), then a breakdown of
the dask run from Python, one chunk per task (cluster start, generation, close; every task's compute time from
the scheduler's task stream), the scheduler's overhead per task (no-op tasks), and the
client's own work per chunk (the marks). The machine is shared: the load average is recorded
before and after every run. Last, the projection to 10^6 trajectories on 64 workers.

    python benchmarks/dask_generation.py             # full size, writes benchmarks/results/
    python benchmarks/dask_generation.py --quick     # 512 trajectories, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zarr

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
SPLITS = ("--n-val", "128", "--n-test", "128", "--n-test-ood", "128")  # the defaults


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def command(out: Path, n: int, chunk: int, dask: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "warp_phys", "generate", "lorenz63", "--out", str(out)]
    cmd += ["--n-train", str(n), *SPLITS, "--chunk", str(chunk), "-q"]
    return cmd + (["--dask", dask] if dask else [])


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_command(cmd: list[str]) -> dict:
    """Wall time and CPU time (the command and every process it started and reaped)."""
    before, cpu = load(), children_cpu()
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    return {
        "command": " ".join(cmd[2:]),
        "wall_s": wall,
        "cpu_s": children_cpu() - cpu,
        "load_before": before,
        "load_after": load(),
    }


def arrays(path: Path) -> dict[str, np.ndarray]:
    def walk(group, prefix=""):
        for name, member in group.members():
            if isinstance(member, zarr.Group):
                yield from walk(member, f"{prefix}{name}/")
            else:
                yield f"{prefix}{name}", member[...]

    return dict(walk(zarr.open_group(path, mode="r")))


def same_bytes(a: Path, b: Path) -> bool:
    x, y = arrays(a), arrays(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def breakdown(out: Path, n: int, chunk: int, workers: int) -> dict:
    """The dask run from Python: where its time goes, one chunk per task (``batch=chunk``), so
    that the figures per task are figures per chunk for the projection."""
    from distributed import get_task_stream

    from warp_phys.cluster import connect
    from warp_phys.store import _n_chunks, generate_store
    from warp_phys.system import get_system

    counts = {"train": n, "val": 128, "test": 128, "test_ood": 128}
    before = load()
    t0 = time.perf_counter()
    with connect(f"local:{workers}") as client:
        client.wait_for_workers(workers)
        client.run(lambda: __import__("warp_phys.store"))  # imports, outside the timing
        up = time.perf_counter() - t0
        noop = _noop_overhead(client)
        cpu0 = client.run(time.process_time)  # per worker process
        t1 = time.perf_counter()
        with get_task_stream(client) as ts:
            generate_store(get_system("lorenz63"), out, counts=counts, chunk=chunk, batch=chunk,
                           client=client, progress=False)  # fmt: skip
        gen = time.perf_counter() - t1
        cpu1 = client.run(time.process_time)
        t2 = time.perf_counter()
    close = time.perf_counter() - t2
    tasks = [t for t in ts.data if "_write_chunks" in str(t["key"])]
    compute = [sum(s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
               for t in tasks]  # fmt: skip
    chunks = _n_chunks(counts, chunk)
    idle = workers * gen - sum(compute)  # worker time not spent integrating
    return {
        "workers": workers,
        "chunks": chunks,
        "cluster_start_s": up,
        "generate_s": gen,
        "close_s": close,
        "task_compute_s": {
            "sum": sum(compute),
            "mean": float(np.mean(compute)),
            "min": float(np.min(compute)),
            "max": float(np.max(compute)),
        },  # fmt: skip
        "worker_idle_per_chunk_s": idle / chunks,
        "worker_cpu_s": sum(cpu1[w] - cpu0[w] for w in cpu0),
        "noop_task_overhead_s": noop,
        "load_before": before,
        "load_after": load(),
    }


def _noop_overhead(client, n: int = 200) -> float:
    """Seconds per task of the scheduler round trip: submit n no-op tasks, gather them."""
    client.gather(client.map(_noop, range(20), pure=False))  # warm
    start = time.perf_counter()
    client.gather(client.map(_noop, range(n), pure=False))
    return (time.perf_counter() - start) / n


def _noop(i: int) -> int:
    return i


def marks_cost(chunk: int, state_dim: int = 3, repeats: int = 200) -> float:
    """Seconds the client spends per finished chunk writing its marks (local store)."""
    from warp_phys.store import _PROGRESS, _create_marks, _mark

    with tempfile.TemporaryDirectory() as tmp:
        root = zarr.open_group(Path(tmp) / "m.zarr", mode="w", zarr_format=3)
        _create_marks(root.create_group(_PROGRESS).create_group("train"), repeats, state_dim)
        lo, hi = np.zeros(state_dim), np.ones(state_dim)
        start = time.perf_counter()
        for k in range(repeats):
            _mark(root, "done", [("train", k, (lo, hi))])
        return (time.perf_counter() - start) / repeats


def projection(one: dict, br: dict, marks: float, n_target: int = 10**6, workers: int = 64) -> dict:
    """10^6 trajectories on 64 workers, from the per-chunk figures measured here."""
    chunk = br["chunk"]
    per_chunk = br["task_compute_s"]["mean"]  # one core of this machine, under its load
    overhead = br["noop_task_overhead_s"]
    chunks = -(-n_target // chunk)
    compute = chunks * (per_chunk + overhead) / workers
    client = chunks * marks
    skeleton = one["skeleton_s_per_trajectory"] * n_target
    return {
        "trajectories": n_target,
        "workers": workers,
        "chunk": chunk,
        "chunks": chunks,
        "per_chunk_compute_s": per_chunk,
        "per_chunk_overhead_s": overhead,
        "workers_s": compute,
        "client_marks_s": client,
        "client_skeleton_s": skeleton,
        "total_s": compute + skeleton,
        "one_process_s": chunks * per_chunk + skeleton,
        "store_gb": n_target * 1000 * 3 * 8 / 1e9,
    }


def skeleton_cost(n: int) -> float:
    """Seconds per trajectory of the client's skeleton (parameters and initial states drawn and
    written), from a store of n trajectories."""
    from warp_phys.store import _arguments, _create
    from warp_phys.system import get_system

    system = get_system("lorenz63")
    counts = {"train": n, "val": 1, "test": 1, "test_ood": 1}
    with tempfile.TemporaryDirectory() as tmp:
        args = _arguments(system, counts, 0, 1024, "dop853", 1e-8, 1e-8)
        start = time.perf_counter()
        _create(Path(tmp) / "s.zarr", system, args, 0)
        return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="512 trajectories; write nothing")
    args = ap.parse_args()
    n = 512 if args.quick else args.n_train
    tmp = Path(tempfile.mkdtemp(prefix="dask-bench-"))
    try:
        runs = {
            "one_process": timed_command(command(tmp / "one.zarr", n, args.chunk, None)),
            "dask": timed_command(command(tmp / "dask.zarr", n, args.chunk, f"local:{args.workers}")),
        }  # fmt: skip
        identical = same_bytes(tmp / "one.zarr", tmp / "dask.zarr")
        br = breakdown(tmp / "lib.zarr", n, args.chunk, args.workers) | {"chunk": args.chunk}
        identical &= same_bytes(tmp / "one.zarr", tmp / "lib.zarr")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marks = marks_cost(args.chunk)
    one = {"skeleton_s_per_trajectory": skeleton_cost(min(n, 65536))}
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": len(os.sched_getaffinity(0)),
        "n_train": n,
        "chunk": args.chunk,
        "runs": runs,
        "ratio": runs["one_process"]["wall_s"] / runs["dask"]["wall_s"],
        "identical_bytes": identical,
        # if the two cores were ours: the single process at its CPU time; the dask run at its
        # cluster start and close, plus its workers' CPU shared by the workers
        "ratio_if_idle": runs["one_process"]["cpu_s"]
        / (br["cluster_start_s"] + br["close_s"] + br["worker_cpu_s"] / args.workers),
        "breakdown": br,
        "client_marks_s_per_chunk": marks,
        "projection": projection(one, br, marks),
        "skeleton_s_per_trajectory": one["skeleton_s_per_trajectory"],
    }
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "dask_generation.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
