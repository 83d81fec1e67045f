"""The forecast loop of `WARP` with its own backward: a rollout differentiated by hand.

The forecast steps feed each prediction back as the next input, so they run one at a time;
recording them with autograd keeps a (B, Dp) graph node per step and multiplies by A per
step again in the backward. `_Rollout` runs the loop without autograd and differentiates it
in segments of steps from the end: per step the root's vector-Jacobian product (by local
autograd on a small graph), the input map's and the feed's by hand, and one product with Aᵀ;
dL/dA and dL/dB once per segment, one wide product each. With `checkpoint_every=K` only
every K-th state is kept and each segment's states are recomputed in the backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from warp_phys.precision import grad_precision
from warp_phys.scan import prepare

if TYPE_CHECKING:
    from warp_phys.warp import WARP

DR_SEGMENT = 32  # forecast steps per batched dL/dA product in the rollout's backward


class _Rollout(torch.autograd.Function):
    """The forecast loop of `WARP._forecast` with its own backward.

    Forward: the loop without autograd, keeping h_t (every state, or every K-th with
    `checkpoint_every`), the fed values, the teacher-forcing masks and, unless checkpointing,
    the root's small autograd graph of each step. Backward, in segments of steps from the
    end (recomputing a checkpointed segment's states): per step the root's vector-Jacobian
    product, the input map's and the feed's by hand, and one product with Aᵀ; dL/dA and
    dL/dB once per segment, one wide product each.
    """

    @staticmethod
    def forward(ctx, model, spec, op_type, n_op, h, m, base, *tensors):
        op = op_type(*tensors[:n_op])
        lin = prepare(op, spec.precision)
        anchor = lin.anchor(h)
        B, Dp = h.shape
        n = spec.ys.shape[1] - 1 - spec.L
        K = model.runtime.checkpoint_every
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
        out = model._forecast(spec, h, m, base, lin, anchor, graphs=graphs, on_state=on_state)
        ctx.graphs = graphs
        ctx.model, ctx.spec, ctx.op_type, ctx.n_op = model, spec, op_type, n_op
        ctx.lin, ctx.anchor, ctx.masks, ctx.has_base = lin, anchor, out.masks, base is not None
        ctx.save_for_backward(xs, base, *tensors, *ckpts)
        ctx.n_ckpt = len(ckpts)
        mean = torch.cat(out.means, 1)  # (B, n, S)
        std = mean.new_empty(0) if out.stds[0] is None else torch.cat(out.stds, 1)
        return mean, std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_mean, g_std):
        model, spec = ctx.model, ctx.spec
        xs, base, *rest = ctx.saved_tensors
        ckpts = rest[len(rest) - ctx.n_ckpt :]
        tensors = rest[: len(rest) - ctx.n_ckpt]
        op_tensors, params = tensors[: ctx.n_op], tensors[ctx.n_op :]
        op = ctx.op_type(*op_tensors)
        gprec = grad_precision(spec.precision)
        linT = prepare(op.transpose(), gprec)
        root_params = [p for p in model.root.parameters() if p.requires_grad]
        n, B, S = xs.shape[0] - 1, xs.shape[1], xs.shape[2]
        Dp, D = ckpts[0].shape[-1], model.n_weights
        W = model.input_map  # (D, S)
        gh = torch.zeros_like(ckpts[0])  # dL/dh_i, carried backwards
        gm = torch.zeros_like(g_mean[:, 0])  # dL/dm_{i-1} through the feed of step i
        gx_next = torch.zeros_like(gm)  # dL/dx_i through the input of step i + 1
        g_base = torch.zeros_like(base) if ctx.has_base else None
        g_op = [torch.zeros_like(t) for t in op_tensors]
        g_params = [torch.zeros_like(p) for p in params]
        g_root = g_params[len(params) - len(root_params) :]
        K = model.runtime.checkpoint_every or DR_SEGMENT
        for i0 in reversed(range(0, n, K)):
            i1 = min(i0 + K, n)
            if model.runtime.checkpoint_every:
                H = _recompute(ctx, ckpts[i0 // K], xs, i0, i1)
            else:
                H = torch.stack(ckpts[i0 : i1 + 1])  # (k + 1, B, Dp): h_{i0-1}..h_{i1-1}
            G = gh.new_empty(i1 - i0, B, Dp)  # dL/dh_i over the segment
            for i in reversed(range(i0, i1)):
                if ctx.graphs is not None:
                    graph = ctx.graphs.pop()
                else:
                    h_i = H[i - i0 + 1]
                    theta = h_i if base is None else base + h_i
                    graph = _root_graph(model, theta, spec.tau[spec.L + i].expand(B), xs[i + 1])
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
            if model.time_map is not None:
                g_params[1] += spec.dtau * G2.sum(0)[:D]
        return (None, None, None, None, gh, gm, g_base, *g_op, *g_params)


def _recompute(ctx, h: Tensor, xs: Tensor, i0: int, i1: int) -> Tensor:
    """Return the states h_{i0-1}..h_{i1-1} ``(k+1, B, Dp)`` of a checkpointed segment,
    recomputed from h_{i0-1} with the forward's operator, anchor and fed values."""
    model, spec = ctx.model, ctx.spec
    H = h.new_empty(i1 - i0 + 1, *h.shape)
    H[0] = h
    V = model._drive_map()
    for i in range(i0, i1):
        U = model._drive_rows(xs[i + 1] - xs[i], spec.dtau)
        h = ctx.lin.apply(h, ctx.anchor, update=(U, V), out=H[i - i0 + 1])
    return H


def _root_graph(model: WARP, theta: Tensor, tau: Tensor, x: Tensor) -> tuple:
    """Evaluate the root at leaves θ ``(B, Dp)``, x ``(B, S)`` with autograd on; return
    (θ leaf, x leaf, mean, std)."""
    with torch.enable_grad():
        theta = theta.detach().requires_grad_()
        x = x.detach().requires_grad_()
        mean, std = model._root_step(theta, tau, x)
    return theta, x, mean, std


def _root_vjp(graph: tuple, g_mean: Tensor, g_std: Tensor | None, root_params: list) -> tuple:
    """Return dL/dθ ``(B, Dp)``, dL/dx ``(B, S)`` (or None) and dL/d(root parameters) of one
    root evaluation `_root_graph`, given dL/dmean and dL/dstd."""
    theta, x, mean, std = graph
    outs, gouts = [mean], [g_mean]
    if std is not None and g_std is not None:
        outs.append(std)
        gouts.append(g_std)
    grads = torch.autograd.grad(outs, [theta, x, *root_params], gouts, allow_unused=True)
    g_theta = grads[0] if grads[0] is not None else torch.zeros_like(theta)
    return g_theta, grads[1], grads[2:]
