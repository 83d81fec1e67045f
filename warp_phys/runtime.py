"""How WARP computes, apart from what it computes: precision, padding, scan, checkpoints, compile.

    WARP(root=..., state_dim=2, dt=0.01, runtime=Runtime(precision="tf32", pad_to=128))

None of these options changes the model's function beyond float rounding (the tests hold
every path to the plain one); they trade speed and memory on a given device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from warp_phys.errors import UserError
from warp_phys.scan import METHODS, PRECISIONS

# precision="auto": IEEE float32 on a CPU and, until a GPU run of benchmarks/gpu.py confirms a
# faster setting at the paper's scale (benchmarks/results/gpu.md), on a GPU too. CPU emulation
# predicts fp16 accurate enough there; only a measurement may change this default.
GPU_PRECISION = "fp32"
# prefix_chunk="auto" on a CPU: teacher-forced time chunks that keep (B, chunk, Dθ) in cache
# (benchmarks/results/train_step_cpu.md), when the whole (B, L, Dθ) would not fit anyway.
# Measured on the black-box default root (msd_small, T 256, one thread, teacher-forced step):
# batch 64 (6.1M elements) 157 ms in one chunk, 225 ms in chunks of 16; batch 128 (12M) 452
# against 412 ms; batch 256 (24M) 1,110 against 706 ms.
PREFIX_CHUNK_CPU = 16
PREFIX_CHUNK_MIN_ELEMENTS = 2**23  # 32 MB of float32 hidden states: below, one chunk


@dataclass(frozen=True)
class Runtime:
    """Execution options of `WARP` (see the module docstring).

    Attributes:
        precision: of the products with A = I + Ã (dense): "auto" (fp32 on a CPU,
            `GPU_PRECISION` on a GPU) | "fp32" | "tf32" | "bf16" | "fp16" (`scan.py`).
        pad_to: pad Dθ up to a multiple of this (fast matrix sizes on GPUs); invisible.
        scan_method: "auto" | "loop" | "sequential" | "chunked" | "doubling" (`scan.py`).
        fast_loop: run the forecast loop with its own backward (`rollout.py`); False records
            it step by step with autograd (the reference).
        checkpoint_every: K > 0 keeps only every K-th hidden state of a training pass and
            recomputes the rest in the backward (memory / K for about 1/3 more time).
        prefix_chunk: the teacher-forced steps of a training pass run in time chunks of this
            many steps, each recomputed in the backward, so that a chunk's hidden states stay
            in cache instead of a (B, T, Dθ) tensor going through memory several times; 0 =
            one chunk; "auto" = `PREFIX_CHUNK_CPU` on a CPU, 0 on a GPU. `checkpoint_every`
            wins when set.
        compile_root: compile the root's per-step evaluation with torch.compile (eager when
            compilation fails).
    """

    precision: str = "auto"
    pad_to: int = 1
    scan_method: str = "auto"
    fast_loop: bool = True
    checkpoint_every: int = 0
    prefix_chunk: int | str = "auto"
    compile_root: bool = False

    def __post_init__(self) -> None:
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise UserError(
                f"unknown precision {self.precision!r}; choose auto or one of "
                f"{', '.join(PRECISIONS)}"
            )
        if self.scan_method not in METHODS:
            raise UserError(
                f"unknown scan_method {self.scan_method!r}; choose one of {', '.join(METHODS)}"
            )
        chunk = self.prefix_chunk
        if not (
            chunk == "auto"
            or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0)
        ):
            raise UserError(f"prefix_chunk must be 'auto' or a number of steps >= 0; got {chunk!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise UserError(
                f"checkpoint_every must be 0 (off) or a number of steps; got {self.checkpoint_every!r}"
            )
        if not isinstance(self.pad_to, int) or self.pad_to < 1:
            raise UserError(f"pad_to must be an integer >= 1; got {self.pad_to!r}")

    def resolved_precision(self, device: torch.device) -> str:
        """Return the precision of the dense products on `device` ("auto" resolved)."""
        if self.precision != "auto":
            return self.precision
        return "fp32" if device.type == "cpu" else GPU_PRECISION

    def chunk_for(self, device: torch.device, elements: int) -> int:
        """Return the time chunk of a training pass's teacher-forced steps (0: one chunk);
        `elements` = B · L · Dθ, the size of the hidden states of the whole prefix."""
        if self.checkpoint_every:
            return self.checkpoint_every
        if self.prefix_chunk != "auto":
            return int(self.prefix_chunk)
        small = elements < PREFIX_CHUNK_MIN_ELEMENTS
        return PREFIX_CHUNK_CPU if device.type == "cpu" and not small else 0
