"""Run configuration: frozen dataclasses with commented defaults, TOML presets, --set overrides.

A preset in `runs/NAME.toml` has the sections [data], [model], [train] and, for `compare`,
[models.LABEL] tables that override [model] for each compared model:

    [data]
    system = "msd"
    [models.warp_phys]
    prior = "ode"

Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from warp_phys.errors import UserError

# presets ship in the repository's runs/ folder; a runs/ folder in the working directory wins
RUNS_DIR = (
    Path("runs") if Path("runs").is_dir() else Path(__file__).resolve().parent.parent / "runs"
)


@dataclass(frozen=True)
class DataConfig:
    system: str = "msd"  # registered system; its dataset is generated when `path` is missing
    path: str = ""  # zarr store; "" means runs/out/data/<system>-<sizes>-s<seed>.zarr
    n_train: int = 512  # trajectories per split, used when the store has to be generated
    n_val: int = 64
    n_test: int = 128
    n_test_ood: int = 128
    seed: int = 0  # dataset seed (parameters, initial states)
    chunk: int = 256  # trajectories per integration/write chunk
    # observation noise σ as a fraction of each state's train std (models see y + σ ε; errors
    # are taken against the clean y); 0 = clean, or whatever the store given by `path` holds
    noise: float = 0.0
    context: int = 100  # L: ground-truth steps given before the forecast (paper: 100 for MSD)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "warp"  # warp | gru | lstm
    prior: str = "blackbox"  # root-network family from priors/ (warp only)
    prior_options: dict[str, Any] = field(default_factory=dict)  # passed to the prior
    # dense (paper) | diagonal | rotation (damped 2x2 blocks) | prior (the prior's own, lsq)
    transition: str = "rotation"
    anchored: bool = True  # θ_t − θ_0 = A(θ_{t−1} − θ_0) + B Δy_t
    # learned (one θ_0; the root sees y_prev anyway) | hypernet (the paper's θ_0 = φ(y_0))
    init_state: str = "learned"
    hold_after_context: bool = False  # physics priors: keep θ fixed through the forecast
    pad_to: int = 1  # pad Dθ to a multiple of this (128 on GPUs)
    transition_options: dict[str, Any] = field(default_factory=dict)  # e.g. rotation frequencies
    time_channel: bool = False  # add τ to the inputs of B (the paper's optional time channel)
    # dense products: fp32 | tf32 | bf16 | auto (fastest accurate per device)
    precision: str = "auto"
    checkpoint_every: int = 0  # recompute activations per chunk of this many steps (0 = off)
    # teacher-forced steps in cache-sized time chunks, recomputed in the backward (WARP);
    # "auto": 16 on a CPU, off on a GPU; 0 = off
    prefix_chunk: int | str = "auto"
    compile: bool = False  # torch.compile the root network (GPU)
    scan_method: str = "auto"  # auto | sequential | chunked | doubling | loop
    hidden: int = 128  # GRU/LSTM hidden size
    normalize: bool = True  # feed the network standardised states (never for physics priors)
    # this model's training recipe: overrides of [train] (e.g. { lr = 0.03 }); a compare
    # still gives every model the same max_seconds unless this changes it
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"  # adam (cosine decay, grad-norm clip) | paper (AdaBelief, clip 1e-7)
    lr: float = 2e-3
    steps: int = 100_000  # optimiser steps (the run also stops at max_seconds)
    # wall-clock budget; 0 = none. Schedules follow max(step, time) progress
    max_seconds: float = 150.0
    batch_size: int = 64
    # first part: one-step loss, parallel over time (a long one-step phase made rollouts of
    # vanilla WARP unstable in CPU runs; the rest is autoregressive)
    teacher_forced_fraction: float = 0.2
    # then autoregressive, teacher forcing decaying linearly to none: rollouts must learn to run
    # free (ending at 0.1 left vanilla WARP's free forecasts unstable: runs/results/msd_cpu.md)
    teacher_prob_start: float = 0.5
    teacher_prob_end: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip (adam); elementwise 1e-7 for paper
    loss: str = "mse"  # mse | nll (needs a root predicting std)
    # autoregressive phase: the loss covers the context and this many forecast steps (0: all);
    # a short horizon keeps chaotic divergence out of the gradient
    loss_horizon: int = 0
    penalty_weight: float = 1e-2  # weight of a prior's penalty (hybrid residual size)
    eval_every: int = 100  # steps between validation forecasts (model selection on val)
    n_val_eval: int = 256  # validation trajectories used for selection
    device: str = "cpu"  # cpu | cuda
    # torch CPU threads; 1 is fastest for small models on a shared machine, 0 = torch's default
    threads: int = 1
    seed: int = 0  # model init, batches, teacher forcing


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/out"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # compare: label -> overrides

    def model_for(self, label: str) -> ModelConfig:
        """Return [model] with the [models.label] overrides applied."""
        return _build(
            ModelConfig, {**dataclasses.asdict(self.model), **self.models[label]}, "model"
        )

    def train_for(self, model: ModelConfig) -> TrainConfig:
        """Return [train] with the model's own recipe (`model.train`) applied."""
        if not model.train:
            return self.train
        return _build(TrainConfig, {**dataclasses.asdict(self.train), **model.train}, "model.train")


