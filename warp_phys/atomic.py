"""Files written whole or not at all: a kill or a full disk never leaves half a file in place.

Every writer goes through `write_bytes_atomic`: the bytes land in `NAME.tmp` beside the target,
are flushed to the disk, and replace the target in one rename. A failed write removes its
temporary file; one left by a kill is removed by `remove_stale_tmp` on the next run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a kill at any moment leaves the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj, *, indent: int | None = 2) -> None:
    """Write `obj` as standard JSON; NaN and inf, which JSON lacks, become "nan" and "inf"."""
    write_text_atomic(path, json.dumps(json_safe(obj), indent=indent, allow_nan=False))


def json_safe(obj):
    """JSON has no NaN/inf: write them as strings so the file stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the `*.tmp` files a killed writer left in `folder`; return what was removed."""
    stale = sorted(Path(folder).glob("*" + TMP_SUFFIX)) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
