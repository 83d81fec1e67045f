"""Training loop: two phases, model selection on val, atomic checkpoints, resume.

Phase 1 (the first `teacher_forced_fraction` of the run) feeds ground truth everywhere, so a
WARP model computes all hidden states with the parallel scan and the one-step loss covers
every step at once. Phase 2 rolls the model out autoregressively after the context, with a
teacher-forcing probability decaying linearly from `teacher_prob_start` to `_end`.
Progress through the run is max(step / steps, elapsed / max_seconds): a time budget shortens
every schedule instead of cutting it off. A batch whose loss or gradient is not finite (a
rollout that blew up) is skipped without an update and counted; after MAX_SKIPPED_IN_A_ROW
such batches in a row training stops early, and the best checkpoint is kept and evaluated
with the reason in train_summary.json (so one diverging model never sinks a whole compare).
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from warp_phys.atomic import remove_stale_tmp, write_bytes_atomic, write_json_atomic
from warp_phys.config import ModelConfig, RunConfig, TrainConfig
from warp_phys.data import Dataset
from warp_phys.errors import UserError
from warp_phys.models import build_model
from warp_phys.optim import Optimiser

log = logging.getLogger(__name__)
MAX_SKIPPED_IN_A_ROW = 10  # non-finite losses in a row that end a run
LOSSES = ("mse", "nll")  # train.loss: mean squared error, Gaussian negative log-likelihood
CHECKPOINT_KEYS = {"model", "optimizer", "state", "gen", "batch_rng"}  # what last.pt holds


def resolve_device(tcfg: TrainConfig, name: str | None = None) -> torch.device:
    """Return the torch device of a run (and set the CPU thread count it asks for)."""
    name = name or tcfg.device
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "CUDA was asked for (--device cuda) but torch sees no GPU here; use --device cpu"
        )
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; use cpu or cuda")
    if tcfg.threads > 0:
        # small models on a busy 2-core machine: a second OpenMP thread costs up to 10x
        torch.set_num_threads(tcfg.threads)
    return torch.device(name)


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


def train(
    cfg: RunConfig,
    data: Dataset,
    run_dir: Path,
    *,
    model_cfg: ModelConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    on_start: Callable[[], None] | None = None,
) -> dict:
    """Train one model on `data`; write checkpoints, history and summary to `run_dir`.

    Everything that can be checked (device, context, model, optimiser, the checkpoint to resume
    from) is checked before anything is written; then `on_start` is called (the run directory
    records the run there) and training begins.
    """
    mcfg = model_cfg or cfg.model
    tcfg = cfg.train_for(mcfg)
    device = resolve_device(tcfg)
    check_context(cfg.data.context, data.n_steps)
    torch.manual_seed(tcfg.seed)
    model = build_model(mcfg, data).to(device)
    opt = Optimiser(tcfg, [p for p in model.parameters() if p.requires_grad])
    state = TrainState()
    gen = torch.Generator(device=device).manual_seed(tcfg.seed)
    batch_rng = torch.Generator().manual_seed(tcfg.seed + 1)
    if tcfg.loss == "nll":
        _check_predicts_std(model, data.splits["train"].y[:1].to(device), data.n_steps)
    if resume:
        state = _resume(run_dir / "last.pt", model, opt, gen, batch_rng)
        log.info("resumed %s at step %d", run_dir, state.step)
    if on_start is not None:
        on_start()
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_tmp(run_dir):
        log.info("removed %s, left by an interrupted write", stale)
    train_y = data.splits["train"].y.to(device)
    val_y = data.splits["val"].y[: tcfg.n_val_eval].to(device)
    scale = data.scale().to(device)
    T, L = data.n_steps, cfg.data.context
    bar = tqdm(
        total=tcfg.steps, initial=state.step, disable=not progress, desc=run_dir.name, leave=False
    )
    if state.step == 0 and not state.history:  # the initial model is a candidate too
        val0 = val_score(model, val_y, scale, L, 4 * tcfg.batch_size)
        state.history.append({"step": 0, "phase": "init", "time": 0.0, "val": val0})
        _keep_if_best(run_dir, model, state, val0)
    start = time.perf_counter() - state.elapsed
    stopped, in_a_row = "", 0
    while state.step < tcfg.steps:
        frac = _progress(tcfg, state.step, time.perf_counter() - start)
        if frac >= 1.0:
            break
        idx = torch.randint(
            len(train_y), (min(tcfg.batch_size, len(train_y)),), generator=batch_rng
        )
        teacher = frac < tcfg.teacher_forced_fraction
        p = _teacher_prob(tcfg, frac)
        loss = step_loss(
            model,
            train_y[idx.to(device)],
            scale,
            context=T if teacher else L,
            teacher_prob=0.0 if teacher else p,
            generator=gen,
            loss=tcfg.loss,
            penalty_weight=tcfg.penalty_weight,
            horizon=0 if teacher else tcfg.loss_horizon,
        )
        # a loss or gradient that is not finite (a rollout that blew up): skip the batch
        if not (torch.isfinite(loss) and opt.step(loss, frac)):
            state.skipped += 1
            in_a_row += 1
            log.warning(
                "%s: step %d: non-finite loss or gradient (loss %s), batch skipped (%d so far)",
                run_dir.name, state.step, loss.item(), state.skipped,
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
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3g}", phase="tf" if teacher else f"ar p={p:.2f}")
        record = {
            "step": state.step,
            "loss": loss,
            "phase": "teacher" if teacher else "auto",
            "time": time.perf_counter() - start,
        }
        if state.step % tcfg.eval_every == 0 or state.step == tcfg.steps:
            record["val"] = val_score(model, val_y, scale, L, 4 * tcfg.batch_size)
            _keep_if_best(run_dir, model, state, record["val"])
        state.history.append(record)
        state.elapsed = time.perf_counter() - start
        if "val" in record:
            _checkpoint(run_dir, model, opt, state, gen, batch_rng)
    bar.close()
    if state.best_step < 0 or state.history and "val" not in state.history[-1]:
        record_val = val_score(model, val_y, scale, L, 4 * tcfg.batch_size)
        if state.history:
            state.history[-1]["val"] = record_val
        _keep_if_best(run_dir, model, state, record_val)
    _checkpoint(run_dir, model, opt, state, gen, batch_rng)
    if stopped:
        log.warning("%s: training stopped early: %s", run_dir.name, stopped)
    return _write_summary(run_dir, state, model, mcfg, stopped)


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
    """Load last.pt into the model, optimiser and generators; return the training state."""
    ckpt = load_checkpoint(path)
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


def _keep_if_best(run_dir: Path, model: nn.Module, state: TrainState, val: float) -> None:
    """Save best.pt when `val` beats the best so far (an inf score never wins, but keep one)."""
    if val < state.best_val or state.best_step < 0:
        state.best_val, state.best_step = val, state.step
        save_atomic({"model": model.state_dict(), "step": state.step}, run_dir / "best.pt")


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


def _write_summary(
    run_dir: Path, state: TrainState, model: nn.Module, mcfg: ModelConfig, stopped: str = ""
) -> dict:
    summary = {
        "steps": state.step,
        "train_seconds": state.elapsed,
        "best_val": state.best_val,
        "best_step": state.best_step,
        "n_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        "skipped_batches": state.skipped,
        "stopped": stopped,
    }
    write_json_atomic(run_dir / "history.json", state.history, indent=None)
    write_json_atomic(run_dir / "train_summary.json", summary)
    _plot_loss(run_dir, state.history)
    return summary


def _plot_loss(run_dir: Path, history: list[dict]) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
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
    plt.close(fig)