def _build(cls, values: dict[str, Any], where: str):
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise UserError(
            f"unknown config key {where}.{unknown[0]}; valid keys of [{where}]: {', '.join(valid)}"
        )
    kwargs = {}
    for k, v in values.items():
        sub = {DataConfig: "data", ModelConfig: "model", TrainConfig: "train"}
        ftype = valid[k].type
        target = {
            "DataConfig": DataConfig,
            "ModelConfig": ModelConfig,
            "TrainConfig": TrainConfig,
        }.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        if target is not None:
            if not isinstance(v, dict):
                raise UserError(f"config [{sub[target]}] must be a table; got {v!r}")
            kwargs[k] = _build(target, v, sub[target])
        elif k == "models":
            if not isinstance(v, dict):
                raise UserError(f"config [models] must be a table of model tables; got {v!r}")
            for label, over in v.items():
                if not isinstance(over, dict):
                    raise UserError(f"config [models.{label}] must be a table; got {over!r}")
                _build(ModelConfig, over, f"models.{label}")
            kwargs[k] = v
        elif k == "train" and cls is ModelConfig:
            if not isinstance(v, dict):
                raise UserError(f"config {where}.train must be a table of [train] keys; got {v!r}")
            _build(TrainConfig, v, f"{where}.train")
            kwargs[k] = v
        else:
            kwargs[k] = _coerce(v, valid[k], f"{where}.{k}")
    return cls(**kwargs)


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(t)
    if expected is not None and (
        not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    ):
        raise UserError(f"config key {key} must be {t}; got {value!r}")
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in RUNS_DIR.glob("*.toml"))


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset (name in runs/ or a .toml path; None = defaults) and apply --set overrides."""
    values: dict[str, Any] = {}
    if preset:
        path = Path(preset)
        if path.suffix != ".toml":
            path = RUNS_DIR / f"{preset}.toml"
        if not path.is_file():
            raise UserError(
                f"unknown preset {preset!r}; presets in {RUNS_DIR}/: {', '.join(preset_names())}"
            )
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"preset {path} is not valid TOML: {err}") from None
        values.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(values, item)
    return _build(RunConfig, values, "run")


def apply_override(values: dict[str, Any], item: str) -> None:
    """Apply one `a.b=value` override in place; value is parsed as TOML, else taken as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set needs KEY=VALUE (e.g. train.lr=3e-4); got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    parts = key.split(".")
    node = values
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {p} is not a table")
    node[parts[-1]] = value


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: RunConfig) -> str:
    """Serialise a resolved config as TOML (written next to every run's outputs)."""
    d = to_dict(cfg)
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section in ("data", "model", "train"):
        lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[section].items()]
    for label, over in d["models"].items():
        lines += ["", f"[models.{label}]"] + [f"{k} = {_toml_value(v)}" for k, v in over.items()]
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def with_updates(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Return cfg with fields of its sections replaced, e.g. with_updates(cfg, train={"lr": 1e-3})."""
    changes = {}
    for name, vals in sections.items():
        current = getattr(cfg, name)
        changes[name] = _build(type(current), {**dataclasses.asdict(current), **vals}, name)
    return replace(cfg, **changes)
