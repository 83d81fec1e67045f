"""Peak memory of streaming trajectories into a zarr store: bounded by the chunk, not the dataset.

Each configuration runs in a fresh process that reports its resident memory after the imports
(torch, xarray, zarr, the registry) and its peak resident memory (``ru_maxrss``) after
`generate_store`; the difference is what generation itself costs. The system is the paper's
mass-spring-damper (`msd`: T = 256 steps, 2 states, default dop853 at rtol = atol = 1e-8).

    .venv/bin/python benchmarks/store_memory.py                  # writes results/store_memory.md
    .venv/bin/python benchmarks/store_memory.py --sizes 1000 10000 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = "msd"
READING = """\
"peak - imports" is what generation itself costs. It follows the chunk (the integrator's
working set and one chunk of `y` in float64, compressed and written before the next one), not
the number of trajectories: `y` alone of the largest run is ten times that. What grows
slowly with the count is the up-front draw of every parameter vector and initial state of a
split (5 float64 per msd trajectory, plus a few transient copies while the store skeleton is
written): that draw is what makes the bytes independent of the chunk size and of interruptions.
"""
RUNS = [(1_000, 256), (10_000, 256), (100_000, 256), (10_000, 2048)]  # (trajectories, chunk)


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(n: int, chunk: int, out: Path) -> dict:
    """Generate `n` msd trajectories (all in `train`) at `chunk`; return the memory figures."""
    from warp_phys.store import generate_store
    from warp_phys.system import get_system

    system = get_system(SYSTEM)
    system.times()
    base = rss_mib()
    start = time.perf_counter()
    generate_store(system, out, counts={"train": n}, seed=0, chunk=chunk, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    y_mib = n * system.n_steps * system.state_dim * 8 / 2**20
    return {
        "n": n,
        "chunk": chunk,
        "seconds": seconds,
        "base_mib": base,
        "peak_mib": peak,
        "generation_mib": peak - base,
        "chunk_y_mib": chunk * system.n_steps * system.state_dim * 8 / 2**20,
        "dataset_y_mib": y_mib,
        "store_mib": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| trajectories | chunk | y of one chunk | y of the dataset | store on disk "
        "| RSS after imports | peak RSS | peak - imports | time |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    return head + "\n".join(
        f"| {r['n']:,} | {r['chunk']} | {r['chunk_y_mib']:.1f} MiB | {r['dataset_y_mib']:.0f} MiB "
        f"| {r['store_mib']:.0f} MiB | {r['base_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB "
        f"| {r['generation_mib']:.0f} MiB | {r['seconds']:.0f} s |"
        for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/out/bench-store-memory"))
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        help="trajectories at chunk 256 (default: 1k, 10k, 100k + 10k at chunk 2048)",
    )
    parser.add_argument("--one", nargs=2, type=int, metavar=("N", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ alone")
    args = parser.parse_args()
    if args.one:  # child process: one configuration, JSON on stdout
        print(json.dumps(one(*args.one, args.out)))
        return
    runs = [(n, 256) for n in args.sizes] if args.sizes else RUNS
    rows = []
    for n, chunk in runs:
        out = args.out / f"{SYSTEM}-{n}-c{chunk}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, __file__, "--one", str(n), str(chunk), "--out", str(out)]
        rows.append(
            json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        )
        shutil.rmtree(out, ignore_errors=True)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = (
        "# Peak memory of streaming trajectories into a store\n\n"
        "Command: `.venv/bin/python benchmarks/store_memory.py` "
        f"({platform.machine()}, Python {platform.python_version()}, CPU only, 2 cores shared "
        f"with other work; system `{SYSTEM}`: "
        "T = 256, 2 states, float64, all trajectories in `train`, default integrator).\n\n"
        + table(rows)
        + "\n\n"
        + READING
    )
    print(text)
    if not args.no_write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "store_memory.md").write_text(text)


if __name__ == "__main__":
    main()
