"""Training on several processes with torch.distributed (`torchrun`): ranks, the batch rule, rank 0.

`warp-phys train/compare` under ``torchrun --nproc-per-node N`` (any N > 1) join one process
group (gloo on the CPU, nccl on GPUs: one GPU per process, ``cuda:LOCAL_RANK``); without
torchrun, or with N = 1, nothing here runs and training is the one-process path.

The batch rule, so that the same global batch and seed give the loss curve of one process
(within float tolerance: the sums of a batch run in another order):
- every rank draws the global batch's B trajectory indices from the same seeded generator, as
  one process would, and trains on its contiguous share: rank r of W takes positions
  ``B·r//W`` to ``B·(r+1)//W`` (`share`);
- in the autoregressive phase the teacher-forcing draws of the whole batch are made on every
  rank from the same generator, and each rank keeps its share (`GlobalDraws`);
- rank r's loss is weighted by ``W·b_r/B`` (b_r its share), so the gradient that
  DistributedDataParallel averages is that of the global batch's mean loss; the loss recorded
  is the global mean (all-reduced), and a batch is skipped on every rank or on none.
Every rank therefore holds the same weights, optimiser state and generator states after every
step: rank 0's checkpoint restores every rank, and a run may resume with another number of
processes (the same curve, within float tolerance).

Rank 0 alone reads and writes the run directory (the plan, run.json, checkpoints, history,
plots, metrics) and validates and evaluates (on the whole validation and test sets); what it
decides or reads is broadcast (`on_main`). Every rank loads the whole dataset (it must be on a
disk every node sees, or on object storage).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from warp_phys.errors import RankError, UserError

log = logging.getLogger(__name__)
# rank 0 evaluates a model (and, in a compare, the references) while the others wait for the
# next model: a generous limit on one collective, so that waiting is never taken for a hang
TIMEOUT = datetime.timedelta(hours=6)


class SameEverywhere(UserError):
    """An error every process meets alike (a check of the shared inputs, or rank 0's decision):
    rank 0 reports it, once."""


@dataclass(frozen=True)
class Group:
    """This process's place: rank of world, and its rank on its node (its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Group:
    """The process group this process belongs to (one process: rank 0 of 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextmanager
def session(device: str) -> Iterator[Group]:
    """Join the process group torchrun set up (when it started more than one process).

    Args:
        device: the run's ``train.device``: ``cpu`` uses gloo, ``cuda`` nccl with one GPU per
            process (``cuda:LOCAL_RANK``).
    """
    if launched_world() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise UserError("this torch was built without torch.distributed; run without torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(
                "CUDA was asked for (--device cuda) but torch sees no GPU here; use --device cpu"
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    group = current()
    try:
        yield group
    except SameEverywhere:
        raise
    except UserError as err:  # this process's own: the others may not have met it
        if group.main:
            raise
        raise RankError(f"(process {group.rank}) {err}") from None
    finally:
        dist.destroy_process_group()


def device_for(name: str) -> str:
    """The device of this rank for a run's device name: ``cuda`` is ``cuda:LOCAL_RANK``."""
    group = current()
    if group.world > 1 and name == "cuda":
        return f"cuda:{group.local_rank}"
    return name


def on_main(fn: Callable[[], object]) -> object:
    """Call `fn` on rank 0 and return its result on every rank; a UserError it raises is
    raised on every rank (as `SameEverywhere` on the others: rank 0 reports it)."""
    group = current()
    if group.world == 1:
        return fn()
    box: list = [None]
    if group.main:
        try:
            box[0] = ("ok", fn())
        except UserError as err:
            box[0] = ("error", type(err), str(err))
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    if box[0][0] == "error":
        raise (box[0][1] if group.main else SameEverywhere)(box[0][2])
    return box[0][1]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_world(world: int, n_train: int, batch: int) -> None:
    """Raise SameEverywhere (a UserError) when some rank would get no trajectory of a batch."""
    if world <= 1:
        return
    if n_train < world:
        raise SameEverywhere(
            f"torchrun started {world} processes but the training split has {n_train} "
            f"trajectories: each process needs at least one; use --nproc-per-node {n_train} or "
            f"fewer, or generate more training trajectories"
        )
    if batch < world:
        raise SameEverywhere(
            f"train.batch_size = {batch} is smaller than the {world} processes torchrun "
            f"started: each needs at least one trajectory per batch; set train.batch_size to "
            f"at least {world} or use --nproc-per-node {batch}"
        )


def share(n: int, group: Group) -> slice:
    """Rank `group.rank`'s contiguous share of a global batch of `n` (the batch rule)."""
    return slice(n * group.rank // group.world, n * (group.rank + 1) // group.world)


def all_mean(local: torch.Tensor, weight: float) -> torch.Tensor:
    """Σ over ranks of ``weight · local``: the global mean of per-rank means weighted b_r/B."""
    total = (local.detach() * weight).reshape(1).to(torch.float64)
    dist.all_reduce(total)
    return total[0].to(local.dtype)


def broadcast_float(value: float) -> float:
    """Rank 0's `value` on every rank (the clock that drives the schedules)."""
    box = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.broadcast(box, src=0)
    return float(box[0])


class GlobalDraws(TorchFunctionMode):
    """Inside it, ``torch.rand(b_r, ..., generator=gen)`` (the teacher-forcing draw of a rank's
    share of a batch) draws for the whole batch of `n` and returns this rank's share: the
    numbers one process would draw for these trajectories, and the same generator state on
    every rank afterwards."""

    def __init__(self, gen: torch.Generator, n: int, part: slice) -> None:
        super().__init__()
        self.gen, self.n, self.part = gen, n, part
        self.local = part.stop - part.start

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.rand and kwargs.get("generator") is self.gen:
            size = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else args
            if size and size[0] == self.local:
                return func(self.n, *size[1:], **kwargs)[self.part]
        return func(*args, **kwargs)


def batch_loss(
    model: nn.Module, loss_fn: Callable, group: Group, device: torch.device, *, probe: Callable
) -> Callable:
    """Return ``loss(train_y, idx, scale, **options)``: the loss of the global batch `idx`.

    One process: ``loss_fn(model, train_y[idx], scale, **options)``. Several (the batch rule):
    this process's share through DistributedDataParallel, weighted so that the averaged
    gradient is the global batch's; the value is the global mean loss, the same everywhere.
    ``probe(loss_fn)`` says whether every weight takes part in both phases (else DDP searches
    the graph for unused ones at every step)."""
    if group.world == 1:
        return lambda ys, idx, scale, **kw: loss_fn(model, ys[idx.to(device)], scale, **kw)
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():  # broadcast_buffers is deprecated in newer torch only
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DistributedDataParallel(
            _Whole(model, loss_fn),
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # buffers never change in training: nothing to sync
            find_unused_parameters=not probe(loss_fn),
        )

    def loss(ys: Tensor, idx: Tensor, scale: Tensor, *, generator, **kw) -> Tensor:
        part = share(len(idx), group)
        weight = (part.stop - part.start) / len(idx)  # b_r / B
        draws = GlobalDraws(generator, len(idx), part) if generator is not None else None
        with draws or contextlib.nullcontext():
            local = ddp(ys[idx[part].to(device)], scale, generator=generator, **kw)
        scaled = local * (group.world * weight)  # DDP averages: Σ_r (b_r / B) ∇loss_r
        total = all_mean(local, weight)
        return scaled + (total - scaled).detach()  # the gradient of `scaled`, the value total

    return loss


class _Whole(nn.Module):
    """A model and its training loss as one module: DistributedDataParallel sees the whole
    step (a prior's penalty included) as one forward."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, ys: Tensor, scale: Tensor, **kwargs) -> Tensor:
        return self.loss_fn(self.model, ys, scale, **kwargs)
