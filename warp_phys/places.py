"""Where a store is written: a folder (not a file) above it, room on the disk, one writer.

`claim` holds the lock file ``.NAME.lock`` beside a store while it is written: a second writer
of the same store fails at once with one line, and the kernel drops the lock when its holder
dies (even by SIGKILL), so no lock goes stale. Under the lock, what a killed writer left (a
skeleton ``.NAME.partial-*``, zarr's ``*.partial`` chunk files) is removed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from warp_phys.errors import StoreError
from warp_phys.system import System

try:
    import fcntl
except ImportError:  # not on POSIX: stores are written without the one-writer lock
    fcntl = None

log = logging.getLogger(__name__)
# zstd keeps 92-97% of the bytes of the float64 trajectories of every built-in system
# (measured), so a store whose raw size is over twice the free space cannot fit
MIN_STORED_FRACTION = 0.5


def check_parent(path: Path) -> None:
    """Raise StoreError when a file stands where a folder above `path` would have to be."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StoreError(
                    f"{parent} is a file, so {path} cannot be created under it; "
                    f"choose another --out"
                )
            return


@contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold the lock file ``.NAME.lock`` beside `path` while writing; a second writer fails fast.

    The kernel drops the lock when its holder dies (even by SIGKILL), so no lock goes stale; the
    file is removed on release, and a writer that locked a file already removed tries again."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise StoreError(
                f"another warp-phys process is writing {path} right now (it holds {lock}); "
                f"wait for it to finish, then run this command again"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited for removed that file: lock the new one
    try:
        for stale in _stale_partials(path):  # only a writer holding the lock makes these
            log.info("removing %s, left by an interrupted generate", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if path.is_dir():  # zarr's temporary chunk files, left by a kill in mid-write
            for f in path.rglob("*.partial"):
                f.unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _stale_partials(path: Path) -> list[Path]:
    prefix = f".{path.name}.partial-"
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))


def check_disk_space(path: Path, system: System, counts: dict[str, int], noise: float) -> None:
    """Raise StoreError when the store cannot fit on the disk of `path`, before writing."""
    free = shutil.disk_usage(path.parent).free
    T, S, P = system.n_steps, system.state_dim, len(system.param_names)
    per_trajectory = 8 * (T * S * (2 if noise else 1) + P + S)  # float64 y (and obs), params, y0
    n = sum(counts.values())
    raw = n * per_trajectory
    if raw * MIN_STORED_FRACTION > free:
        raise StoreError(
            f"the store would need about {_size(raw)} ({n} trajectories of {T} steps x {S} "
            f"states in float64) but {os.path.abspath(path.parent)} has {_size(free)} free; "
            f"lower the --n-* counts, or choose an --out on a larger disk"
        )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"
