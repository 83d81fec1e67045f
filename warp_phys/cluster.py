"""Generation on a dask cluster: connect, and run a store's chunk tasks where the workers are.

`connect("local[:N]" | ADDRESS)` starts a `LocalCluster` of N one-thread worker processes, or
joins a running scheduler within `timeout` seconds. `InProcess` and `OnDask` run the same task
functions (`store._write_chunks`, ...) and yield each finished task's result; the store's
client (`store._fill`) alone writes the done marks, the skeleton and the final attributes:
workers write only the region of their own chunks (whole zarr chunks per task, so no two workers
ever write the same file or object).

Bitwise reproducibility needs each torch op on one thread (`simulate._single_threaded_ops`):
a task sets its worker process to one torch thread and leaves it so (each dask worker thread
would otherwise undo the others' setting). Run workers with one thread each and as many
processes as cores (the local cluster does); a task's bytes never depend on the worker.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from warp_phys.errors import UserError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler before giving up (--dask-timeout)
INSTALL = "pip install 'warp-phys[dask]' (from a checkout: pip install -e '.[dask]')"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise UserError(
            f"--dask needs dask.distributed, which is not installed; {INSTALL}"
        ) from None
    return distributed


def parse_spec(spec: str) -> tuple[str, int | None]:
    """Return ("local", N or None) or ("address", None) for a --dask value."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"--dask expects local, local:N or a scheduler address; got {spec!r}")
    spec = spec.strip()
    if spec == "local":
        return "local", None
    if spec.startswith("local:"):
        n = spec.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise UserError(
                f"--dask local:N needs a positive number of workers; got {spec!r} "
                f"(e.g. --dask local:4)"
            )
        return "local", int(n)
    return "address", None


@contextmanager
def connect(spec: str, *, timeout: float = CONNECT_TIMEOUT) -> Iterator:
    """Yield a `dask.distributed.Client`: on a new local cluster, or on the scheduler at `spec`.

    Args:
        spec: ``local`` (one worker per available core), ``local:N``, or an address such as
            ``tcp://10.0.0.5:8786``.
        timeout: seconds to reach the scheduler of an address; then a UserError.
    """
    kind, n = parse_spec(spec)
    distributed = _distributed()
    with _quiet("distributed"):
        if kind == "local":
            yield from _local(distributed, n)
        else:
            yield from _remote(distributed, spec, timeout)


def _local(distributed, n: int | None) -> Iterator:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cluster = distributed.LocalCluster(
        n_workers=n or cores or os.cpu_count() or 1,
        threads_per_worker=1,
        processes=True,
        silence_logs=logging.ERROR,
        dashboard_address=":0",  # a free port: never a clash with another cluster
    )
    try:
        with distributed.Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _remote(distributed, spec: str, timeout: float) -> Iterator:
    try:
        client = distributed.Client(spec, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(
            f"no dask scheduler answered at {spec} within {timeout:g} s ({reason}); check the "
            f"address (e.g. tcp://HOST:8786) and that `dask scheduler` runs there, raise "
            f"--dask-timeout, or use --dask local"
        ) from None
    with client:
        yield client


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold logger `name` at ERROR (dask logs every worker's start and stop), then restore it."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dashboard(client) -> str:
    """The dashboard address of `client`'s scheduler ("" when it has none)."""
    try:
        return client.dashboard_link or ""
    except Exception:  # noqa: BLE001 - no dashboard (bokeh missing, or an old scheduler)
        return ""


class InProcess:
    """Run tasks one after the other in this process (the default, single-machine path)."""

    in_process = True

    def run(self, fn: Callable, items: list[tuple]) -> Iterator[list[tuple[tuple, object]]]:
        """Yield ``[(item, fn(*item))]`` for each item, in order."""
        for item in items:
            yield [(item, fn(*item))]


class OnDask:
    """Run tasks on a dask cluster; yield finished tasks in batches, as they come back.

    A worker that dies is replaced and its task run again by the scheduler (up to its
    ``allowed-failures``); a task that fails, or a scheduler that is lost, cancels the rest and
    raises: what finished is kept by the caller's marks, and the same command resumes.
    """

    in_process = False

    def __init__(self, client) -> None:
        self.client = client

    def run(self, fn: Callable, items: list[tuple]) -> Iterator[list[tuple[tuple, object]]]:
        distributed = _distributed()
        if not items:
            return
        token = uuid.uuid4().hex[:8]
        futures = {
            self.client.submit(
                _on_worker, fn, item, key=f"warp-phys-{fn.__name__}-{token}-{i}", pure=False
            ): item
            for i, item in enumerate(items)
        }
        try:
            for batch in distributed.as_completed(futures).batches():
                yield [(futures[f], _result(f, futures[f])) for f in batch]
        finally:
            pending = [f for f in futures if not f.done()]
            if pending:
                self.client.cancel(pending)


def _result(future, item: tuple):
    """A finished future's result, or the task's own error; a worker that died again and again,
    or a lost scheduler, is one line naming the fix."""
    from concurrent.futures import CancelledError

    from distributed.comm.core import CommClosedError
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        raise UserError(
            f"dask workers died repeatedly while running task {item[1:3]} (out of memory, or "
            f"killed); what finished is kept: run the same command again to resume"
        ) from None
    except (CommClosedError, CancelledError) as err:
        raise UserError(
            f"lost the dask cluster ({type(err).__name__}); what finished is kept: run the "
            f"same command again to resume"
        ) from None


def _on_worker(fn: Callable, item: tuple):
    """Run ``fn(*item)`` on a dask worker, with one torch thread per op (module docstring)."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    return fn(*item)
