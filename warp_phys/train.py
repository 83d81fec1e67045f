"""Training loop: two phases, model selection on val, optional atomic checkpoints, resume.

    result = fit(model, data, context=100, config=TrainConfig(max_seconds=120))
    result.model        # the model, trained, with its best validation weights
    result.history      # one record per step (loss, phase, time; val every eval_every)

`fit` takes any forecaster (a hand-built `WARP`, a GRU, ...) and returns it trained; with
`run_dir` it also writes checkpoints, history and a loss plot there and can resume. `train`
builds the model of a `RunConfig` and fits it in a run directory (what the CLI runs).

Phase 1 (the first `teacher_forced_fraction` of the run) feeds ground truth everywhere, so a
WARP model computes all hidden states with the parallel scan and the one-step loss covers
every step at once. Phase 2 rolls the model out autoregressively after the context, with a
teacher-forcing probability decaying linearly from `teacher_prob_start` to `_end`.
Progress through the run is max(step / steps, elapsed / max_seconds): a time budget shortens
every schedule instead of cutting it off. A batch whose loss or gradient is not finite (a
rollout that blew up) is skipped without an update and counted; after MAX_SKIPPED_IN_A_ROW
such batches in a row training stops early, and the best checkpoint is kept and evaluated
with the reason in train_summary.json (so one diverging model never sinks a whole compare).
Under torchrun (a process group is initialised) the model is wrapped in DistributedDataParallel
and each process trains on its share of every batch, by the rule of `distributed.py` (the loss
curve of one process, within float tolerance); rank 0 alone validates and writes.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from warp_phys import distributed
from warp_phys.atomic import remove_stale_tmp, write_bytes_atomic, write_json_atomic
from warp_phys.config import ModelConfig, RunConfig, TrainConfig
from warp_phys.data import Dataset
from warp_phys.errors import UserError
from warp_phys.forecaster import AbstractForecaster
from warp_phys.models import build_model
from warp_phys.optim import Optimiser

log = logging.getLogger(__name__)
MAX_SKIPPED_IN_A_ROW = 10  # non-finite losses in a row that end a run
LOSSES = ("mse", "nll")  # train.loss: mean squared error, Gaussian negative log-likelihood
CHECKPOINT_KEYS = {"model", "optimizer", "state", "gen", "batch_rng"}  # what last.pt holds


def resolve_device(tcfg: TrainConfig, name: str | None = None) -> torch.device:
    """Return the torch device of a run; under torchrun ``cuda`` is this process's GPU."""
    name = distributed.device_for(name or tcfg.device)
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "CUDA was asked for (--device cuda) but torch sees no GPU here; use --device cpu"
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; use cpu or cuda")
    return torch.device(name)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch CPU threads (0: leave torch's setting), then restore it.

    Small models on a busy 2-core machine: a second OpenMP thread costs up to 10x."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_context(context: int, n_steps: int) -> None:
    if not 1 <= context < n_steps:
        raise UserError(
            f"context L={context} must be at least 1 and below the {n_steps} steps of the dataset; "
            f"set data.context lower (e.g. --set data.context={n_steps // 2})"
        )


def step_loss(
    model: nn.Module,
    ys: Tensor,
    scale: Tensor,
    *,
    context: int,
    teacher_prob: float,
    generator: torch.Generator,
    loss: str,
    penalty_weight: float,
    horizon: int = 0,
) -> Tensor:
    """Return the training loss of one batch ``ys (B, T, S)`` in units of the data's std.

    With `horizon` > 0 only the steps up to `horizon` after the context count."""
    kwargs = {"horizon": horizon} if horizon else {}
    out = model(ys, context=context, teacher_prob=teacher_prob, generator=generator, **kwargs)
    target = ys[:, 1 : out.mean.shape[1] + 1]  # (B, T-1, S): step t predicts y_{t+1}
    z = (out.mean - target) / scale
    if loss == "nll":
        if out.std is None:
            raise UserError(
                "train.loss = 'nll' needs a root that predicts a std (prior option predict_std = true)"
            )
        sigma = out.std / scale
        value = (torch.log(sigma) + 0.5 * ((out.mean - target) / out.std) ** 2).mean()
    else:
        value = 0.5 * (z**2).mean()
    if penalty_weight:
        extra = model.penalty(ys)
        if extra is not None:
            value = value + penalty_weight * extra.mean()
    return value


@dataclass
class TrainState:
    step: int = 0
    elapsed: float = 0.0
    best_val: float = math.inf
    best_step: int = -1
    skipped: int = 0  # batches whose loss or gradient was not finite (no update made)
    history: list[dict] = field(default_factory=list)


def save_atomic(obj: dict, path: Path) -> None:
    """Write a checkpoint so that a kill at any moment leaves the old or the new file, whole.

    It is serialised in memory first, so that a full disk is an OSError naming the file (torch's
    own writer would report a bare RuntimeError), and no temporary file stays behind.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint of tensors and plain values; never run code stored in the file.

    `weights_only=True` unpickles tensors, numbers, strings, lists, tuples and dicts only: a file
    whose pickle asks for anything else (a function to call, a class to build) is refused.
    """
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; run without --resume to start afresh")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):  # the pickle names a function or class to load
            raise UserError(
                f"checkpoint {path} asks to load code (not only tensors and plain values), so "
                f"it was not written by warp-phys and is refused unread; delete it and train "
                f"afresh"
            ) from None
        raise UserError(
            f"checkpoint {path} is corrupt (not a readable checkpoint); delete it and train afresh"
        ) from None
    except Exception as err:  # noqa: BLE001 - any other failure to unpickle: a damaged file
        raise UserError(
            f"checkpoint {path} is corrupt ({type(err).__name__}); delete it and train afresh"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(
            f"checkpoint {path} is not a warp-phys checkpoint (no model weights); delete it "
            f"and train afresh"
        )
    return ckpt


def load_weights(model: nn.Module, weights: dict, path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise UserError(
            f"checkpoint {path} does not fit this model ({first}); the dataset or model config "
            f"changed since it was written: train afresh without --resume or restore the config"
        ) from None


@torch.no_grad()
def val_score(model: nn.Module, ys: Tensor, scale: Tensor, context: int, batch: int) -> float:
    """Mean forecast MSE on validation trajectories (standardised units): the selection score.

    A diverged forecast scores inf (never NaN, which would compare false against everything)."""
    model.eval()
    total = 0.0
    for i in range(0, len(ys), batch):
        y = ys[i : i + batch]
        out = model(y, context=context)
        err = ((out.mean[:, context - 1 :] - y[:, context:]) / scale) ** 2
        total += float(err.mean(dim=(1, 2)).sum())
    model.train()
    return total / len(ys) if math.isfinite(total) else math.inf


@dataclass
class FitResult:
    """What `fit` returns: the trained model (best validation weights), its history, summary."""

    model: AbstractForecaster
    history: list[dict]
    summary: dict


def fit(
    model: AbstractForecaster,
    data: Dataset,
    *,
    context: int,
    config: TrainConfig | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    on_start: Callable[[], None] | None = None,
) -> FitResult:
    """Train `model` on `data` (forecasts after `context` steps); return it trained.

    Selection on the validation split: the returned model carries the weights of the best
    validation score (the untrained model included). With `run_dir`, checkpoints (best.pt,
    last.pt), history.json, train_summary.json and loss.png are written there, and `resume`
    continues from last.pt; without it nothing touches the disk. Everything that can be
    checked (device, context, data size, optimiser, the checkpoint to resume from) is
    checked before anything is written; then `on_start` is called and training begins.
    Progress: a bar on a terminal (`progress=None`: when stderr is one), else one log line
    per evaluation (logger ``warp_phys.train``, level INFO). Torch's CPU thread count is set
    for the run only. In a torch.distributed process group (torchrun) every process calls
    this: rank 0 alone calls `on_start`, validates and writes, and every process returns the
    model with rank 0's best weights.
    """
    tcfg = config or TrainConfig()
    if not isinstance(model, AbstractForecaster):
        raise TypeError(
            f"fit needs a forecaster (warp_phys.forecaster); got {type(model).__name__}"
        )
    if data.state_dim != model.state_dim:
        raise ValueError(
            f"the model forecasts {model.state_dim} states but the data has {data.state_dim} "
            f"({', '.join(data.state)}); build the model with state_dim={data.state_dim}"
        )
    device = resolve_device(tcfg)
    check_context(context, data.n_steps)
    main = distributed.current().main
    distributed.check_world(
        distributed.current().world, len(data.splits["train"].y), tcfg.batch_size
    )
    with torch_threads(tcfg.threads):
        model.to(device)
        loop = _Loop(model, data, context, tcfg, run_dir, device)
        if tcfg.loss == "nll":
            _check_predicts_std(model, data.splits["train"].y[:1].to(device), data.n_steps)
        if resume:
            if run_dir is None:
                raise UserError("resume needs the run directory to resume from (run_dir=...)")
            loop.state = _resume(run_dir / "last.pt", model, loop.opt, loop.gen, loop.batch_rng)
            log.info("resumed %s at step %d", run_dir, loop.state.step)
        if on_start is not None and main:
            on_start()
        if run_dir is not None and main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_tmp(run_dir):
                log.info("removed %s, left by an interrupted write", stale)
        summary = loop.run(_show_bar(progress))
    return FitResult(model=model, history=loop.state.history, summary=summary)


def train(
    cfg: RunConfig,
    data: Dataset,
    run_dir: Path,
    *,
    model_cfg: ModelConfig | None = None,
    resume: bool = False,
    progress: bool | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict:
    """Build the model of `cfg` (or `model_cfg`), fit it in `run_dir`; return the summary."""
    mcfg = model_cfg or cfg.model
    tcfg = cfg.train_for(mcfg)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, data)
    got = fit(
        model, data, context=cfg.data.context, config=tcfg, run_dir=run_dir, resume=resume,
        progress=progress, on_start=on_start,
    )  # fmt: skip
    return got.summary


def _show_bar(progress: bool | None) -> bool:
    """A progress bar only on a terminal: piped to a file, one log line per evaluation."""
    return sys.stderr.isatty() if progress is None else progress


class _Loop:
    """One training run: optimiser, random streams, state, selection, checkpoints."""

    def __init__(self, model, data: Dataset, context: int, tcfg: TrainConfig, run_dir, device):
        self.model, self.tcfg, self.run_dir, self.L = model, tcfg, run_dir, context
        self.name = run_dir.name if run_dir is not None else type(model).__name__
        self.opt = Optimiser(tcfg, [p for p in model.parameters() if p.requires_grad])
        self.state = TrainState()
        self.gen = torch.Generator(device=device).manual_seed(tcfg.seed)
        self.batch_rng = torch.Generator().manual_seed(tcfg.seed + 1)
        self.train_y = data.splits["train"].y.to(device)
        self.val_y = data.splits["val"].y[: tcfg.n_val_eval].to(device)
        self.scale = data.scale().to(device)
        self.T, self.device = data.n_steps, device
        self.best_weights = None  # in memory when there is no run directory
        self.group = distributed.current()
        self.loss_of = distributed.batch_loss(
            model, step_loss, self.group, device, probe=self._every_weight_used
        )

    def _every_weight_used(self, loss_fn: Callable) -> bool:
        """Whether every trainable weight gets a gradient in both phases (one trajectory each;
        the random streams are left as they were)."""
        ys, tcfg = self.train_y[:1], self.tcfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        gen = torch.Generator(device=ys.device).manual_seed(0)
        kw = dict(loss=tcfg.loss, penalty_weight=tcfg.penalty_weight, generator=gen)
        with torch.random.fork_rng(devices=[ys.device] if ys.is_cuda else []):
            for context, p, horizon in ((self.T, 0.0, 0), (self.L, 0.5, tcfg.loss_horizon)):
                loss = loss_fn(
                    self.model,
                    ys,
                    self.scale,
                    context=context,
                    teacher_prob=p,
                    horizon=horizon,
                    **kw,
                )
                if any(g is None for g in torch.autograd.grad(loss, params, allow_unused=True)):
                    return False
        return True

    def val(self) -> float:
        return val_score(self.model, self.val_y, self.scale, self.L, 4 * self.tcfg.batch_size)

    def keep_if_best(self, val: float) -> None:
        """Keep the weights when `val` beats the best so far (an inf score never wins, but one
        is always kept): best.pt in the run directory, else a copy in memory (rank 0 only)."""
        state = self.state
        if val < state.best_val or state.best_step < 0:
            state.best_val, state.best_step = val, state.step
            weights = self.model.state_dict()
            if self.run_dir is None:
                self.best_weights = copy.deepcopy(weights)
            else:
                save_atomic({"model": weights, "step": state.step}, self.run_dir / "best.pt")

    def checkpoint(self) -> None:
        if self.run_dir is not None and self.group.main:
            _checkpoint(self.run_dir, self.model, self.opt, self.state, self.gen, self.batch_rng)

    def run(self, bar_on: bool) -> dict:
        tcfg, state, model = self.tcfg, self.state, self.model
        budget = tcfg.max_seconds > 0
        bar = tqdm(
            total=100 if budget else tcfg.steps,
            initial=0 if budget else state.step,
            disable=not (bar_on and self.group.main),
            desc=self.name,
            leave=False,
            unit="%" if budget else "step",
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt}% [{elapsed}<{remaining}{postfix}]"
            if budget
            else None,
        )
        main = self.group.main  # under torchrun rank 0 alone validates and writes
        if state.step == 0 and not state.history and main:  # the untrained model is a candidate
            val0 = self.val()
            state.history.append({"step": 0, "phase": "init", "time": 0.0, "val": val0})
            self.keep_if_best(val0)
        start = time.perf_counter() - state.elapsed
        stopped, in_a_row = "", 0
        while state.step < tcfg.steps:
            elapsed = time.perf_counter() - start
            if self.group.world > 1 and tcfg.max_seconds > 0:  # one clock: rank 0's
                elapsed = distributed.broadcast_float(elapsed)
            frac = _progress(tcfg, state.step, elapsed)
            if frac >= 1.0:
                break
            idx = torch.randint(
                len(self.train_y), (min(tcfg.batch_size, len(self.train_y)),),
                generator=self.batch_rng,
            )  # fmt: skip
            teacher = frac < tcfg.teacher_forced_fraction
            p = _teacher_prob(tcfg, frac)
            loss = self.loss_of(
                self.train_y,
                idx,
                self.scale,
                context=self.T if teacher else self.L,
                teacher_prob=0.0 if teacher else p,
                generator=self.gen,
                loss=tcfg.loss,
                penalty_weight=tcfg.penalty_weight,
                horizon=0 if teacher else tcfg.loss_horizon,
            )
            # a loss or gradient that is not finite (a rollout that blew up): skip the batch
            if not (torch.isfinite(loss) and self.opt.step(loss, frac)):
                state.skipped += 1
                in_a_row += 1
                log.warning(
                    "%s: step %d: non-finite loss or gradient (loss %s), batch skipped (%d so far)",
                    self.name, state.step, loss.item(), state.skipped,
                )  # fmt: skip
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    stopped = (
                        f"non-finite loss or gradient on {in_a_row} batches in a row at step "
                        f"{state.step}; the best checkpoint (step {state.best_step}) is evaluated"
                    )
                    break
                continue
            in_a_row = 0
            loss = loss.item()
            state.step += 1
            now = time.perf_counter() - start
            if budget:
                bar.update(100 * _progress(tcfg, state.step, now) - bar.n)
            else:
                bar.update(1)
            bar.set_postfix_str(
                f"step {state.step}, loss {loss:.3g}, " + ("tf" if teacher else f"ar p={p:.2f}")
            )
            record = {
                "step": state.step,
                "loss": loss,
                "phase": "teacher" if teacher else "auto",
                "time": now,
            }
            if main and (state.step % tcfg.eval_every == 0 or state.step == tcfg.steps):
                record["val"] = self.val()
                self.keep_if_best(record["val"])
                log.info(
                    "%s: step %d, %.0f s, loss %.3g, val %.3g (best %.3g at step %d)",
                    self.name, state.step, now, loss, record["val"], state.best_val,
                    state.best_step,
                )  # fmt: skip
            state.history.append(record)
            state.elapsed = time.perf_counter() - start
            if "val" in record:
                self.checkpoint()
        bar.close()
        if main and (state.best_step < 0 or state.history and "val" not in state.history[-1]):
            record_val = self.val()
            if state.history:
                state.history[-1]["val"] = record_val
            self.keep_if_best(record_val)
        self.checkpoint()
        if stopped:
            log.warning("%s: training stopped early: %s", self.name, stopped)
        summary = _summary(state, model, stopped) | {"processes": self.group.world}
        if self.run_dir is not None and main:
            _write_run_files(self.run_dir, state, summary)
        best = distributed.on_main(self._best_weights)  # every process: rank 0's best weights
        if best is not None:
            load_weights(model, best, "best.pt")
        return summary

    def _best_weights(self) -> dict | None:
        if self.run_dir is not None:
            return load_checkpoint(self.run_dir / "best.pt")["model"]
        return self.best_weights


def _check_predicts_std(model: nn.Module, ys: Tensor, n_steps: int) -> None:
    """Raise UserError when the Gaussian NLL loss is asked of a model that predicts no std
    (one teacher-forced pass over one trajectory; the random streams are left as they were)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[ys.device] if ys.is_cuda else []):
        std = model(ys, context=n_steps).std
    if std is None:
        raise UserError(
            "train.loss = 'nll' needs a root that predicts a std (prior option predict_std = "
            "true); use train.loss = 'mse' for this model"
        )


def _resume(path: Path, model, opt, gen, batch_rng) -> TrainState:
    """Load last.pt into the model, optimiser and generators; return the training state.

    Under torchrun rank 0 reads it and every process gets its content."""
    ckpt = distributed.on_main(lambda: load_checkpoint(path))
    if set(ckpt) != CHECKPOINT_KEYS:
        raise UserError(
            f"checkpoint {path} is not a last.pt of this warp-phys version (keys "
            f"{sorted(ckpt)}, expected {sorted(CHECKPOINT_KEYS)}); train afresh with --overwrite"
        )
    load_weights(model, ckpt["model"], path)
    try:
        opt.load_state_dict(ckpt["optimizer"])
        state = TrainState(**ckpt["state"])
        gen.set_state(ckpt["gen"])
        batch_rng.set_state(ckpt["batch_rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(
            f"checkpoint {path} does not fit this run ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); train afresh with --overwrite"
        ) from None
    return state


def _progress(tcfg: TrainConfig, step: int, elapsed: float) -> float:
    frac = step / max(tcfg.steps, 1)
    if tcfg.max_seconds > 0:
        frac = max(frac, elapsed / tcfg.max_seconds)
    return frac


def _teacher_prob(tcfg: TrainConfig, frac: float) -> float:
    f0 = tcfg.teacher_forced_fraction
    u = 0.0 if f0 >= 1 else min(max((frac - f0) / (1 - f0), 0.0), 1.0)
    return tcfg.teacher_prob_start + u * (tcfg.teacher_prob_end - tcfg.teacher_prob_start)


def _checkpoint(run_dir, model, opt, state, gen, batch_rng) -> None:
    save_atomic(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "state": state.__dict__,
            "gen": gen.get_state(),
            "batch_rng": batch_rng.get_state(),
        },
        run_dir / "last.pt",
    )


def _summary(state: TrainState, model: nn.Module, stopped: str = "") -> dict:
    return {
        "steps": state.step,
        "train_seconds": state.elapsed,
        "best_val": state.best_val,
        "best_step": state.best_step,
        "n_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "skipped_batches": state.skipped,
        "stopped": stopped,
    }


def _write_run_files(run_dir: Path, state: TrainState, summary: dict) -> None:
    write_json_atomic(run_dir / "history.json", state.history, indent=None)
    write_json_atomic(run_dir / "train_summary.json", summary)
    _plot_loss(run_dir, state.history)


def _plot_loss(run_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    from matplotlib.figure import Figure  # no pyplot: the process's backend is left alone

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    trained = [h for h in history if "loss" in h]
    ax.semilogy(
        [h["step"] for h in trained], [h["loss"] for h in trained], lw=0.6, alpha=0.7,
        label="train loss",
    )  # fmt: skip
    vals = [(h["step"], h["val"]) for h in history if "val" in h]
    if vals:
        ax.semilogy(*zip(*vals, strict=True), "o-", ms=3, label="val forecast MSE (std. units)")
    switch = next((h["step"] for h in history if h["phase"] == "auto"), None)
    if switch:
        ax.axvline(switch, color="k", ls=":", lw=0.8, label="autoregressive phase")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=120)
