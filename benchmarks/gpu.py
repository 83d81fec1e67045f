"""GPU speed, memory and accuracy of the WARP core at the paper's scale (issue 5).

    python benchmarks/gpu.py --out DIR [--tiny] [--device cuda|cpu] [--only SECTIONS]

Writes DIR/gpu.json (rewritten after every measurement, so a crash keeps what was done) and
DIR/gpu.md (tables, targets PASS/FAIL). Needs torch, numpy and this repository only (no
zarr, no install: the repository root is put on sys.path). Under 5 minutes on one H100;
`--tiny` shrinks every size so that it runs on a CPU in seconds (the test suite does).

Sections (`--only mm,scan,accuracy,paper,profile,long,compile`, default all):

- mm: matrix-multiply rate of (1024 x 4992) x (4992 x 4992) in fp32, tf32, bf16, fp16, and
  at the awkward size 4898, as TFLOP/s.
- scan: the teacher-forced linear recurrence at (batch, T, Dθ) = (8, 4096, 1030) and
  (64, 1024, 1030), Dθ as is and padded to 1152: the eager Python loop (autograd through
  T steps) against `warp_phys.scan` (sequential, chunked, doubling, auto), forward and
  forward + backward, per precision, with the error against a float64 loop.
- accuracy: the paper's MSD model (batch 1024, T 256, root 1-48x3-2 so Dθ = 4898, dense
  A = I + Ã with Ã ~ N(0, a_scale²), hypernet φ, 45.3M parameters) against a float64 copy:
  teacher-forced θ trajectories (target 1e-5 relative) and the loss of one autoregressive
  training step with teacher forcing 0.25 (target 1e-4), per precision.
- paper: at that scale, per precision, in ms (median after warm-up, CUDA events) with peak
  memory: autoregressive training step (forward, backward, Adam) at batch 1024 and 128,
  inference rollout with context 100 at batch 1024, teacher-forced training step at batch
  1024; each eager and captured as one CUDA graph (`GraphedStep`).
- profile: one eager autoregressive step at batch 1024 and 128 under the torch profiler,
  the costliest kernels in DIR/profile_ar_b1024.txt and DIR/profile_ar_b128.txt.
- long: batch 1024 at T 1024, autoregressive and teacher-forced steps, with
  `checkpoint_every` (must fit in 40 GB) and without.
- compile: the autoregressive step at batch 128 and 1024 with the root compiled.

Targets (H100): autoregressive step <= 90 ms at batch 1024, <= 30 ms at 128; rollout <= 30 ms
at 1024; teacher-forced scan >= 30x the eager loop at (8, 4096, 1030); float32-level
accuracy. The official JAX code on the same card: 454 / 136 / 143 ms.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from warp_phys.priors.blackbox import BlackBoxRoot  # noqa: E402

from warp_phys.runtime import GPU_PRECISION, Runtime  # noqa: E402
from warp_phys.scan import DenseOp, choose_method, scan, scan_reference  # noqa: E402
from warp_phys.warp import WARP  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
OFFICIAL_MS = {"ar_b1024": 454.0, "ar_b128": 136.0, "rollout_b1024": 143.0}
TARGET_MS = {"ar_b1024": 90.0, "ar_b128": 30.0, "rollout_b1024": 30.0}
TARGET_SCAN_RATIO = 30.0
TARGET_THETA_REL, TARGET_LOSS_REL = 1e-5, 1e-4
TARGET_LONG_GB = 40.0
SECTIONS = ("mm", "scan", "accuracy", "paper", "profile", "long", "compile")
SECTION_COST = {"compile": 75}  # seconds a section needs at least (compilation)

FULL = dict(
    mm=(1024, 4992, 4898),
    scans=[(8, 4096, 1030), (64, 1024, 1030)],
    scan_pad=128,
    width=48,
    depth=3,
    B=1024,
    B_small=128,
    B_acc=64,
    T=256,
    context=100,
    T_long=1024,
    ckpt=32,
    pad_to=128,
    warmup=2,
    reps=5,
)
TINY = dict(
    mm=(64, 128, 120),
    scans=[(2, 64, 40), (4, 32, 40)],
    scan_pad=16,
    width=8,
    depth=1,
    B=16,
    B_small=4,
    B_acc=4,
    T=24,
    context=10,
    T_long=48,
    ckpt=8,
    pad_to=16,
    warmup=1,
    reps=2,
)


# -- timing -----------------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, warmup: int, reps: int, max_s: float = 3.0) -> dict:
    """Run fn `warmup` times, then time `reps` runs (at least 2, fewer than `reps` once they
    take `max_s` seconds); return median/min ms and peak GB."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        if len(times) >= 2 and sum(times) > 1e3 * max_s:
            break
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {
        "ms": statistics.median(times),
        "min_ms": min(times),
        "reps": len(times),
        "peak_gb": peak,
    }


