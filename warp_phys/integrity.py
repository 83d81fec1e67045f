"""A store is what it says: declared shapes, its own system, finite values in their ranges.

What is checked, and where:
- opening a split (`check_shapes`): every array has the shape the generation arguments
  declare (a metadata edit would otherwise truncate or misalign the data silently);
- loading for training or evaluation (`store_system`, `check_rows`): the system labels agree
  and match the registered system's declaration (a relabelled store is refused); y, obs,
  params and y0 are finite; y stays within the value range recorded when it was written (a
  flipped exponent bit gives a finite 1e307); y at t0 equals y0; every parameter lies in its
  split's declared range and is positive where the system declares it so;
- `check_metadata` (``warp-phys info``): what needs no data read: the labels and declaration,
  the shapes, every chunk file present;
- `verify_store` (``warp-phys info --verify``): all of it, chunk by chunk over every array, with
  the CRC-32C of every chunk checked by zarr as it is read;
- `fingerprint`: a cheap identity of a store's content for the run directories that use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from warp_phys import location
from warp_phys.errors import StoreError, UserError
from warp_phys.system import System, get_system

# description entries that define the data (units and citation are free text)
DEFINING = (
    "state", "equations", "params_default", "ranges_train", "ranges_test_ood", "y0",
    "y0_test_ood", "t_span", "n_steps",
)  # fmt: skip
ARRAYS = ("state", "parameter", "trajectory", "time", "params", "y0", "y", "obs")
# a sampled parameter is low + (high - low) u with u in [0, 1): within its range up to the
# rounding of that product and sum, a few units in the last place of the bounds
RANGE_ULPS = 4


def _fix(path: Path) -> str:
    return (
        f"`warp-phys info --verify {path}` checks every chunk; regenerate the store or restore "
        f"a copy"
    )


def _damaged(path: Path, what: str) -> str:
    return f"store {path} is damaged: {what}; {_fix(path)}"


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn a failure to read or decode part of a store into one StoreError naming it."""
    try:
        yield
    except (UserError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - codec, metadata and I/O errors of a damaged store
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise StoreError(
            f"store {path} is damaged: reading {what} failed ({type(err).__name__}: {reason}); "
            f"{_fix(path)}"
        ) from None


def declared_shapes(root, split: str) -> dict[str, tuple[int, ...]]:
    """The shape of every array of `split`, from the generation arguments."""
    args = root.attrs["warp_phys"]["arguments"]
    desc = args["description"]
    n, T = int(args["counts"][split]), int(desc["n_steps"])
    S, P = len(desc["state"]), len(desc["params_default"])
    shapes = {
        "state": (S,), "parameter": (P,), "trajectory": (n,), "time": (T,),
        "params": (n, P), "y0": (n, S), "y": (n, T, S),
    }  # fmt: skip
    if args.get("noise"):
        shapes["obs"] = (n, T, S)
    return shapes


def check_shapes(path: Path, root, split: str) -> None:
    """Raise StoreError when an array of `split` is missing or not of its declared shape."""
    with reading(path, f"the metadata of {split}"):
        shapes = declared_shapes(root, split)
        group = root[split]
        names = set(group.array_keys())
    for var, shape in shapes.items():
        if var not in names:
            raise StoreError(f"store {path} is damaged: {split}/{var} is missing; {_fix(path)}")
        got = tuple(group[var].shape)
        if got != shape:
            raise StoreError(
                f"store {path} is damaged: {split}/{var} has shape {got} but the store declares "
                f"{shape}; its metadata was edited: {_fix(path)}"
            )


def check_chunks_present(path: Path, root, split: str) -> None:
    """Raise StoreError when chunk files of the data are missing (a partial copy of a store)."""
    for var in ("y", "params", "y0", "obs"):
        if var == "obs" and "obs" not in declared_shapes(root, split):
            continue
        with reading(path, f"the chunk list of {split}/{var}"):
            arr = root[split][var]
            done, total = arr.nchunks_initialized, arr.nchunks
        if done < total:
            raise StoreError(
                f"store {path} is truncated: {split}/{var} has {done} of {total} chunk files; "
                f"copy it again, or delete it and generate it again"
            )


def store_system(path: Path, root, splits: list[str]) -> System:
    """Return the registered system that made the store, with the store's parameter ranges.

    Raises StoreError when the labels disagree, the system is not registered here, or its
    declaration (equations, state, ranges, initial states, time grid) differs from the one
    stored: a relabelled store, or a system changed since the store was made."""
    with reading(path, "the store's attributes"):
        args = root.attrs["warp_phys"]["arguments"]
        desc = args["description"]
        labels = {root.attrs.get("system"), args.get("system"), desc.get("system")}
        labels |= {root[s].attrs.get("system") for s in splits}
    if len(labels) != 1:
        raise StoreError(
            f"store {path} names more than one system ({', '.join(sorted(map(str, labels)))}): "
            f"its attributes were edited; regenerate it"
        )
    name = labels.pop()
    try:
        base = get_system(name)
        registered = base.describe()
        system = get_system(
            name,
            train_ranges=_changed(desc.get("ranges_train"), registered["ranges_train"]),
            test_ranges=_changed(desc.get("ranges_test_ood"), registered["ranges_test_ood"]),
        )
    except (ValueError, TypeError) as err:  # UserError included: unknown name, bad ranges
        raise StoreError(
            f"store {path} was made by system {name!r}, which cannot be used here: {err}"
        ) from None
    mine = json.loads(json.dumps(system.describe()))
    for where, stored in [("", desc)] + [(f"{s}/", _split_desc(root, s)) for s in splits]:
        diff = [k for k in DEFINING if stored.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise StoreError(
                f"store {path} says system {name!r} but its {where}{', '.join(diff)} differ from "
                f"the registered {name!r} (stored {k} {stored.get(k)!r}, registered {mine[k]!r}): "
                f"it was relabelled, or {name!r} changed since; regenerate it with `warp-phys "
                f"generate {name}`"
            )
    return system


def _split_desc(root, split: str) -> dict:
    attrs = dict(root[split].attrs)
    return {k: attrs.get(k) for k in DEFINING}


def _changed(stored, registered: dict) -> dict:
    """The ranges of `stored` that differ from the registered ones (the generate --range's)."""
    if not isinstance(stored, dict):
        return {}
    return {k: tuple(v) for k, v in stored.items() if registered.get(k) != list(v)}


def check_rows(
    path: Path, split: str, rows: dict[str, np.ndarray], lo: int, attrs: dict, system: System
) -> None:
    """Raise StoreError for the first trajectory of `rows` (from trajectory `lo` on) that is not
    what the store declares: `rows` maps y, obs, params, y0 to float64 blocks of trajectories."""
    for var, block in rows.items():
        bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)  # (B,)
        if bad.any():
            raise StoreError(
                f"store {path} is damaged: {split}/{var} of trajectory {lo + int(np.argmax(bad))} "
                f"is not finite; {_fix(path)}"
            )
    if "y" in rows:
        _check_value_range(path, split, rows["y"], lo, attrs, system)
        if "y0" in rows and not np.array_equal(rows["y"][:, 0], rows["y0"]):
            i = lo + int(np.argmax((rows["y"][:, 0] != rows["y0"]).any(axis=1)))
            raise StoreError(
                f"store {path} is damaged: {split}/y of trajectory {i} does not start at its "
                f"y0; {_fix(path)}"
            )
    if "params" in rows:
        _check_params(path, split, rows["params"], lo, attrs, system)


def _check_value_range(path, split, y: np.ndarray, lo: int, attrs: dict, system: System) -> None:
    """y against the per-state range recorded from the same float64 values when it was written."""
    recorded = attrs["value_range"]
    low = np.array([recorded[s][0] for s in system.state])  # (S,)
    high = np.array([recorded[s][1] for s in system.state])
    outside = (y < low) | (y > high)  # (B, T, S)
    if outside.any():
        b, t, s = (int(i[0]) for i in np.nonzero(outside))
        raise StoreError(
            f"store {path} is damaged: {split}/y of trajectory {lo + b} reaches "
            f"{system.state[s]} = {y[b, t, s]:.6g} at step {t}, outside the range "
            f"[{low[s]:.6g}, {high[s]:.6g}] recorded when it was written; {_fix(path)}"
        )


def _check_params(path, split, params: np.ndarray, lo: int, attrs: dict, system: System) -> None:
    declared = get_system(system.name).params  # positivity as the system file declares it
    for j, name in enumerate(system.param_names):
        col = params[:, j]
        if declared[name].is_positive and (col <= 0).any():
            b = int(np.argmax(col <= 0))
            raise StoreError(
                f"store {path} is damaged: {split}/params of trajectory {lo + b} has {name} = "
                f"{col[b]:.6g}, but system {system.name!r} declares {name} > 0; {_fix(path)}"
            )
        low, high = attrs["ranges"][name]
        tol = RANGE_ULPS * np.finfo(np.float64).eps * max(abs(low), abs(high))
        outside = (col < low - tol) | (col > high + tol)
        if outside.any():
            b = int(np.argmax(outside))
            raise StoreError(
                f"store {path} is damaged: {split}/params of trajectory {lo + b} has {name} = "
                f"{col[b]:.6g}, outside its declared range [{low:.6g}, {high:.6g}]; {_fix(path)}"
            )


def check_metadata(path: str | os.PathLike) -> System:
    """The checks that read no data: complete, its own registered system, declared shapes,
    every chunk file present. Return the system; raise StoreError otherwise."""
    from warp_phys.store import _open_complete, _splits

    path = location.parse(path)
    root = _open_complete(path)
    system = store_system(path, root, _splits(root))
    for split in _splits(root):
        check_shapes(path, root, split)
        check_chunks_present(path, root, split)
    return system


def verify_store(path: str | os.PathLike) -> dict:
    """Read every chunk of every array of a complete store and check it (module docstring).

    Returns a summary: format, whether chunks carry checksums, arrays and trajectories read.
    Raises StoreError at the first problem, naming the split, the array and the trajectory.
    """
    from warp_phys.store import _open_complete, _splits

    path = location.parse(path)
    root = _open_complete(path)
    splits = _splits(root)
    system = store_system(path, root, splits)
    checksums, n_arrays, n_traj = True, 0, 0
    for split in splits:
        check_shapes(path, root, split)
        check_chunks_present(path, root, split)
        group, attrs = root[split], dict(root[split].attrs)
        present = [v for v in ARRAYS if v in set(group.array_keys())]
        checksums &= all(_has_crc(group[v]) for v in present)
        n_arrays += len(present)
        with reading(path, f"{split}/time and the coordinate names"):
            times = group["time"][:]
            names = [list(group["state"][:]), list(group["parameter"][:])]
        if not np.array_equal(times, system.times().numpy()):
            raise StoreError(_damaged(path, f"{split}/time is not the system's time grid"))
        if names != [list(system.state), list(system.param_names)]:
            raise StoreError(_damaged(path, f"{split} names its states and parameters {names}"))
        n, step = group["y"].shape[0], group["y"].chunks[0]
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            with reading(path, f"{split} trajectories {lo}-{hi - 1}"):
                rows = {v: group[v][lo:hi] for v in ("y", "obs", "params", "y0") if v in present}
                index = group["trajectory"][lo:hi]
            if not np.array_equal(index, np.arange(lo, hi)):
                raise StoreError(_damaged(path, f"{split}/trajectory is not 0..{n - 1}"))
            check_rows(path, split, rows, lo, attrs, system)
        n_traj += n
    meta = root.attrs["warp_phys"]
    return {
        "path": str(path),
        "format": meta.get("format"),
        "checksums": checksums,
        "arrays": n_arrays,
        "trajectories": n_traj,
    }


def _has_crc(arr) -> bool:
    return any(type(c).__name__ == "Crc32cCodec" for c in arr.metadata.codecs)


def fingerprint(path: str | os.PathLike) -> str:
    """Return ``sha256:<hex>`` identifying the content of a complete store, cheaply.

    Hashed: the generation arguments, the attributes and metadata (shape, chunks, dtype, codecs)
    of every array of every split, and for every chunk file its name, its size and its last
    four bytes. With the CRC-32C codec (format 2) those bytes are the checksum zarr computed
    over the whole chunk when it wrote it, so a store written again with other values (another
    seed, other ranges, a regenerated or replaced store) has another fingerprint, and computing
    it reads four bytes per chunk, never the data. It identifies what was written; damage
    after writing (a flipped bit leaves the stored checksum as it was) is caught when the chunk
    is read, by that checksum. (Format-1 stores have no checksum: their last bytes are the end
    of the compressed chunk, which other values usually but not always alter.)
    """
    from warp_phys.store import _open_complete, _splits

    path = location.parse(path)
    root = _open_complete(path)
    h = hashlib.sha256()
    with reading(path, "the store's metadata"):
        meta = {"arguments": root.attrs["warp_phys"]["arguments"], "splits": {}}
        for split in _splits(root):
            group = root[split]
            arrays = {k: group[k].metadata.to_dict() for k in sorted(group.array_keys())}
            meta["splits"][split] = {"attrs": dict(group.attrs), "arrays": arrays}
        h.update(json.dumps(meta, sort_keys=True, default=str).encode())
        for split in _splits(root):
            for var in sorted(root[split].array_keys()):
                for name, size, tail in _chunk_tails(path, f"{split}/{var}/c"):
                    h.update(f"{split}/{var}/{name}:{size}:".encode() + tail)
    return "sha256:" + h.hexdigest()


def _chunk_tails(path, under: str) -> Iterator[tuple[str, int, bytes]]:
    """(relative name, size, last four bytes) of every chunk file under `path`/`under`, sorted
    (the same for a store and its copy on object storage)."""
    if isinstance(path, location.RemotePath):
        yield from path.chunk_tails(under)
        return
    folder = path / under
    files = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            if ".partial" not in n:  # zarr's temporary file of an interrupted write
                files.append(Path(dirpath) / n)
    for f in sorted(files):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(size - 4, 0))
            yield f.relative_to(folder).as_posix(), size, fh.read()
