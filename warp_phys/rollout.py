"""WARP's forecast loop: one explicit step object, and the loop's own backward.

The forecast steps feed each prediction back as the next input, so they run one at a time:

    x_t = the truth (per sample, with probability p) or the previous mean m_{t-1}
    h_t = A h_{t-1} + [ψ_t, Δτ] V            ψ_t = x_t - x_{t-1} by default (a root may say)
    θ_t = base + h_t (anchored) or h_t;      (m_t, s_t) = root(θ_t, τ_{t+1}, x_t)

`ForecastStep` holds what one step needs of the model (the drive map, the input map, the root's
evaluation, the transition's prepared operator) and runs the loop; `_Rollout` runs that loop
without autograd and differentiates it by hand, from the same step object, in segments of
steps from the end: per step the root's vector-Jacobian product (by local autograd on a small
graph), the input map's and the feed's by hand, and one product with Aᵀ; dL/dA and dL/dB once
per segment, one wide product each. With `checkpoint_every=K` only every K-th state is kept
and each segment's states are recomputed in the backward. Recording the loop with autograd
instead (the reference) would keep a (B, Dp) graph node per step and multiply by A per step
again in the backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from warp_phys.forecaster import feed_mask, select
from warp_phys.precision import grad_precision
from warp_phys.scan import prepare

if TYPE_CHECKING:
    from warp_phys.warp import WARP

DR_SEGMENT = 32  # forecast steps per batched dL/dA product in the rollout's backward


class Spec(NamedTuple):
    """What a pass over ys needs besides the tensors it differentiates."""

    ys: Tensor  # (B, T, S) the truth
    tau: Tensor  # (T-1,) τ_{t+1}
    dtau: float
    L: int  # steps t < L are teacher-forced
    p: float  # teacher-forcing probability of the forecast steps
    generator: torch.Generator | None
    precision: str  # of the dense products


class Steps(NamedTuple):
    """Per-step results of the forecast loop (lists over t = L..T-2)."""

    means: list  # (B, 1, S)
    stds: list  # (B, 1, S) or None
    thetas: list  # (B, 1, Dp), when asked
    fed: list  # (B, 1, S), when asked
    masks: list  # which samples were fed the truth: (B,) bool, or True / False for all


class ForecastStep:
    """One forecast step of a `WARP` model, for the loop and its backward alike."""

    def __init__(self, model: WARP, spec: Spec) -> None:
        self.spec = spec
        self.root = model.root
        self.root_step = model.root_step  # (θ, τ, x) -> (mean, std), compiled when asked
        self.input_map = model.input_map  # B (D, n_inputs)
        self.time_map = model.time_map  # B_τ (D,) or None
        self.V = model.drive_map()  # (n_inputs[+1], Dp)
        self.drive_rows = model.drive_rows  # (ψ, Δτ) -> U (B, n_inputs[+1])
        self.n_weights = model.n_weights
        self.hold = model.hold_after_context
        self.checkpoint_every = model.runtime.checkpoint_every

    def root_params(self) -> list[Tensor]:
        return [p for p in self.root.parameters() if p.requires_grad]

    def graph(self, theta: Tensor, tau: Tensor, x: Tensor) -> tuple:
        """Evaluate the root at leaves θ ``(B, Dp)``, x ``(B, S)`` with autograd on; return
        (θ leaf, x leaf, mean, std)."""
        with torch.enable_grad():
            theta = theta.detach().requires_grad_()
            x = x.detach().requires_grad_()
            mean, std = self.root_step(theta, tau, x)
        return theta, x, mean, std

    def run(
        self,
        h: Tensor,
        m: Tensor,
        base,
        lin,
        anchor,
        *,
        keep: bool = False,
        graphs: list | None = None,
        on_state=None,
    ) -> Steps:
        """Run the forecast steps t = L..T-2 from the state h = h_{L-1} and mean m_{L-1}.

        `graphs` receives the root's autograd graph at each step (`graph`); `on_state(i, h, x)`
        sees each new state and the value fed (i = t - L).
        """
        spec = self.spec
        ys = spec.ys
        B = ys.shape[0]
        out = Steps([], [], [], [], [])
        x_prev = ys[:, spec.L - 1]
        default = self.root.default_drive
        m_win = self.root.input_window
        # the last m - 1 fed values before step L (x_0 repeated before the start)
        past = [ys[:, max(spec.L - m_win + 1 + j, 0)] for j in range(m_win - 1)]
        times = [max(spec.L - m_win + 1 + j, 0) * spec.dtau for j in range(m_win - 1)]
        for i, t in enumerate(range(spec.L, ys.shape[1] - 1)):
            mask = feed_mask(B, spec.p, spec.generator, ys.device)
            x = select(mask, ys[:, t], m)  # (B, S)
            window, tau_w = past + [x], times + [t * spec.dtau]  # m fed values, x_t last
            past, times = window[1:], tau_w[1:]
            if not self.hold:
                if default:
                    psi = x - x_prev
                else:
                    tau_w = ys.new_tensor(tau_w).expand(B, -1)  # (B, m)
                    psi = self.root.inputs(tau_w, torch.stack(window, 1))  # (B, n_inputs)
                U = self.drive_rows(psi, spec.dtau)  # (B, n_inputs[+1])
                h = lin.apply(h, anchor, update=(U, self.V))  # (B, Dp)
            theta = h if base is None else base + h
            if graphs is None:
                m, s = self.root_step(theta, spec.tau[t].expand(B), x)
            else:
                graphs.append(self.graph(theta, spec.tau[t].expand(B), x))
                m, s = (None if v is None else v.detach() for v in graphs[-1][2:])
            out.means.append(m.unsqueeze(1))
            out.stds.append(None if s is None else s.unsqueeze(1))
            out.masks.append(mask)
            if keep:
                out.thetas.append(theta.unsqueeze(1))
                out.fed.append(x.unsqueeze(1))
            if on_state is not None:
                on_state(i, h, x)
            x_prev = x
        return out

    def recompute(self, lin, anchor, h: Tensor, xs: Tensor, i0: int, i1: int) -> Tensor:
        """Return the states h_{i0-1}..h_{i1-1} ``(k+1, B, Dp)`` of a checkpointed segment,
        recomputed from h_{i0-1} with the forward's operator, anchor and fed values."""
        H = h.new_empty(i1 - i0 + 1, *h.shape)
        H[0] = h
        for i in range(i0, i1):
            U = self.drive_rows(xs[i + 1] - xs[i], self.spec.dtau)
            h = lin.apply(h, anchor, update=(U, self.V), out=H[i - i0 + 1])
        return H