class GraphedStep:
    """One step (`body()`: forward, and backward and optimiser step when training) as a
    callable returning the loss. With graph=True the first `warmup` calls run eagerly on a
    side stream, the next one captures `body` as a CUDA graph (then replays it), every later
    call replays it: the launch overhead of hundreds of small kernels per step disappears.
    Every call is one real step. `opt`'s gradients are set to None before each eager step and
    before the capture, so that backward allocates them in the graph's memory pool.
    """

    def __init__(self, body, opt=None, *, graph: bool, warmup: int = 2) -> None:
        self.body, self.opt, self.graph = body, opt, graph
        self.warmup = max(1, warmup)
        self.calls, self.g, self.out = 0, None, None

    def _zero(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    def __call__(self):
        self.calls += 1
        if not self.graph:
            self._zero()
            return self.body()
        if self.g is not None:
            self.g.replay()
            return self.out
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._zero()
                out = self.body()
            torch.cuda.current_stream().wait_stream(side)
            return out
        self.g = torch.cuda.CUDAGraph()
        self._zero()
        with torch.cuda.graph(self.g):
            self.out = self.body()
        self.g.replay()
        return self.out

    def close(self) -> None:
        """Drop the graph and the gradients held in its pool."""
        self._zero()
        self.g = self.out = None


# -- results ----------------------------------------------------------------------------------
class Results:
    """The JSON document, rewritten after every measurement."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out = out
        self.data = {"meta": meta, **{s: {} for s in SECTIONS}, "summary": {}}
        out.mkdir(parents=True, exist_ok=True)
        self.flush()

    def flush(self) -> None:
        tmp = self.out / "gpu.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.out / "gpu.json")

    def run(self, section: str, key: str, fn, dev: torch.device):
        """Record fn()'s dict under data[section][key]; an error (OOM included) is recorded
        and the benchmark goes on."""
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - one failure must not stop the rest
            oom = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err)
            value = {"error": ("OOM: " if oom else "") + f"{type(err).__name__}: {err}"[:500]}
            if not oom:
                value["traceback"] = traceback.format_exc()[-2000:]
            print(f"  {section}/{key}: {value['error'][:200]}", flush=True)
        finally:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
        value["wall_s"] = round(time.perf_counter() - t0, 2)
        self.data[section][key] = value
        self.flush()
        return value


# -- matmul rate ------------------------------------------------------------------------------
def bench_mm(sizes: dict, dev: torch.device) -> dict:
    M, N, N_awk = sizes["mm"]
    out = {}
    for n in (N, N_awk):
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(M, n, generator=g).to(dev)
        b = torch.randn(n, n, generator=g).to(dev)
        for p in PRECISIONS:
            if p in ("bf16", "fp16"):
                dt = torch.bfloat16 if p == "bf16" else torch.float16
                x, y = a.to(dt), b.to(dt)

                def fn(x=x, y=y):
                    return x @ y

            else:

                def fn(p=p, a=a, b=b):
                    with _fp32_mode(p, dev):
                        return a @ b

            r = timed(fn, dev, 3, 10 if dev.type == "cuda" else 2)
            r["tflops"] = 2 * M * n * n / (r["ms"] * 1e-3) / 1e12
            out[f"{M}x{n}x{n} {p}"] = r
    return out


def _fp32_mode(p: str, dev: torch.device):
    from warp_phys.precision import _mode

    return _mode(p, torch.empty(0, device=dev))


# -- scan -------------------------------------------------------------------------------------
def scan_inputs(B: int, T: int, D: int, pad: int, a_scale: float, dev: torch.device):
    """A trained-looking A = I + Ã (Ã ~ N(0, a_scale²)), θ_0 like the root's init, small
    inputs; zero-padded to a multiple of `pad`. float64 on `dev`."""
    g = torch.Generator(device="cpu").manual_seed(0)
    R = a_scale * torch.randn(D, D, generator=g, dtype=torch.float64)
    h0 = 0.3 * (torch.rand(B, D, generator=g, dtype=torch.float64) - 0.5)
    u = 1e-3 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    Dp = -(-D // pad) * pad
    if Dp > D:
        R = torch.nn.functional.pad(R, (0, Dp - D, 0, Dp - D))
        h0 = torch.nn.functional.pad(h0, (0, Dp - D))
        u = torch.nn.functional.pad(u, (0, Dp - D))
    return R.to(dev), h0.to(dev), u.to(dev)


def bench_scan(B, T, D, pad, sizes, dev, a_scale, res: Results, precisions) -> None:
    R64, h064, u64 = scan_inputs(B, T, D, pad, a_scale, dev)
    Dp = R64.shape[0]
    tag = f"({B}, {T}, {D})" + (f" padded {Dp}" if Dp > D else "")
    with torch.no_grad():
        ref = scan_reference(DenseOp(R64), u64, h064)
    R, h0, u = R64.float(), h064.float(), u64.float()
    w = torch.randn(B, T, Dp, device=dev)
    del u64, h064
    reps = sizes["reps"]

    def err(got):
        return float((got.double() - ref).norm() / ref.norm())

    def fwd_bwd(fn):
        leaves = [t.clone().requires_grad_() for t in (R, u, h0)]

        def run():
            for leaf in leaves:
                leaf.grad = None
            (fn(DenseOp(leaves[0]), leaves[1], leaves[2]) * w).sum().backward()

        return run

    def eager():
        with torch.no_grad(), _fp32_mode("fp32", dev):
            r = timed(lambda: scan_reference(DenseOp(R), u, h0), dev, 1, max(1, reps // 2))
            r["err"] = err(scan_reference(DenseOp(R), u, h0))
        with _fp32_mode("fp32", dev):
            r["fwd_bwd"] = timed(fwd_bwd(scan_reference), dev, 1, max(1, reps // 2))
        return r

    loop = res.run("scan", f"{tag} eager loop", eager, dev)
    auto = choose_method(DenseOp(R), B, T, Dp, R.device)
    for p in precisions:
        for m in ("sequential", "chunked", "doubling"):

            def case(m=m, p=p):
                def fwd():
                    return scan(DenseOp(R), u, h0, method=m, precision=p)

                with torch.no_grad():
                    r = timed(fwd, dev, 1, reps, 1.5)
                    r["err"] = err(fwd())
                fn = fwd_bwd(lambda o, x, h: scan(o, x, h, method=m, precision=p))
                r["fwd_bwd"] = timed(fn, dev, 1, reps, 1.5)
                if dev.type == "cuda":  # the same, captured as one CUDA graph
                    with torch.no_grad():
                        g = GraphedStep(fwd, graph=True, warmup=1)
                        r["graph"] = timed(g, dev, 2, reps, 1.5)
                        g.close()
                    g = GraphedStep(fn, graph=True, warmup=1)
                    r["fwd_bwd_graph"] = timed(g, dev, 2, reps, 1.5)
                    g.close()
                r["auto"] = m == auto
                if "ms" in loop:
                    r["ratio_fwd"] = loop["ms"] / r["ms"]
                    r["ratio_fwd_bwd"] = loop["fwd_bwd"]["ms"] / r["fwd_bwd"]["ms"]
                return r

            res.run("scan", f"{tag} {m} {p}", case, dev)


# -- the paper's model ------------------------------------------------------------------------
def msd_data(B: int, T: int, dev: torch.device, seed: int = 0) -> torch.Tensor:
    """Mass-spring-damper trajectories in closed form (the paper's MSD: x_0 = (1, 0), t in
    [0, 1], m ~ U(0.02, 0.04), k ~ U(4, 16), c ~ U(0.01, 0.2), not normalised), (B, T, 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    m, k, c = (
        lo + (hi - lo) * torch.rand(B, 1, generator=g, dtype=torch.float64)
        for lo, hi in ((0.02, 0.04), (4.0, 16.0), (0.01, 0.2))
    )
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    w0, gam = torch.sqrt(k / m), c / (2 * m)
    wd = torch.sqrt(w0**2 - gam**2)
    e = torch.exp(-gam * t)
    x = e * (torch.cos(wd * t) + gam / wd * torch.sin(wd * t))
    v = -e * (w0**2 / wd) * torch.sin(wd * t)
    return torch.stack((x, v), -1).float().to(dev)


def paper_model(sizes: dict, dev: torch.device, a_scale: float, b_scale: float) -> WARP:
    """The paper's MSD WARP (dense A, hypernet φ, root 1-48x3-2), trained-looking: A = I + Ã
    with Ã ~ N(0, a_scale²), B ~ N(0, b_scale²), φ's last layer perturbed."""
    torch.manual_seed(0)
    root = BlackBoxRoot(
        state_dim=2, width=sizes["width"], depth=sizes["depth"], inputs="tau", residual=False,
        clip=38.0,
    )  # fmt: skip
    model = WARP(
        root=root,
        state_dim=2,
        dt=1.0 / (sizes["T"] - 1),
        transition="dense",
        init_state="hypernet",
        runtime=Runtime(pad_to=sizes["pad_to"]),
    )
    with torch.no_grad():
        model.transition.residual.normal_(0, a_scale)
        model.input_map.normal_(0, b_scale)
        model.phi[-1].weight.normal_(0, 1e-3)
    return model.to(dev)


def ar_loss(model, ys, p=0.25, generator=None):
    out = model(ys, context=1, teacher_prob=p, generator=generator)
    return 0.5 * ((out.mean - ys[:, 1:]) ** 2).mean()


def tf_loss(model, ys):
    out = model(ys, context=ys.shape[1])
    return 0.5 * ((out.mean - ys[:, 1:]) ** 2).mean()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def accuracy(model: WARP, ys: torch.Tensor, precision: str, model64: WARP) -> dict:
    """θ trajectories and one autoregressive training step's loss and gradient against a
    float64 copy of the same model (same teacher-forcing draws)."""
    dev = ys.device
    model.runtime = dataclasses.replace(model.runtime, precision=precision)
    out = {}
    with torch.no_grad():
        th64 = model64.theta_trajectory(ys.double())
        th = model.theta_trajectory(ys)
        out["theta_rel"] = rel(th, th64)
        out["theta_rel_last_step"] = rel(th[:, -1], th64[:, -1])
        out["theta_drift"] = rel(th64, th64[:, :1].expand_as(th64))  # |θ_t - θ_0| / |θ|
    del th, th64
    losses, preds, grads = [], [], []
    for m, y in ((model, ys), (model64, ys.double())):
        m.zero_grad(set_to_none=True)
        gen = torch.Generator(device=dev).manual_seed(1)
        pred = m(y, context=1, teacher_prob=0.25, generator=gen).mean
        loss = 0.5 * ((pred - y[:, 1:]) ** 2).mean()
        loss.backward()
        losses.append(loss.detach())
        preds.append(pred.detach())
        grads.append(torch.cat([q.grad.flatten().double() for q in m.parameters()]))
        m.zero_grad(set_to_none=True)
    out["loss"] = float(losses[1])
    out["loss_rel"] = abs(float(losses[0]) - float(losses[1])) / abs(float(losses[1]))
    # an untrained root predicts ~0, so the loss is mostly |y|²: the predictions are stricter
    out["ar_pred_rel"] = rel(preds[0], preds[1])
    out["grad_rel"] = rel(grads[0], grads[1])
    out["pass"] = out["theta_rel"] <= TARGET_THETA_REL and out["loss_rel"] <= TARGET_LOSS_REL
    return out


def step_case(model, ys, kind: str, precision: str, graph: bool, sizes, dev, **opts) -> dict:
    """Time one kind of step: "ar" (training, context 1, teacher forcing 0.25), "tf"
    (teacher-forced training), "rollout" (inference, context 100)."""
    saved = model.runtime
    model.runtime = dataclasses.replace(saved, precision=precision, **opts)
    opt = None
    if kind != "rollout":
        opt = torch.optim.Adam(
            model.parameters(), lr=1e-7, capturable=graph, foreach=dev.type == "cuda"
        )

    def body():
        if kind == "rollout":
            with torch.no_grad():
                return model(ys, context=sizes["context"]).mean
        loss = ar_loss(model, ys) if kind == "ar" else tf_loss(model, ys)
        loss.backward()
        opt.step()
        return loss.detach()

    step = GraphedStep(body, opt, graph=graph, warmup=sizes["warmup"])
    try:
        r = timed(step, dev, sizes["warmup"] + (1 if graph else 0), sizes["reps"])
    finally:
        step.close()
        model.runtime = saved
    r.update(batch=ys.shape[0], T=ys.shape[1], precision=precision, graph=graph, **opts)
    return r


def bench_paper(sizes, dev, res: Results, args, precisions) -> None:
    model = paper_model(sizes, dev, args.a_scale, args.b_scale)
    ys = msd_data(sizes["B"], sizes["T"], dev)
    res.data["meta"]["paper_model"] = {
        "n_params": model.n_params(),
        "n_weights": model.n_weights,
        "padded_dim": model.padded_dim,
        "a_scale": args.a_scale,
        "b_scale": args.b_scale,
    }
    res.flush()
    graphs = (False, True) if dev.type == "cuda" else (False,)
    for p in precisions:
        for graph in graphs:
            g = "graph" if graph else "eager"
            for key, kind, batch in (
                ("ar_b1024", "ar", sizes["B"]),
                ("ar_b128", "ar", sizes["B_small"]),
                ("rollout_b1024", "rollout", sizes["B"]),
                ("tf_b1024", "tf", sizes["B"]),
            ):
                y = ys[:batch]
                res.run(
                    "paper",
                    f"{key} {p} {g}",
                    lambda kind=kind, y=y, p=p, graph=graph: step_case(
                        model, y, kind, p, graph, sizes, dev
                    ),
                    dev,
                )
    # the plain loop recorded by autograd (what the custom backward replaces), one precision
    res.run(
        "paper",
        "ar_b1024 tf32 eager plain-loop",
        lambda: step_case(model, ys, "ar", "tf32", False, sizes, dev, fast_loop=False),
        dev,
    )


def bench_accuracy(sizes, dev, res: Results, args, precisions) -> None:
    ys = msd_data(sizes["B_acc"], sizes["T"], dev, seed=1)
    for a_scale in (args.a_scale, 10 * args.a_scale):
        model = paper_model(sizes, dev, a_scale, args.b_scale)
        model64 = copy.deepcopy(model).double()
        for p in precisions:
            res.run(
                "accuracy",
                f"{p} a_scale={a_scale:g}",
                lambda p=p, model=model, model64=model64: accuracy(model, ys, p, model64),
                dev,
            )
        del model, model64


def bench_long(sizes, dev, res: Results, args) -> None:
    model = paper_model(sizes, dev, args.a_scale, args.b_scale)
    ys = msd_data(sizes["B"], sizes["T_long"], dev, seed=2)
    one = dict(sizes, warmup=1, reps=2)
    graph = False  # an out-of-memory error inside a graph capture could poison the context
    p = model.resolved_precision(dev)
    for kind in ("ar", "tf"):
        for K in (sizes["ckpt"], 0):
            res.run(
                "long",
                f"{kind} T{sizes['T_long']} b{sizes['B']} {p} checkpoint_every={K}",
                lambda kind=kind, K=K: step_case(
                    model, ys, kind, p, graph, one, dev, checkpoint_every=K
                ),
                dev,
            )


def bench_profile(sizes, dev, res: Results, args) -> None:
    """One eager autoregressive step at batch 1024 and 128 (default precision) under the
    torch profiler: the kernels that cost the time, written to DIR/profile_ar_b*.txt."""
    if dev.type != "cuda":
        res.data["profile"]["skipped"] = {"reason": "CUDA only"}
        return
    model = paper_model(sizes, dev, args.a_scale, args.b_scale)
    p = model.resolved_precision(dev)
    for key, batch in (("ar_b1024", sizes["B"]), ("ar_b128", sizes["B_small"])):

        def case(key=key, batch=batch) -> dict:
            ys = msd_data(batch, sizes["T"], dev)
            opt = torch.optim.Adam(model.parameters(), lr=1e-7, foreach=True)

            def step():
                opt.zero_grad(set_to_none=True)
                ar_loss(model, ys).backward()
                opt.step()

            for _ in range(2):
                step()
            sync(dev)
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                step()
                sync(dev)
            events = prof.key_averages()
            table = None
            for sort in ("self_device_time_total", "self_cuda_time_total"):
                try:
                    table = events.table(sort_by=sort, row_limit=40)
                    break
                except (AttributeError, KeyError, ValueError, RuntimeError):
                    continue
            name = f"profile_{key}.txt"
            (res.out / name).write_text(table or str(events))

            def dev_us(e) -> float:
                return float(
                    getattr(e, "self_device_time_total", None)
                    or getattr(e, "self_cuda_time_total", 0.0)
                )

            top = sorted(events, key=dev_us, reverse=True)[:15]
            return {
                "precision": p,
                "file": name,
                "device_ms_total": sum(dev_us(e) for e in events) / 1e3,
                "top": [
                    {"name": e.key[:80], "calls": e.count, "device_ms": dev_us(e) / 1e3}
                    for e in top
                ],
            }

        res.run("profile", f"{key} {p} eager", case, dev)


def bench_compile(sizes, dev, res: Results, args) -> None:
    """The autoregressive step with the root compiled: batch 128 eager and graphed, batch
    1024 graphed (compilation, not the runs, is what this section costs)."""
    model = paper_model(sizes, dev, args.a_scale, args.b_scale)
    model.runtime = dataclasses.replace(model.runtime, compile_root=True)
    ys = msd_data(sizes["B"], sizes["T"], dev)
    p = model.resolved_precision(dev)
    graph = dev.type == "cuda"
    for key, batch, graphed in (
        ("ar_b128", sizes["B_small"], False),
        ("ar_b128", sizes["B_small"], graph),
        ("ar_b1024", sizes["B"], graph),
    )[: 3 if graph else 1]:

        def case(batch=batch, graphed=graphed):
            r = step_case(model, ys[:batch], "ar", p, graphed, sizes, dev)
            r["compiled"] = not model._compile_failed  # False: compilation failed, ran eager
            return r

        res.run("compile", f"{key} {p} {'graph' if graphed else 'eager'} compiled", case, dev)


# -- report -----------------------------------------------------------------------------------
def gemm_floor(d: dict, key: str, best: dict) -> float | None:
    """Time of the step's (B, Dθ) x (Dθ, Dθ) recurrence products alone at the measured rate of
    the (1024 x 4992) product in the case's precision (3 per training step, 1 per rollout
    step): how far the step is from its floor."""
    sizes = d["meta"]["sizes"]
    row = d["paper"].get(best["case"]) or d["compile"].get(best["case"]) or {}
    M, N = sizes["mm"][0], sizes["mm"][1]
    rate = d["mm"].get(f"{M}x{N}x{N} {row.get('precision')}", {}).get("tflops")
    if not rate or "batch" not in row:
        return None
    B, T, Dp = row["batch"], row["T"], d["meta"].get("paper_model", {}).get("padded_dim", N)
    steps, per = (T - 1 - sizes["context"], 1) if key.startswith("rollout") else (T - 2, 3)
    return per * steps * 2 * B * Dp**2 / (rate * 1e12) * 1e3


def summarize(res: Results, dev: torch.device) -> dict:
    d = res.data
    acc = {
        k.split()[0]: v
        for k, v in d["accuracy"].items()
        if "pass" in v and k.endswith(f"a_scale={res.data['meta']['a_scale']:g}")
    }
    s: dict = {"accurate_precisions": [p for p, v in acc.items() if v["pass"]]}

    def best(key: str, section: str = "paper") -> dict | None:
        rows = [
            (v["ms"], k, v)
            for k, v in d[section].items()
            if k.startswith(key + " ") and "ms" in v and "plain-loop" not in k
        ]
        ok = [r for r in rows if r[2]["precision"] in s["accurate_precisions"]]
        if not (ok or rows):
            return None
        ms, k, v = min(ok or rows)
        return {"ms": ms, "case": k, "peak_gb": v.get("peak_gb"), "accurate": bool(ok)}

    for key, target in TARGET_MS.items():
        b = best(key)
        c = best(key, "compile")
        if c is not None and (b is None or c["ms"] < b["ms"]) and c["accurate"]:
            b = c
        if b is not None:
            b["target_ms"], b["official_jax_ms"] = target, OFFICIAL_MS[key]
            b["gemm_floor_ms"] = gemm_floor(d, key, b)
            b["speedup_vs_jax"] = OFFICIAL_MS[key] / b["ms"]
            b["pass"] = b["ms"] <= target and b["accurate"]
        s[key] = b
    s["tf_b1024"] = best("tf_b1024")
    first_scan = res.data["meta"]["sizes"]["scans"][0]
    tag = "({}, {}, {})".format(*first_scan)
    loop = d["scan"].get(f"{tag} eager loop", {}).get("ms")
    ratios = [
        (loop / ms, k + (" graph" if graphed else ""), v["err"])
        for k, v in d["scan"].items()
        if loop and k.startswith(tag) and "auto" in v and v["err"] <= TARGET_THETA_REL
        for graphed, ms in ((False, v["ms"]), (True, v.get("graph", {}).get("ms")))
        if ms
    ]
    if ratios:
        r, k, e = max(ratios)
        s["scan_ratio"] = {
            "ratio_fwd": r,
            "case": k,
            "err": e,
            "target": TARGET_SCAN_RATIO,
            "pass": r >= TARGET_SCAN_RATIO,
        }
    longs = {k: v for k, v in d["long"].items() if "peak_gb" in v and "checkpoint_every=0" not in k}
    if longs:
        s["long_checkpointed"] = {
            k: {
                "peak_gb": v["peak_gb"],
                "ms": v["ms"],
                # None: no device memory was measured (a CPU run), so no verdict either way
                "pass": None if v["peak_gb"] is None else v["peak_gb"] <= TARGET_LONG_GB,
            }
            for k, v in longs.items()
        }
    # the GPU default: the fastest accurate precision of the graphed AR step at batch 1024
    timing = {}
    for k, v in d["paper"].items():
        if k.startswith("ar_b1024 ") and "ms" in v and "plain-loop" not in k:
            timing[v["precision"]] = min(timing.get(v["precision"], math.inf), v["ms"])
    ok = {p: t for p, t in timing.items() if p in s["accurate_precisions"]}
    s["recommended_gpu_precision"] = min(ok, key=ok.get) if ok else None
    s["current_gpu_precision"] = GPU_PRECISION
    d["summary"] = s
    res.flush()
    return s


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "PASS" if v else "FAIL"
    return format(v, spec) if isinstance(v, float) else str(v)


def markdown(res: Results) -> str:
    d, meta, s = res.data, res.data["meta"], res.data["summary"]
    lines = [
        "# WARP core on the GPU: speed, memory, accuracy (issue 5)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date {meta['date']}, {meta['device_name']}, torch {meta['torch']}, "
        f"CUDA {meta['cuda']}, total {meta.get('total_s', '-')} s. Sizes: "
        f"{'tiny (not the targets)' if meta['tiny'] else 'full'}.",
        "",
        "## Targets",
        "",
        "| target | measured | best case | vs official JAX | products alone | result |",
        "|---|---:|---|---:|---:|---|",
    ]
    for key in TARGET_MS:
        b = s.get(key)
        if b:
            lines.append(
                f"| {key}: <= {b['target_ms']:g} ms | {fmt(b['ms'])} ms | {b['case']} | "
                f"{fmt(b['speedup_vs_jax'])}x ({b['official_jax_ms']:g} ms) | "
                f"{fmt(b.get('gemm_floor_ms'))} ms | {fmt(b['pass'])} |"
            )
    sr = s.get("scan_ratio")
    if sr:
        lines.append(
            f"| scan >= {sr['target']:g}x eager loop | {fmt(sr['ratio_fwd'])}x | "
            f"{sr['case']} (err {sr['err']:.1e}) | | | {fmt(sr['pass'])} |"
        )
    for k, v in (s.get("long_checkpointed") or {}).items():
        lines.append(
            f"| {k}: <= {TARGET_LONG_GB:g} GB | {fmt(v['peak_gb'])} GB | "
            f"{fmt(v['ms'])} ms | | | {fmt(v['pass'])} |"
        )
    lines += [
        "",
        f"Accurate precisions (θ <= {TARGET_THETA_REL:g}, loss <= {TARGET_LOSS_REL:g}):"
        f" {', '.join(s.get('accurate_precisions', [])) or 'none'}; fastest accurate "
        f"(recommended GPU default): {s.get('recommended_gpu_precision')}; "
        f"`warp_phys.warp.GPU_PRECISION` is now {s.get('current_gpu_precision')}. "
        '"products alone": the step\'s recurrence products at the measured matmul rate.',
        "",
    ]
    if d["mm"]:
        lines += ["## Matrix-multiply rate", "", "| product | ms | TFLOP/s |", "|---|---:|---:|"]
        for k, v in d["mm"].items():
            lines.append(f"| {k} | {fmt(v.get('ms'))} | {fmt(v.get('tflops'))} |")
        lines.append("")
    if d["accuracy"]:
        lines += [
            "## Accuracy against float64 (paper model)",
            "",
            "| precision, Ã scale | θ rel. | θ rel. last step | θ drift | AR loss rel. | "
            "AR predictions rel. | grad rel. | result |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for k, v in d["accuracy"].items():
            if "error" in v:
                lines.append(f"| {k} | {v['error'][:80]} | | | | | | |")
                continue
            lines.append(
                f"| {k} | {v['theta_rel']:.2e} | {v['theta_rel_last_step']:.2e} | "
                f"{v['theta_drift']:.2g} | {v['loss_rel']:.2e} | {v['ar_pred_rel']:.2e} | "
                f"{v['grad_rel']:.2e} | {fmt(v['pass'])} |"
            )
        lines.append("")
    for section, title in (
        ("paper", "Paper scale (batch, T 256, Dθ 4898)"),
        ("long", "T 1024, batch 1024"),
        ("compile", "Compiled root"),
    ):
        if not d[section]:
            continue
        lines += [f"## {title}", "", "| case | ms (median) | min ms | peak GB |"]
        lines.append("|---|---:|---:|---:|")
        for k, v in d[section].items():
            if "error" in v:
                lines.append(f"| {k} | {v['error'][:100]} | | |")
            else:
                lines.append(f"| {k} | {fmt(v['ms'])} | {fmt(v['min_ms'])} | {fmt(v['peak_gb'])} |")
        lines.append("")
    for k, v in d["profile"].items():
        if "top" not in v:
            continue
        total = fmt(v["device_ms_total"])
        lines += [f"## Profile: {k} (one eager step, {total} ms of device time)", ""]
        lines += ["| kernel / op | calls | device ms |", "|---|---:|---:|"]
        lines += [f"| `{e['name']}` | {e['calls']} | {fmt(e['device_ms'])} |" for e in v["top"]]
        lines += ["", f"Full table: `{v['file']}`.", ""]
    if d["scan"]:
        lines += [
            "## Scan against the eager loop",
            "",
            "| case | fwd ms | fwd+bwd ms | graphed fwd ms | graphed fwd+bwd ms | loop/fwd | "
            "loop/(fwd+bwd) | rel. err | auto |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for k, v in d["scan"].items():
            if "error" in v:
                lines.append(f"| {k} | {v['error'][:100]} | | | | | | | |")
                continue
            fb = v.get("fwd_bwd", {}).get("ms")
            gf, gfb = v.get("graph", {}).get("ms"), v.get("fwd_bwd_graph", {}).get("ms")
            lines.append(
                f"| {k} | {fmt(v['ms'])} | {fmt(fb)} | {fmt(gf)} | {fmt(gfb)} | "
                f"{fmt(v.get('ratio_fwd'))} | "
                f"{fmt(v.get('ratio_fwd_bwd'))} | {v.get('err', 0):.1e} | "
                f"{'yes' if v.get('auto') else ''} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument(
        "--only",
        default=None,
        help=f"comma-separated sections of {','.join(SECTIONS)} (default all; with "
        "--tiny all but compile, which takes a minute to compile on a CPU)",
    )
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--a-scale", type=float, default=1e-5, help="std of Ã (A = I + Ã)")
    ap.add_argument("--b-scale", type=float, default=1e-3, help="std of the input map B")
    ap.add_argument(
        "--budget",
        type=float,
        default=250.0,
        help="seconds; a section that would end after this is skipped",
    )
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny sizes on a shared machine
    sizes = TINY if args.tiny else FULL
    precisions = [p for p in args.precisions.split(",") if p]
    only = args.only or ",".join(s for s in SECTIONS if not (args.tiny and s == "compile"))
    sections = [s for s in only.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS)) + sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        ap.error(
            f"unknown section or precision {unknown}; sections {SECTIONS}, precisions {PRECISIONS}"
        )
    meta = {
        "command": "python benchmarks/gpu.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tiny": args.tiny,
        "sizes": sizes,
        "a_scale": args.a_scale,
        "b_scale": args.b_scale,
        "precisions": precisions,
        "sections": sections,
        "skipped": [],
    }
    res = Results(args.out, meta)
    t0 = time.perf_counter()
    jobs = {
        "mm": lambda: res.data["mm"].update(bench_mm(sizes, dev)),
        "scan": lambda: [  # padded too at the target shape (the first)
            bench_scan(B, T, D, pad, sizes, dev, args.a_scale, res, precisions)
            for i, (B, T, D) in enumerate(sizes["scans"])
            for pad in ((1, sizes["scan_pad"]) if i == 0 else (1,))
        ],
        "accuracy": lambda: bench_accuracy(sizes, dev, res, args, precisions),
        "paper": lambda: bench_paper(sizes, dev, res, args, precisions),
        "profile": lambda: bench_profile(sizes, dev, res, args),
        "long": lambda: bench_long(sizes, dev, res, args),
        "compile": lambda: bench_compile(sizes, dev, res, args),
    }
    for name in SECTIONS:
        if name not in sections:
            continue
        if time.perf_counter() - t0 + SECTION_COST.get(name, 0) > args.budget:
            meta["skipped"].append(name)
            print(f"skipping {name}: past the {args.budget:g} s budget", flush=True)
            continue
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}", flush=True)

        def section(name=name) -> dict:
            jobs[name]()
            return {}

        res.run("meta", f"section {name}", section, dev)
        summarize(res, dev)
        (args.out / "gpu.md").write_text(markdown(res))
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    from warp_phys.precision import _MM_OUT_DTYPE

    meta["mm_out_dtype_float32"] = _MM_OUT_DTYPE[0] if _MM_OUT_DTYPE else None
    summarize(res, dev)
    text = markdown(res)
    (args.out / "gpu.md").write_text(text)
    print(text.split("## Matrix")[0], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
