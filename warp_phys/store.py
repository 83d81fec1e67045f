"""Zarr stores of simulated trajectories: chunked, resumable, self-describing; xarray/torch views.

One store (zarr format 3) per dataset, one group per split:

    PATH/                            attrs: warp_phys (format, version, arguments), complete
      train/ val/ test/ test_ood/    each opens with ``xarray.open_zarr(PATH, group=split)``
        y (trajectory, time, state)  float64, chunked along trajectory by `chunk`
        params (trajectory, parameter), y0 (trajectory, state)
        obs (trajectory, time, state) y plus Gaussian observation noise (only with `noise`)
        coordinates trajectory, time, state (names), parameter (names); attrs describe the
        system, ranges, initial states, integrator, seed and the range of values per state
      _progress/<split>/             done (chunk) marks and per-chunk y_min, y_max (chunk, state);
                                     obs_done with `noise`

Reproducibility: the parameter vectors and initial states of a split are one draw from
``SeedSequence([seed, split index])``, stored before any trajectory is integrated; they are
drawn and written in blocks (`System.sample_rows` reads any rows of that one draw), so memory
is bounded by the block whatever the count, with the bytes of a draw of the whole split. Since
`simulate` gives a trajectory the same values whatever shares its batch, the bytes depend on
neither `chunk` nor interruptions. Resumability: the skeleton appears at PATH in one rename,
a chunk's `done` mark is written after its data (zarr's local store writes each file
atomically), and the root attribute `complete` is set last, after the metadata is consolidated.
One writer at a time: a writer holds the lock file ``.NAME.lock`` beside the store (released by
the kernel even on a kill), and removes skeletons (``.NAME.partial-*``) that a killed writer
left behind.

Integrity (format 2): every chunk carries a CRC-32C checksum (zarr's crc32c codec after zstd),
so a changed byte is an error when the chunk is read, never a plausible number. Reading checks
the declared shapes, finite values, y within the value range recorded at writing, y at t0 equal
to y0, and parameters within their declared ranges and positivity (`check_split`);
`verify_store` (``warp-phys info --verify``) reads every chunk. `fingerprint` identifies a store's
content cheaply for the run directories that use it. Format-1 stores (no checksums) still open.

Observation noise (`noise` = σ as a fraction of each state's standard deviation over the train
split): written after every clean chunk, so that the standard deviation is known. It is computed
in fixed blocks of trajectories and trajectory i's noise comes from its own
``SeedSequence([seed, split index, NOISE_STREAM, i])``: the bytes depend on neither `chunk` nor
interruptions either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from warp_phys import location
from warp_phys import simulate as simulate_module
from warp_phys.cluster import InProcess, OnDask
from warp_phys.errors import StoreError, UserError
from warp_phys.integrity import check_chunks_present, check_shapes, reading
from warp_phys.places import check_disk_space, check_parent, claim
from warp_phys.registry import add_plugin_folder, plugin_folders
from warp_phys.simulate import (
    DEFAULT_ATOL,
    DEFAULT_METHOD,
    DEFAULT_RTOL,
    check_tolerances,
    simulate,
)
from warp_phys.system import SPLITS, System

if TYPE_CHECKING:
    import xarray

log = logging.getLogger(__name__)

FORMAT = 2  # layout version, bumped when the layout above changes (2: CRC-32C per chunk)
_PROGRESS = "_progress"
_MARKS_PER_FILE = 1024  # chunk marks per zarr chunk of the _progress arrays
_SMALL_CHUNK = 65536  # trajectories per zarr chunk of params and y0 (tiny arrays)
NOISE_STREAM = 1  # third entry of a trajectory's noise SeedSequence (parameters use none)
BATCH_BYTES = 256 * 2**20  # float64 output of one integration batch, by default
MAX_BATCH = 8192  # trajectories integrated at once, by default
_STD_BLOCK = 256  # trajectories per block of the train-std computation: fixed, never `chunk`


@dataclass(frozen=True)
class GenerateReport:
    """What `generate_store` did: chunks written now, chunks found done, whether it was a no-op."""

    path: Path | location.RemotePath
    written: int
    skipped: int
    already_complete: bool


# -- writing ----------------------------------------------------------------------------------
def generate_store(
    system: System,
    path: str | os.PathLike,
    *,
    counts: dict[str, int],
    seed: int = 0,
    chunk: int = 256,
    method: str = DEFAULT_METHOD,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    noise: float = 0.0,
    progress: bool = True,
    client=None,
    batch: int | None = None,
) -> GenerateReport:
    """Simulate the splits of `counts` into a zarr store at `path`, resuming an interrupted run.

    Args:
        system: the system to integrate (its ranges, initial states and time grid).
        path: store directory or fsspec URL (``s3://bucket/x.zarr``); created, resumed (same
            arguments), or left alone when complete.
        counts: trajectories per split, e.g. ``{"train": 1024, "val": 128, ...}``.
        seed: dataset seed; split ``i`` samples from ``SeedSequence([seed, i])``.
        chunk: trajectories per zarr chunk of ``y`` (the unit of writing and of resuming).
        method, rtol, atol: integrator and tolerances passed to `simulate`.
        noise: observation noise σ as a fraction of each state's standard deviation over the
            train split, in [0, 1); with noise > 0 the store holds ``obs = y + σ·ε`` beside y.
        progress: show a tqdm bar on stderr over the chunks of all splits.
        client: a `dask.distributed.Client`: its workers integrate the chunks and write their
            regions, this process writes the skeleton, the marks and the final attributes
            (`cluster.py`). The bytes are those of the default, single-process path.
        batch: trajectories integrated at once, a whole number of chunks (rounded down, at
            least one chunk); memory is bounded by it. None: as many chunks as fit in
            `BATCH_BYTES` of output, at most `MAX_BATCH` trajectories. The bytes never depend
            on it.

    Raises:
        UserError: bad counts/chunk/seed/tolerances, or a vector field of the wrong shape.
        StoreError: `path` holds something else, or a store made with other arguments.
        DivergenceError: a trajectory is not finite; the store stays incomplete.
    """
    loc = location.parse(path)
    _check_arguments(counts, seed, chunk)
    if batch is not None and (not _is_int(batch) or batch < 1):
        raise UserError(f"batch must be a positive number of trajectories; got {batch!r}")
    check_noise(noise)
    _integrator_attrs(method, rtol, atol)  # validates the method and tolerances
    check_tolerances(rtol, atol)
    arguments = _arguments(system, counts, seed, chunk, method, rtol, atol, noise)
    runner = _runner(client, loc)
    first = next(iter(counts))
    _probe(system, _sample(system, seed, first, counts[first], 0, 1), method, rtol, atol)
    local = isinstance(loc, Path)
    if local:
        check_parent(loc)

    total = _n_chunks(counts, chunk)
    if _existing_state(loc, arguments) == "complete":
        return GenerateReport(loc, written=0, skipped=total, already_complete=True)
    # object storage: no lock (one generate per URL), no free-space figure to check
    with claim(loc) if local else contextlib.nullcontext():
        state = _existing_state(loc, arguments)  # again: another writer may have finished it
        if state == "complete":
            return GenerateReport(loc, written=0, skipped=total, already_complete=True)
        if state == "new" and local:
            check_disk_space(loc, system, counts, noise)
        if state == "new" or not (local or _skeleton_whole(loc, arguments)):
            _create(loc, system, arguments, seed)
        batch = integration_batch(system, chunk, batch)
        return _fill(loc, system, arguments, progress=progress, runner=runner, batch=batch)


def integration_batch(system: System, chunk: int, batch: int | None = None) -> int:
    """Trajectories integrated at once: `batch` (or, when None, what fits in `BATCH_BYTES` of
    float64 output, at most `MAX_BATCH`) rounded down to whole chunks, never below one chunk.

    The batched integrator pays its per-step overhead once per batch, not once per chunk: at
    the default chunk of 256, `warp-phys generate lorenz63 --n-train 4096` integrates its 4,480
    trajectories (all four splits) in one batch (benchmarks/results/generate_cli.md)."""
    if batch is None:
        per_trajectory = len(system.times()) * system.state_dim * 8
        batch = min(MAX_BATCH, BATCH_BYTES // per_trajectory)
    return max(chunk, batch // chunk * chunk)


def _runner(client, loc):
    """Where the chunk tasks run: this process, or the workers of a dask `client`."""
    if client is None:
        return InProcess()
    if isinstance(loc, location.RemotePath) and loc.protocol == "memory":
        raise UserError(
            f"{loc} lives in this process's memory, which dask workers cannot reach; write to "
            f"a local path, a shared disk or object storage (s3://...) instead"
        )
    return OnDask(client)


def _fill(
    loc, system: System, arguments: dict, *, progress: bool, runner, batch: int
) -> GenerateReport:
    """Integrate and write every chunk not marked done, then the noise, then finalise.

    Tasks (`_write_chunks`, `_write_noise`, `_block_sums`) run in this process or on dask
    workers and write only their own chunks' region; a `_write_chunks` task integrates up to
    `batch` trajectories at once, from consecutive chunks of one split or several. The marks
    are written here, after the task's data: a chunk is marked done only once its data is in
    the store."""
    counts, chunk, noise = arguments["counts"], arguments["chunk"], arguments.get("noise", 0.0)
    total = _n_chunks(counts, chunk)
    target = location.absolute(loc)  # what a worker opens: the same place from anywhere
    # workers rebuild the system from their registry, with this process's plugin folders
    own = system if runner.in_process else tuple(str(p.resolve()) for p in plugin_folders())
    root = zarr.open_group(location.zarr_target(loc), mode="r+")

    undone = {split: np.flatnonzero(root[_PROGRESS][split]["done"][:] == 0) for split in counts}
    todo = [(target, task, own) for task in _tasks(undone, counts, chunk, batch)]
    noisy = [
        (target, split, int(k))
        for split in (counts if noise else ())
        for k in np.flatnonzero(root[_PROGRESS][split]["obs_done"][:] == 0)
    ]
    left = sum(len(ks) for ks in undone.values()) + len(noisy)
    total *= 2 if noise else 1
    opts = dict(total=total, initial=total - left, unit="chunk", desc=f"generate {system.name}")
    with tqdm(**opts, file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for finished in runner.run(_write_chunks, todo):
            done = [mark for _, marks in finished for mark in marks]
            _mark(root, "done", done)
            bar.set_postfix_str(done[-1][0])
            bar.update(len(done))
        if noise:
            split0 = _splits(root)[0]
            sigma = noise * train_std(root, split0, target=target, runner=runner)  # (S,)
            tasks = [(target, split, k, sigma) for target, split, k in noisy]
            for batch in runner.run(_write_noise, tasks):
                _mark(root, "obs_done", [(item[1], item[2], None) for item, _ in batch])
                bar.set_postfix_str(f"{batch[-1][0][1]} noise")
                bar.update(len(batch))
            for split in counts:
                root[split].attrs["noise_std"] = dict(
                    zip(system.state, map(float, sigma), strict=True)
                )
    _finalize(loc)
    return GenerateReport(loc, written=left, skipped=total - left, already_complete=False)


Segment = tuple[str, tuple[int, ...]]  # (split, consecutive chunk numbers)


def _tasks(
    undone: dict[str, np.ndarray], counts: dict[str, int], chunk: int, batch: int
) -> list[tuple[Segment, ...]]:
    """Group the undone chunks, in store order, into tasks of at most `batch` trajectories
    (at least one chunk each); a task is segments of consecutive chunks of one split each."""
    tasks: list[list[list]] = []
    size = batch + 1  # trajectories in the last task: none open yet
    for split, ks in undone.items():
        for k in map(int, ks):
            n = min(chunk, counts[split] - k * chunk)
            if size + n > batch:
                tasks.append([])
                size = 0
            segments = tasks[-1]
            if segments and segments[-1][0] == split and segments[-1][1][-1] == k - 1:
                segments[-1][1].append(k)
            else:
                segments.append([split, [k]])
            size += n
    return [tuple((split, tuple(ks)) for split, ks in task) for task in tasks]


def _check_arguments(counts: dict[str, int], seed: int, chunk: int) -> None:
    if not isinstance(counts, dict) or not counts:
        raise UserError(
            f"counts must map split names {list(SPLITS)} to trajectory counts; got {counts!r}"
        )
    for split, n in counts.items():
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} in counts; splits are {', '.join(SPLITS)}")
        if not _is_int(n) or n < 1:
            flag = "--n-" + split.replace("_", "-")
            raise UserError(
                f"count of split {split!r} must be a positive integer; got {n!r} "
                f"(set {flag} to at least 1)"
            )
    if not _is_int(chunk) or chunk < 1:
        raise UserError(
            f"chunk must be a positive number of trajectories; got {chunk!r} (e.g. --chunk 256)"
        )
    if not _is_int(seed) or seed < 0:
        raise UserError(f"seed must be a non-negative integer; got {seed!r}")


def check_noise(noise: float) -> None:
    """Raise UserError unless `noise` is a number in [0, 1) (a fraction of the state's std)."""
    ok = isinstance(noise, int | float | np.floating) and not isinstance(noise, bool)
    if not ok or not 0.0 <= float(noise) < 1.0:
        raise UserError(
            f"noise is the observation noise as a fraction of each state's standard deviation "
            f"and must lie in [0, 1); got {noise!r} (e.g. --noise 0.05 for 5%)"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _arguments(system: System, counts, seed, chunk, method, rtol, atol, noise=0.0) -> dict:
    """Everything that fixes the bytes of a store, as JSON (compared on resume).

    `noise` appears only when positive, so stores without noise keep their arguments."""
    args = {
        "system": system.name,
        "description": system.describe(),
        "counts": {s: int(counts[s]) for s in SPLITS if s in counts},
        "seed": int(seed),
        "chunk": int(chunk),
        "method": method,
        "rtol": float(rtol),
        "atol": float(atol),
    }
    if noise:
        args["noise"] = float(noise)
    return json.loads(json.dumps(args))  # tuples -> lists, as they come back from zarr


def _sample(
    system: System, seed: int, split: str, n: int, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows lo:hi of a split's parameters ``(n, P)`` and initial states ``(n, S)``, float64.

    Bitwise the rows of ``system.sample(default_rng(SeedSequence([seed, split index])), n)``:
    the draw of stores of format 1, made block by block."""

    def stream(skip: int) -> np.random.Generator:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split)]))
        rng.bit_generator.advance(skip)  # PCG64: one step per float64 uniform
        return rng

    params, y0 = system.sample_rows(stream, n, split, lo, hi)
    return np.ascontiguousarray(params, np.float64), np.ascontiguousarray(y0, np.float64)


def _probe(system: System, sample, method: str, rtol: float, atol: float) -> None:
    """Integrate one trajectory over one step: a bad vector field fails before any write."""
    params, y0 = (torch.from_numpy(a[:1]) for a in sample)  # (1, P), (1, S)
    simulate(system, y0, params, system.times()[:2], method=method, rtol=rtol, atol=atol)


def _n_chunks(counts: dict[str, int], chunk: int) -> int:
    return sum(-(-n // chunk) for n in counts.values())


def _existing_state(path, arguments: dict) -> str:
    """Return "new" (nothing there), "resume" or "complete" for a store made with `arguments`."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "new"
    root = _open_root(path, writing=True)
    stored = root.attrs["warp_phys"].get("arguments")
    if stored != arguments:
        state = "a complete" if root.attrs.get("complete") is True else "an incomplete"
        raise StoreError(
            f"{path} holds {state} store generated with other arguments "
            f"({_diff(stored, arguments)}); "
            f"pick another --out, or delete {path} to regenerate it"
        )
    if root.attrs.get("complete") is True:
        log.info("%s is already complete with these arguments; nothing to do", path)
        return "complete"
    log.info("resuming %s", path)
    return "resume"


def _diff(stored, wanted: dict) -> str:
    if not isinstance(stored, dict):
        return "unknown arguments"
    keys = [k for k in wanted if stored.get(k) != wanted[k]]
    if keys == ["description"]:  # the system's declaration changed: name the entries
        old, new = stored["description"], wanted["description"]
        return ", ".join(f"description.{k}" for k in new if old.get(k) != new[k])
    shown = [k for k in keys if k != "description"]
    return "; ".join(f"{k}: stored {stored.get(k)!r}, asked {wanted[k]!r}" for k in shown)


def _create(loc, system: System, arguments: dict, seed: int) -> None:
    """Write the skeleton (coordinates, params, y0, empty y, marks).

    A local store is written beside `loc` and moved there in one rename, so a kill leaves
    either no store or a whole skeleton. Object storage has no rename: the skeleton is written
    in place, the root metadata (with the arguments) first, and a resume that finds it cut
    short (`_skeleton_whole`) writes it again."""
    from warp_phys import __version__

    meta = {"format": FORMAT, "version": __version__, "arguments": arguments}
    attrs = {"warp_phys": meta, "system": system.name, "complete": False}
    if not isinstance(loc, Path):
        loc.remove()
        _write_skeleton(loc.zarr_store(), attrs, system, arguments, seed)
        return
    loc.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.parent / f".{loc.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        _write_skeleton(tmp, attrs, system, arguments, seed)
        if loc.exists():
            loc.rmdir()  # only ever an empty directory here (checked by the caller)
        os.rename(tmp, loc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_skeleton(target, attrs: dict, system: System, arguments: dict, seed: int) -> None:
    root = zarr.open_group(target, mode="w-", zarr_format=3, attributes=attrs)
    progress = root.create_group(_PROGRESS)
    for split, n in arguments["counts"].items():
        _create_split(root.create_group(split), system, split, arguments, n, seed)
        n_chunks = -(-n // arguments["chunk"])
        noisy = bool(arguments.get("noise"))
        _create_marks(progress.create_group(split), n_chunks, system.state_dim, noisy)


def _skeleton_whole(loc, arguments: dict) -> bool:
    """Whether the skeleton written in place on object storage was finished (`_create`)."""
    from warp_phys.integrity import declared_shapes

    try:
        root = zarr.open_group(location.zarr_target(loc), mode="r")
        marks = ("done", "y_min", "y_max") + (("obs_done",) if arguments.get("noise") else ())
        for split in arguments["counts"]:
            group = root[split]
            if "split" not in group.attrs:  # the split's attributes are written last
                return False
            shapes = declared_shapes(root, split)
            if set(shapes) - set(group.array_keys()):
                return False
            if any(group[v].nchunks_initialized < group[v].nchunks for v in ("params", "y0")):
                return False
            if set(marks) - set(root[_PROGRESS][split].array_keys()):
                return False
    except (KeyError, FileNotFoundError):
        return False
    return True


def _array(group, name, data=None, *, shape=None, dtype="f8", dims, chunks=None, fill=np.nan):
    shape = data.shape if data is not None else shape
    kwargs = {"fill_value": fill} if dtype is not str else {}
    # zstd as zarr's default, then a CRC-32C of the compressed bytes: a damaged chunk is an
    # error when it is read
    codecs = (zarr.codecs.ZstdCodec(level=0, checksum=False), zarr.codecs.Crc32cCodec())
    arr = group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks or shape,
        dimension_names=dims,
        compressors=codecs,
        **kwargs,
    )
    if data is not None:
        arr[...] = data
    return arr


def _create_split(group, system: System, split: str, arguments: dict, n: int, seed: int) -> None:
    ts, S, P = system.times().numpy(), system.state_dim, len(system.param_names)
    small = min(n, _SMALL_CHUNK)
    for dim, names in (("state", system.state), ("parameter", system.param_names)):
        _array(group, dim, np.array(names, dtype=object), dtype=str, dims=(dim,))
    traj = _array(
        group, "trajectory", shape=(n,), dtype="i8", dims=("trajectory",), chunks=(small,), fill=-1
    )
    _array(group, "time", ts, dims=("time",))
    dims = ("trajectory", "parameter")
    params = _array(group, "params", shape=(n, P), dims=dims, chunks=(small, P))
    y0 = _array(group, "y0", shape=(n, S), dims=("trajectory", "state"), chunks=(small, S))
    for lo in range(0, n, small):  # one zarr chunk at a time: memory bounded by the block
        hi = min(lo + small, n)
        traj[lo:hi] = np.arange(lo, hi, dtype=np.int64)
        params[lo:hi], y0[lo:hi] = _sample(system, seed, split, n, lo, hi)
    chunks = (min(n, arguments["chunk"]), len(ts), S)
    _array(group, "y", shape=(n, len(ts), S), dims=("trajectory", "time", "state"), chunks=chunks)
    if arguments.get("noise"):
        dims = ("trajectory", "time", "state")
        _array(group, "obs", shape=(n, len(ts), S), dims=dims, chunks=chunks)
    group.update_attributes(_split_attrs(system, split, arguments))  # one write, not one a key


def _split_attrs(system: System, split: str, arguments: dict) -> dict:
    """The attributes of a split group: the system, this split's ranges, integrator, seed."""
    from warp_phys import __version__

    attrs = {
        **system.describe(),
        "split": split,
        "ranges": system.ranges(split),
        "y0_distribution": system.initial_states(split).describe(),
        "latex": system.latex(),
        **_integrator_attrs(arguments["method"], arguments["rtol"], arguments["atol"]),
        "seed": arguments["seed"],
        "counts": arguments["counts"],
        "chunk": arguments["chunk"],
        "noise": arguments.get("noise", 0.0),
        "warp_phys_version": __version__,
    }
    return json.loads(json.dumps(attrs))  # tuples -> lists, as zarr gives them back


def _integrator_attrs(method: str, rtol: float, atol: float) -> dict:
    """The integrator's record for the store (`simulate.integrator_attrs`, which validates)."""
    return simulate_module.integrator_attrs(method, rtol, atol)


def _create_marks(group, n_chunks: int, state_dim: int, noisy: bool = False) -> None:
    per_file = min(n_chunks, _MARKS_PER_FILE)
    for name in ("done", "obs_done") if noisy else ("done",):
        _array(
            group, name, shape=(n_chunks,), dtype="u1", dims=("chunk",), chunks=(per_file,), fill=0
        )
    shape, chunks = (n_chunks, state_dim), (per_file, state_dim)
    for name in ("y_min", "y_max"):
        _array(group, name, shape=shape, dims=("chunk", "state"), chunks=chunks)


def _write_chunks(
    target: str, segments: tuple[Segment, ...], system: System | tuple[str, ...]
) -> list[tuple[str, int, tuple[np.ndarray, np.ndarray]]]:
    """Integrate the chunks of `segments` at once into the store at `target`; return each
    chunk's ``(split, k, (y_min, y_max))`` per state for the marks. A task: it runs here or on
    a dask worker (`cluster.py`), which is given plugin folders instead of the system and
    rebuilds it from its registry, checked against the store's. The integrator steps every
    trajectory on its own, so the bytes do not depend on which chunks share a task."""
    root = zarr.open_group(location.zarr_target(target), mode="r+")
    args = root.attrs["warp_phys"]["arguments"]
    chunk = args["chunk"]
    on_worker = not isinstance(system, System)
    system = _worker_system(target, root, system) if on_worker else system
    spans = []  # (split, lo, hi) of each segment
    for split, ks in segments:
        n = root[split]["y"].shape[0]
        spans.append((split, ks[0] * chunk, min((ks[-1] + 1) * chunk, n)))
    params = np.concatenate([root[s]["params"][lo:hi] for s, lo, hi in spans])  # (B, P)
    y0 = np.concatenate([root[s]["y0"][lo:hi] for s, lo, hi in spans])  # (B, S)
    try:
        ys = _integrate(system, args, y0, params, spans[0][1], on_worker)  # (B, T, S)
    except UserError as err:
        split, fault = _at_fault(system, args, root, spans, on_worker) or (spans[0][0], err)
        raise type(fault)(
            f"split {split!r}: {fault} (the store at {target} stays incomplete)"
        ) from None
    marks, at = [], 0
    for (split, lo, hi), (_, ks) in zip(spans, segments, strict=True):
        part = ys[at : at + hi - lo]
        root[split]["y"][lo:hi] = part
        for k in ks:
            block = part[k * chunk - lo : (k + 1) * chunk - lo]
            marks.append((split, k, _value_range(block)))
        at += hi - lo
    return marks


def _value_range(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-state ``(min, max)`` of ``block (n, T, S)``: torch reduces the (n·T, S) rows in one
    pass, where numpy's reduction over the leading axes is ten times slower (0.3 s of a
    4,096-trajectory Lorenz-63 store)."""
    lo, hi = torch.aminmax(torch.from_numpy(block).reshape(-1, block.shape[-1]), dim=0)
    return lo.numpy(), hi.numpy()


def _at_fault(system: System, args: dict, root, spans, on_worker: bool):
    """``(split, error)`` of the first segment of a failed batch that fails on its own (its
    error names the trajectory's index in its split), or None for a one-segment batch."""
    if len(spans) == 1:
        return None
    for split, lo, hi in spans:
        try:
            _integrate(system, args, root[split]["y0"][lo:hi], root[split]["params"][lo:hi], lo,
                       on_worker)  # fmt: skip
        except UserError as err:
            return split, err
    return None


def _integrate(system: System, args: dict, y0, params, offset: int, on_worker: bool):
    """`simulate` with the store's integrator on numpy inputs; the trajectories as numpy."""
    ys = simulate(
        system, torch.from_numpy(y0), torch.from_numpy(params), system.times(),
        method=args["method"], rtol=args["rtol"], atol=args["atol"], index_offset=offset,
        workers=1 if on_worker else None,  # never fork inside a dask worker
    )  # fmt: skip
    return ys.numpy()


_SYSTEMS: dict[tuple[str, str], System] = {}  # per worker process: the system of each store


def _worker_system(target: str, root, plugins: tuple[str, ...]) -> System:
    """The registered system of the store at `target`, as `integrity.store_system` checks it:
    a worker whose registry differs from the client's is an error, never other bytes."""
    from warp_phys.integrity import store_system

    for folder in plugins:
        add_plugin_folder(folder)
    key = (target, json.dumps(root.attrs["warp_phys"]["arguments"], sort_keys=True))
    if key not in _SYSTEMS:
        _SYSTEMS[key] = store_system(target, root, _splits(root))
    return _SYSTEMS[key]


def _mark(root, name: str, done: list[tuple[str, int, tuple | None]]) -> None:
    """Mark chunks done (`name` is done or obs_done): ``[(split, k, (y_min, y_max) or None)]``.

    The value ranges are written first and the marks last, one write per marks file."""
    for split in dict.fromkeys(split for split, _, _ in done):
        mine = [(k, r) for s, k, r in done if s == split]
        ks = np.array([k for k, _ in mine])
        marks = root[_PROGRESS][split]
        if mine[0][1] is not None:
            marks["y_min"].oindex[ks, :] = np.stack([r[0] for _, r in mine])  # (n, S)
            marks["y_max"].oindex[ks, :] = np.stack([r[1] for _, r in mine])
        marks[name].oindex[ks] = 1


def train_std(root, split: str, *, target: str | None = None, runner=None) -> np.ndarray:
    """Per-state standard deviation of a split's clean y over (trajectory, time), ``(S,)``.

    Read in fixed blocks of `_STD_BLOCK` trajectories (never the store's chunk), two passes in
    float64: the same bytes whatever chunk the store was written with, and whether the blocks
    were summed here or on dask workers (`runner`; each block's sum is the same numpy call).
    """
    y = root[split]["y"]
    n = y.shape[0]
    count = n * y.shape[1]
    runner = runner or InProcess()
    target = target or root
    blocks = [(target, split, lo, min(lo + _STD_BLOCK, n)) for lo in range(0, n, _STD_BLOCK)]

    def total(mean) -> np.ndarray:
        sums = {}
        for batch in runner.run(_block_sums, [(*b, mean) for b in blocks]):
            sums.update((item[2], value) for item, value in batch)
        return sum(sums[lo] for _, _, lo, _ in blocks)  # in block order: fixed rounding

    mean = total(None) / count  # (S,)
    return np.sqrt(total(mean) / count)


def _block_sums(target, split: str, lo: int, hi: int, mean: np.ndarray | None) -> np.ndarray:
    """Σ y over trajectories lo:hi and time, or Σ (y - mean)² when `mean` is given, ``(S,)``."""
    root = (
        target
        if isinstance(target, zarr.Group)
        else zarr.open_group(location.zarr_target(target), mode="r")
    )
    y = root[split]["y"][lo:hi]  # (B, T, S)
    return y.sum(axis=(0, 1)) if mean is None else ((y - mean) ** 2).sum(axis=(0, 1))


def trajectory_noise(seed: int, split: str, index: int, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal noise ``(T, S)`` of trajectory `index` of `split`: its own stream."""
    seq = np.random.SeedSequence([int(seed), SPLITS.index(split), NOISE_STREAM, int(index)])
    return np.random.default_rng(seq).standard_normal(shape)


def _write_noise(target: str, split: str, k: int, sigma: np.ndarray) -> None:
    """Write obs = y + σ·ε for chunk `k` of `split` (a task, like `_write_chunks`)."""
    root = zarr.open_group(location.zarr_target(target), mode="r+")
    args = root.attrs["warp_phys"]["arguments"]
    chunk, seed, group = args["chunk"], args["seed"], root[split]
    lo, hi = k * chunk, min((k + 1) * chunk, group["y"].shape[0])
    y = group["y"][lo:hi]  # (B, T, S)
    eps = np.stack([trajectory_noise(seed, split, i, y.shape[1:]) for i in range(lo, hi)])
    group["obs"][lo:hi] = y + sigma * eps


def _finalize(loc) -> None:
    """Record value ranges, consolidate metadata, then (last) mark the store complete."""
    target = location.zarr_target(loc)
    root = zarr.open_group(target, mode="r+")
    for split in _splits(root):
        marks = root[_PROGRESS][split]
        lo, hi = marks["y_min"][:].min(axis=0), marks["y_max"][:].max(axis=0)  # (S,)
        state = root[split].attrs["state"]
        root[split].attrs["value_range"] = {
            s: [float(a), float(b)] for s, a, b in zip(state, lo, hi, strict=True)
        }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(target)
    zarr.open_group(target, mode="r+").attrs["complete"] = True


# -- reading ----------------------------------------------------------------------------------
def _open_root(path, *, writing: bool = False):
    """Open the root group of one of our stores (any state), or raise StoreError."""
    path = location.parse(path)
    if not path.exists():
        raise StoreError(
            f"no store at {path}; create it with `warp-phys generate SYSTEM --out {path}`"
        )
    try:
        root = zarr.open_group(location.zarr_target(path, read_only=True), mode="r")
        ours = isinstance(root.attrs.get("warp_phys"), dict)
    except UserError:
        raise
    except Exception as err:  # unreadable metadata, not a zarr group, not a directory
        if path.is_dir() and (path / "zarr.json").is_file():
            raise StoreError(
                f"store {path} has damaged metadata ({type(err).__name__}); regenerate it or "
                f"restore a copy"
            ) from None
        ours = False
    if ours and not _well_formed(root.attrs["warp_phys"]):
        raise StoreError(
            f"store {path} has damaged metadata (its generation arguments are incomplete); "
            f"regenerate it or restore a copy"
        )
    if not ours and writing:
        raise StoreError(
            f"{path} exists and is not a warp-phys store; refusing to write into it: "
            f"pick another --out"
        )
    if not ours:
        raise StoreError(f"{path} is not a warp-phys store (no generate metadata); check the path")
    return root


def _well_formed(meta: dict) -> bool:
    args = meta.get("arguments")
    return (
        isinstance(args, dict)
        and isinstance(args.get("counts"), dict)
        and isinstance(args.get("description"), dict)
        and all(k in args for k in ("system", "seed", "chunk", "method", "rtol", "atol"))
    )


def _splits(root) -> list[str]:
    return [s for s in SPLITS if s in root.attrs["warp_phys"]["arguments"]["counts"]]


def is_complete(path: str | os.PathLike) -> bool:
    """Return True only for a fully written warp-phys store."""
    try:
        return _open_root(path).attrs.get("complete") is True
    except StoreError:
        return False


def _open_complete(path):
    root = _open_root(path)
    if root.attrs.get("complete") is not True:
        with reading(path, "its progress marks"):
            marks = [root[_PROGRESS][s]["done"][:] for s in _splits(root)]
        done, total = sum(int(m.sum()) for m in marks), sum(m.size for m in marks)
        args = root.attrs["warp_phys"]["arguments"]
        raise StoreError(
            f"store {path} is incomplete ({done}/{total} chunks written; generation was "
            f"interrupted or failed): resume it with `{_command(path, args)}`, or delete it"
        )
    return root


def _command(path, args: dict) -> str:
    """The `warp-phys generate` command that (re)creates a store with `args`."""
    parts = ["warp-phys generate", args["system"], f"--out {path}"]
    parts += [f"--n-{s.replace('_', '-')} {n}" for s, n in args["counts"].items()]
    parts += [f"--seed {args['seed']}", f"--chunk {args['chunk']}"]
    parts += [f"--rtol {args['rtol']:g}", f"--atol {args['atol']:g}"]
    parts += [f"--noise {args['noise']:g}"] if args.get("noise") else []
    try:
        from warp_phys.system import get_system

        default = get_system(args["system"]).describe()
    except UserError:
        default = {}
    for flag, key in (("--range", "ranges_train"), ("--ood-range", "ranges_test_ood")):
        for name, (lo, hi) in args["description"].get(key, {}).items():
            if default.get(key, {}).get(name) != [lo, hi]:
                parts.append(f"{flag} {name}={lo:g},{hi:g}")
    return " ".join(parts)


def open_split(path: str | os.PathLike, split: str) -> xarray.Dataset:
    """Open one split of a complete store as a lazily loaded `xarray.Dataset`."""
    path = location.parse(path)
    root = _open_complete(path)
    if split not in _splits(root):
        raise StoreError(
            f"store {path} has no split {split!r}; its splits are {', '.join(_splits(root))}"
        )
    check_shapes(path, root, split)
    check_chunks_present(path, root, split)
    with reading(path, f"split {split}"):
        target = location.zarr_target(path, read_only=True)
        import xarray  # only here: 0.7 s of import that `generate` does not need

        return xarray.open_zarr(target, group=split, consolidated=True)


def to_xarray(path: str | os.PathLike) -> xarray.DataTree:
    """Open every split of a complete store as one `xarray.DataTree` (a node per split)."""
    root = _open_complete(path)
    import xarray

    tree = xarray.DataTree.from_dict({s: open_split(path, s) for s in _splits(root)})
    tree.attrs.update(dict(root.attrs))
    return tree


def store_info(path: str | os.PathLike) -> dict:
    """Summarise a complete store from its metadata (no data is read)."""
    path = location.parse(path)
    root = _open_complete(path)
    with reading(path, "its metadata"):
        return _info(path, root)


def _info(path, root) -> dict:
    meta = root.attrs["warp_phys"]
    args = meta["arguments"]
    first = root[_splits(root)[0]]
    splits = {
        s: {
            "shape": list(root[s]["y"].shape),
            "value_range": root[s].attrs["value_range"],
            "ranges": root[s].attrs["ranges"],
        }
        for s in _splits(root)
    }
    times = first["time"][:]
    return {
        "path": str(path),
        "system": args["system"],
        "noise": args.get("noise", 0.0),
        "equations": first.attrs["equations"],
        "state": list(first.attrs["state"]),
        "parameter": list(first["parameter"][:]),
        "time": {"start": float(times[0]), "stop": float(times[-1]), "n": int(times.size)},
        "seed": args["seed"],
        "chunk": args["chunk"],
        "integrator": _integrator_attrs(args["method"], args["rtol"], args["atol"]),
        "version": meta["version"],
        "splits": splits,
    }