class _Rollout(torch.autograd.Function):
    """`ForecastStep.run` with its own backward (the paper's drive ψ = Δx only).

    Forward: the loop without autograd, keeping h_t (every state, or every K-th with
    `checkpoint_every`), the fed values, the teacher-forcing masks and, unless checkpointing,
    the root's small autograd graph of each step. Backward, in segments of steps from the
    end (recomputing a checkpointed segment's states): per step the root's vector-Jacobian
    product, the input map's and the feed's by hand, and one product with Aᵀ; dL/dA and
    dL/dB once per segment, one wide product each.
    """

    @staticmethod
    def forward(ctx, step: ForecastStep, op_type, n_op, h, m, base, *tensors):
        spec = step.spec
        op = op_type(*tensors[:n_op])
        lin = prepare(op, spec.precision)
        anchor = lin.anchor(h)
        B, Dp = h.shape
        n = spec.ys.shape[1] - 1 - spec.L
        K = step.checkpoint_every
        ckpts = [h]  # h_{L-1+i} for i = 0, K, 2K, ... (every i without checkpointing)
        xs = spec.ys.new_empty(n + 1, B, spec.ys.shape[-1])  # x_{L-1+i}, i = 0..n
        xs[0] = spec.ys[:, spec.L - 1]

        def on_state(i, h_i, x_i):
            xs[i + 1] = x_i
            if not K or (i + 1) % K == 0:
                ckpts.append(h_i)

        # without checkpointing each step's root graph is kept (its weights are views of the
        # state, nothing copied) and differentiated in the backward, not recomputed
        graphs = [] if not K and base is None else None
        out = step.run(h, m, base, lin, anchor, graphs=graphs, on_state=on_state)
        ctx.graphs = graphs
        ctx.step, ctx.op_type, ctx.n_op = step, op_type, n_op
        ctx.lin, ctx.anchor, ctx.masks, ctx.has_base = lin, anchor, out.masks, base is not None
        ctx.save_for_backward(xs, base, *tensors, *ckpts)
        ctx.n_ckpt = len(ckpts)
        mean = torch.cat(out.means, 1)  # (B, n, S)
        std = mean.new_empty(0) if out.stds[0] is None else torch.cat(out.stds, 1)
        return mean, std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_std):
        step = ctx.step
        spec = step.spec
        xs, base, *rest = ctx.saved_tensors
        ckpts = rest[len(rest) - ctx.n_ckpt :]
        tensors = rest[: len(rest) - ctx.n_ckpt]
        op_tensors, params = tensors[: ctx.n_op], tensors[ctx.n_op :]
        op = ctx.op_type(*op_tensors)
        gprec = grad_precision(spec.precision)
        linT = prepare(op.transpose(), gprec)
        root_params = step.root_params()
        n, B, S = xs.shape[0] - 1, xs.shape[1], xs.shape[2]
        Dp, D = ckpts[0].shape[-1], step.n_weights
        W = step.input_map  # (D, S)
        gh = torch.zeros_like(ckpts[0])  # dL/dh_i, carried backwards
        gm = torch.zeros_like(g_mean[:, 0])  # dL/dm_{i-1} through the feed of step i
        gx_next = torch.zeros_like(gm)  # dL/dx_i through the input of step i + 1
        g_base = torch.zeros_like(base) if ctx.has_base else None
        g_op = [torch.zeros_like(t) for t in op_tensors]
        g_params = [torch.zeros_like(p) for p in params]
        g_root = g_params[len(params) - len(root_params) :]
        K = step.checkpoint_every or DR_SEGMENT
        for i0 in reversed(range(0, n, K)):
            i1 = min(i0 + K, n)
            if step.checkpoint_every:
                H = step.recompute(ctx.lin, ctx.anchor, ckpts[i0 // K], xs, i0, i1)
            else:
                H = torch.stack(ckpts[i0 : i1 + 1])  # (k + 1, B, Dp): h_{i0-1}..h_{i1-1}
            G = gh.new_empty(i1 - i0, B, Dp)  # dL/dh_i over the segment
            for i in reversed(range(i0, i1)):
                if ctx.graphs is not None:
                    graph = ctx.graphs.pop()
                else:
                    h_i = H[i - i0 + 1]
                    theta = h_i if base is None else base + h_i
                    graph = step.graph(theta, spec.tau[spec.L + i].expand(B), xs[i + 1])
                g_std_i = g_std[:, i] if g_std.numel() else None
                g_theta, g_x, g_p = _root_vjp(graph, g_mean[:, i] + gm, g_std_i, root_params)
                gh = torch.add(gh, g_theta, out=G[i - i0])
                if g_base is not None:
                    g_base += g_theta
                for acc, g in zip(g_root, g_p, strict=True):
                    if g is not None:
                        acc += g
                g_dx = gh[:, :D] @ W  # (B, S): through u_i = W (x_i - x_{i-1})
                g_xi = g_dx + gx_next if g_x is None else g_x + g_dx + gx_next
                gx_next = -g_dx
                mask = ctx.masks[i]  # x_i = truth where mask, else m_{i-1}
                if mask is True:
                    gm = torch.zeros_like(g_xi)
                else:
                    gm = g_xi if mask is False else g_xi * (~mask).unsqueeze(-1)
                gh = linT.apply(gh)  # dL/dh_{i-1} through h_i = A h_{i-1} + u_i
            for acc, g in zip(g_op, op.param_grads(G, H[:-1], gprec), strict=True):
                acc += g
            dx = (xs[i0 + 1 : i1 + 1] - xs[i0:i1]).reshape(-1, S)  # (k B, S)
            G2 = G.view(-1, Dp)  # (k B, Dp); padding sliced off the small results, no copy
            g_params[0] += (G2.mT @ dx)[:D]  # dL/dW, (D, S)
            if step.time_map is not None:
                g_params[1] += spec.dtau * G2.sum(0)[:D]
        return (None, None, None, gh, gm, g_base, *g_op, *g_params)


def _root_vjp(graph: tuple, g_mean: Tensor, g_std: Tensor | None, root_params: list) -> tuple:
    """Return dL/dθ ``(B, Dp)``, dL/dx ``(B, S)`` (or None) and dL/d(root parameters) of one
    root evaluation `ForecastStep.graph`, given dL/dmean and dL/dstd."""
    theta, x, mean, std = graph
    outs, gouts = [mean], [g_mean]
    if std is not None and g_std is not None:
        outs.append(std)
        gouts.append(g_std)
    grads = torch.autograd.grad(outs, [theta, x, *root_params], gouts, allow_unused=True)
    g_theta = grads[0] if grads[0] is not None else torch.zeros_like(theta)
    return g_theta, grads[1], grads[2:]
