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
import time
from collections.abc import Callable

import torch
from torch import Tensor

from warp_phys.dop853 import _Stuck


def default_workers() -> int:
    """Return the cores not busy with other work, at least 1.

    On a shared machine whose cores other jobs keep busy, a second worker only competes for
    them and costs more CPU (each one steps its own, smaller batch); on an idle one it pays.
    Busy is measured, where Linux tells it (`/proc/stat`), as the CPU time the whole machine
    spent since the last look (at the latest, this module's import) less this process's own:
    the 1-minute load average, used elsewhere, still counts a job that ended 30 s ago, even
    this process's own imports, and would leave a core idle after any earlier command.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    busy = _OTHERS.busy_cores()
    if busy is None:
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


class _OtherWork:
    """Cores kept busy by other processes, from the per-CPU counters of `/proc/stat` for the
    CPUs this process may run on (in a container, the host's other CPUs do not count)."""

    MIN_WINDOW = 0.2  # seconds: a shorter window is too coarse (10 ms ticks) to tell

    def __init__(self) -> None:
        self._last = self._sample()
        self._busy: float | None = None  # the last measurement

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(wall seconds, busy CPU-seconds of our CPUs, CPU-seconds of this process)."""
        try:
            mine = os.sched_getaffinity(0)
            busy = 0
            with open("/proc/stat", encoding="ascii") as f:
                for line in f:
                    name, *values = line.split()
                    if not name.startswith("cpu"):
                        break
                    if name == "cpu" or int(name[3:]) not in mine:
                        continue
                    fields = [int(x) for x in values[:8]]  # user .. steal (guest is in user)
                    busy += sum(fields) - fields[3] - fields[4]  # less idle and iowait
        except (OSError, ValueError, AttributeError, IndexError):
            return None
        own = os.times()
        spent = own.user + own.system + own.children_user + own.children_system
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), spent

    def busy_cores(self) -> float | None:
        """Average cores other processes kept busy since the last measurement, or that
        measurement when this window is shorter than `MIN_WINDOW`; None when unknown."""
        now, last = self._sample(), self._last
        if now is None or last is None:
            return None
        if now[0] - last[0] >= self.MIN_WINDOW:
            others = (now[1] - last[1]) - (now[2] - last[2])
            self._busy, self._last = max(0.0, others / (now[0] - last[0])), now
        return self._busy


_OTHERS = _OtherWork()


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
