"""Forked worker processes that each integrate a contiguous slice of a batch.

A worker is a child made by ``os.fork`` (Linux only, where fork is safe for torch on the
CPU): it shares no GIL with its parent, writes its slice into an anonymous shared mapping
made before the fork, and sends back through a pipe ``None`` or its failure, which the
parent raises. The kernel kills a worker whose parent dies. `default_workers` sizes the
pool to the cores other jobs leave idle.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import pickle
import signal
from collections.abc import Callable

import torch
from torch import Tensor

from warp_phys.dop853 import _Stuck


def default_workers() -> int:
    """Return the cores not already busy: available cores less the 1-minute load, at least 1.

    On a shared machine whose cores other jobs keep busy, a second worker only competes for
    them and costs more CPU (each one steps its own, smaller batch); on an idle one it pays.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores or 1, round((cores or 1) - busy)))


class _Child:
    """Run ``solve(lo, hi)`` in a forked process, which shares no GIL with us.

    The result lands in an anonymous shared mapping made before the fork; a pipe brings back
    ``None`` or the failure. Only used where fork is safe for torch (Linux).
    """

    def __init__(self, solve: Callable[[int, int], Tensor], lo: int, hi: int, shape, dtype) -> None:
        self._buffer = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)  # MAP_SHARED
        self.out = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                os.close(read)
                _die_with(parent)
                self.out.copy_(solve(lo, hi))
                msg = None
            except _Stuck as e:
                msg = ("stuck", e.index, e.t, e.y.tolist(), e.why)
            except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
                msg = ("error", e)
            try:
                os.write(write, _pickle(msg))
            finally:
                os._exit(0)
        os.close(write)
        self.pid: int | None = pid
        self._read = read

    def result(self) -> Tensor:
        """Wait for the child; return its slice ``(T, n, S)`` or raise its failure."""
        data = b"".join(iter(lambda: os.read(self._read, 1 << 16), b""))
        self._reap()
        if not data:
            raise RuntimeError("a simulation worker process died without a result")
        msg = pickle.loads(data)
        if msg is None:
            return self.out
        if msg[0] == "stuck":
            raise _Stuck(msg[1], msg[2], torch.tensor(msg[3]), msg[4])
        raise msg[1]

    def kill(self) -> None:
        """Stop the child if it is still running (we failed first)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self._reap()

    def _reap(self) -> None:
        if self.pid is not None:
            os.waitpid(self.pid, 0)
            os.close(self._read)
            self.pid = None


def _die_with(parent: int) -> None:
    """Have the kernel kill this (child) process when `parent` dies, e.g. by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _pickle(msg) -> bytes:
    try:
        return pickle.dumps(msg)
    except Exception:  # an unpicklable exception: keep its type name and message
        return pickle.dumps(("error", RuntimeError(f"{type(msg[1]).__name__}: {msg[1]}")))
