"""Optimiser presets: a fast default (Adam, cosine decay, norm clip) and the paper's recipe.

The paper's recipe (notes/paper-notes.md), as the official code runs it: elementwise gradient
clipping to ±1e-7, AdaBelief (lr 1e-5, eps 1e-16), and reduce-on-plateau on the training loss
averaged over windows of 50 steps: after 20 windows without improvement the rate halves, never
below 1e-2 times the initial rate (`WindowedPlateau`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from warp_phys.config import TrainConfig
from warp_phys.errors import UserError

OPTIMIZERS = ("adam", "paper")


class AdaBelief(torch.optim.Optimizer):
    """AdaBelief (Zhuang et al. 2020): Adam with the second moment of (g − m) instead of g."""

    def __init__(self, params: Iterable[Tensor], lr=1e-3, betas=(0.9, 0.999), eps=1e-16) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["s"] = torch.zeros_like(p)
                state["step"] += 1
                m, s, g = state["m"], state["s"], p.grad
                m.lerp_(g, 1 - b1)
                s.mul_(b2).addcmul_(g - m, g - m, value=1 - b2).add_(group["eps"])
                bc1 = 1 - b1 ** state["step"]
                bc2 = 1 - b2 ** state["step"]
                denom = (s / bc2).sqrt_().add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / bc1)


class WindowedPlateau:
    """Reduce-on-plateau on the mean training loss of windows of `window` steps: after
    `patience` windows without a relative improvement of `threshold`, multiply the rate by
    `factor`, never going below `floor` times the initial rate."""

    def __init__(
        self,
        opt: torch.optim.Optimizer,
        *,
        window: int = 50,
        patience: int = 20,
        factor: float = 0.5,
        floor: float = 1e-2,
        threshold: float = 1e-4,
    ) -> None:
        self.opt, self.window, self.patience = opt, window, patience
        self.factor, self.threshold = factor, threshold
        self.min_lr = [floor * g["lr"] for g in opt.param_groups]
        self.total, self.count = 0.0, 0  # the current window
        self.best, self.bad = math.inf, 0  # the best window mean, windows since

    def step(self, loss: float) -> None:
        self.total, self.count = self.total + loss, self.count + 1
        if self.count < self.window:
            return
        mean, self.total, self.count = self.total / self.count, 0.0, 0
        if mean < self.best * (1 - self.threshold):
            self.best, self.bad = mean, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            for group, low in zip(self.opt.param_groups, self.min_lr, strict=True):
                group["lr"] = max(group["lr"] * self.factor, low)
            self.bad = 0

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("min_lr", "total", "count", "best", "bad")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class Optimiser:
    """An optimiser with its schedule and gradient clipping, as one checkpointable object."""

    def __init__(self, cfg: TrainConfig, params: list[nn.Parameter]) -> None:
        if cfg.optimizer not in OPTIMIZERS:
            raise UserError(
                f"unknown optimizer {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        self.cfg = cfg
        self.params = params
        if cfg.optimizer == "paper":
            self.opt = AdaBelief(params, lr=cfg.lr, eps=1e-16)
            self.plateau = WindowedPlateau(self.opt)
        else:
            self.opt = torch.optim.Adam(params, lr=cfg.lr)
            self.plateau = None

    def step(self, loss: Tensor, progress: float) -> bool:
        """Backpropagate `loss`, clip, update at the schedule's learning rate.

        Return False, with no update, when the gradient is not finite.
        """
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.plateau is not None:
            if not all(torch.isfinite(p.grad).all() for p in self.params if p.grad is not None):
                return False
            torch.nn.utils.clip_grad_value_(self.params, 1e-7)
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
            if not math.isfinite(norm):
                return False
            lr = self.cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in self.opt.param_groups:
                group["lr"] = lr
        self.opt.step()
        if self.plateau is not None:
            self.plateau.step(float(loss.detach()))
        return True

    def state_dict(self) -> dict:
        return {
            "opt": self.opt.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])
