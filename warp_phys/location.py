"""Where a store lives: a local folder (a `Path`) or an fsspec URL (`s3://`, `gs://`, `memory://`).

`parse` turns what a user gives (`--out`, `--data`, `data.path`) into one or the other. A plain
path and a ``file://`` URL are local folders and behave exactly as before: atomic skeleton
rename, the one-writer lock, the disk-room check (`places.py`). Any other URL is a
`RemotePath`: the few `Path` operations the stores need (exists, is_dir, is_file, /, name),
done through the URL's fsspec filesystem, whose credentials and endpoint come from that
filesystem's own configuration (environment variables such as ``AWS_PROFILE``, files such as
``~/.aws/credentials``, or fsspec's ``FSSPEC_<PROTOCOL>_<KEY>`` variables, e.g.
``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible server). Object storage has no rename of a
folder, no lock and no free-space figure: `store.py` says what it does there instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from warp_phys.errors import UserError

LOCAL_PROTOCOLS = ("file", "local")


def parse(where: str | os.PathLike | RemotePath) -> Path | RemotePath:
    """Return a local `Path` for a path or a ``file://`` URL, a `RemotePath` for any other URL."""
    if isinstance(where, RemotePath | Path):
        return where
    text = os.fspath(where)
    protocol, sep, rest = text.partition("://")
    if not sep:
        return Path(text)
    if protocol in LOCAL_PROTOCOLS:
        return Path(rest)
    return RemotePath(text)


def is_remote(where) -> bool:
    return isinstance(parse(where), RemotePath)


def absolute(where) -> str:
    """A name for `where` that means the same from any working directory (records, messages)."""
    loc = parse(where)
    return str(loc) if isinstance(loc, RemotePath) else str(loc.resolve())


def zarr_target(where, *, read_only: bool = False):
    """What `zarr.open_group` and `xarray.open_zarr` take for `where`: a Path or a store."""
    loc = parse(where)
    return loc.zarr_store(read_only=read_only) if isinstance(loc, RemotePath) else loc


class RemotePath:
    """A location in an fsspec filesystem, with the `Path` operations a store needs.

    The filesystem is made on first use; a protocol whose package is missing is a UserError
    naming the package to install.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self._fs = None

    # -- Path-like --------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self) -> dict:  # sent to dask workers and other ranks: not the filesystem
        return {"url": self.url, "protocol": self.protocol, "_fs": None}

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return self.fs.exists(self.url)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.url)

    def is_file(self) -> bool:
        return self.fs.isfile(self.url)

    def iterdir(self):
        return (RemotePath(f"{self.protocol}://{p}") for p in self.fs.ls(self.url, detail=False))

    # -- beyond Path ------------------------------------------------------------------------
    @property
    def fs(self):
        if self._fs is None:
            self._fs = filesystem(self.protocol, self.url)
        return self._fs

    def zarr_store(self, *, read_only: bool = False):
        """A `zarr.storage.FsspecStore` on this URL."""
        import zarr

        self.fs  # noqa: B018 - a missing package is one line naming it, before zarr tries
        return zarr.storage.FsspecStore.from_url(self.url, read_only=read_only)

    def remove(self) -> None:
        """Delete everything under this URL (a store cut short while its skeleton was made)."""
        if self.fs.exists(self.url):
            self.fs.rm(self.url, recursive=True)

    def chunk_tails(self, folder: str) -> list[tuple[str, int, bytes]]:
        """(relative name, size, last four bytes) of every object under `folder`, sorted."""
        base = self.fs._strip_protocol(f"{self.url}/{folder}").rstrip("/")
        if not self.fs.exists(base):
            return []
        found = self.fs.find(base, detail=True)
        names = sorted(found)
        sizes = [int(found[n]["size"]) for n in names]
        tails = self.fs.cat_ranges(names, [max(s - 4, 0) for s in sizes], sizes)
        return [(n[len(base) + 1 :], s, t) for n, s, t in zip(names, sizes, tails, strict=True)]


def filesystem(protocol: str, url: str):
    """The fsspec filesystem of `protocol`; UserError naming the package when it is missing."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:  # pragma: no cover - fsspec comes with torch
        raise UserError(f"{url} is a URL: reading it needs fsspec; pip install fsspec") from None
    try:
        return fsspec.filesystem(protocol)
    except ImportError:
        known = known_implementations.get(protocol, {})
        package = known.get("class", "").split(".")[0]
        hint = (
            f"pip install {package}"
            if package and package != "fsspec"
            else known.get("err", "install its fsspec implementation")
        )
        raise UserError(
            f"{url}: the {protocol}:// filesystem needs a package that is not installed; {hint}"
        ) from None
    except ValueError:
        raise UserError(
            f"{url}: unknown URL protocol {protocol!r}; use a local path, file://, s3://, gs://, "
            f"or another protocol fsspec knows (fsspec.available_protocols())"
        ) from None
