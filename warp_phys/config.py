"""Run configuration: frozen dataclasses with commented defaults, TOML presets, --set overrides.

A preset in `runs/NAME.toml` has the sections [data], [model], [train] and, for `compare`,
[models.LABEL] tables that override [model] for each compared model:

    [data]
    system = "msd"
    [models.warp_phys]
    prior = "ode"

Unknown keys are errors that list the valid ones, and every value is checked where the config
is built (`__post_init__` of each section): a value outside its range or an unknown choice is
one error naming the key, the value, what is allowed and an example of a valid setting.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from warp_phys.errors import UserError


# presets ship in the repository's runs/ folder. A runs/ folder in the working directory (e.g.
# the runs/out/ that every run creates) never hides them; a preset elsewhere is given by path.
def presets_dir() -> Path:
    """The folder of the packaged presets (runs/ in the repository, `warp_phys.presets`
    installed)."""
    import importlib.resources

    return Path(str(importlib.resources.files("warp_phys.presets")))


@dataclass(frozen=True)
class DataConfig:
    # registered system: with no `path` its dataset is generated (once) under out_dir/data/;
    # with a `path` it must be the store's own system ("" = whatever the store holds)
    system: str = "msd"
    path: str = ""  # zarr store made by `warp-phys generate`; it must exist
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

    def __post_init__(self) -> None:
        _validate(self, "data")


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

    def __post_init__(self) -> None:
        _validate(self, "model")


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

    def __post_init__(self) -> None:
        _validate(self, "train")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/out"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # compare: label -> overrides

    def __post_init__(self) -> None:
        _validate(self, "run")

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


# -- value checks -----------------------------------------------------------------------------
# Each key's rule: (test, what the value must be). The bounds say what a value can mean:
# a count of trajectories or steps is at least 1, a probability or a fraction lies in [0, 1],
# a budget or a weight is finite and not negative (0 = none), a choice is one of its names.
def _integer(low: int):
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low  # noqa: E731
    return ok, f"an integer >= {low}"


def _real(low: float, high: float | None = None, *, open_low=False, open_high=False):
    def ok(v) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        above = v > low if open_low else v >= low
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    left, right = "(" if open_low else "[", ")" if open_high or high is None else "]"
    top = "inf" if high is None else f"{high:g}"
    return ok, f"a finite number in {left}{low:g}, {top}{right}"


def _choice(names: Callable[[], tuple[str, ...]]):
    return (lambda v: isinstance(v, str) and v in names()), lambda: "one of " + ", ".join(names())


def _names(module: str, attr: str, extra: tuple[str, ...] = ()) -> Callable[[], tuple[str, ...]]:
    """The valid names of a choice, read where they are defined (imported when first needed)."""

    def names() -> tuple[str, ...]:
        import importlib

        return extra + tuple(getattr(importlib.import_module(module), attr))

    return names


def _device(v) -> bool:
    return isinstance(v, str) and (v in ("cpu", "cuda") or _is_cuda_index(v))


def _is_cuda_index(v: str) -> bool:
    return v.startswith("cuda:") and v[5:].isdigit()


_RULES: dict[str, dict[str, tuple]] = {
    "data": {
        "n_train": _integer(1),
        "n_val": _integer(1),
        "n_test": _integer(1),
        "n_test_ood": _integer(1),
        "seed": _integer(0),
        "chunk": _integer(1),
        "noise": _real(0.0, 1.0, open_high=True),  # a fraction of each state's std
        "context": _integer(1),  # the upper bound is the dataset's length, checked with it
    },
    "model": {
        "kind": _choice(_names("warp_phys.models", "MODEL_KINDS")),
        "transition": _choice(_names("warp_phys.transition", "TRANSITIONS")),
        "init_state": _choice(_names("warp_phys.warp", "INIT_STATES")),
        "precision": _choice(_names("warp_phys.precision", "PRECISIONS", ("auto",))),
        "scan_method": _choice(_names("warp_phys.scan", "METHODS")),
        "pad_to": _integer(1),
        "checkpoint_every": _integer(0),
        "prefix_chunk": (
            lambda v: v == "auto" or _integer(0)[0](v),
            'an integer >= 0 (0 = off) or "auto"',
        ),
        "hidden": _integer(1),
    },
    "train": {
        "optimizer": _choice(_names("warp_phys.optim", "OPTIMIZERS")),
        # Adam moves every weight by about lr per step, and weights and (standardised) inputs
        # are of order one here: above 1 a single step outruns the weights themselves
        "lr": _real(0.0, 1.0, open_low=True),
        "steps": _integer(1),
        "max_seconds": _real(0.0),  # 0 = no wall-clock budget
        "batch_size": _integer(1),
        "teacher_forced_fraction": _real(0.0, 1.0),
        "teacher_prob_start": _real(0.0, 1.0),
        "teacher_prob_end": _real(0.0, 1.0),
        "grad_clip": _real(0.0, open_low=True),
        "loss": _choice(_names("warp_phys.train", "LOSSES")),
        "loss_horizon": _integer(0),  # 0 = every forecast step
        "penalty_weight": _real(0.0),
        "eval_every": _integer(1),
        "n_val_eval": _integer(1),
        "device": (_device, "cpu, cuda or cuda:<index>"),
        "threads": _integer(0),  # 0 = torch's default
        "seed": _integer(0),
    },
}


# the table being built, so that an error in [models.gru] names models.gru, not model
_WHERE: contextvars.ContextVar[str | None] = contextvars.ContextVar("where", default=None)


def _validate(section, where: str) -> None:
    """Raise UserError for the first value of `section` outside its rule (see `_RULES`)."""
    if where == "run":
        _validate_run(section)
        return
    table = _WHERE.get() or where
    for key, (ok, expected) in _RULES[where].items():
        value = getattr(section, key)
        if not ok(value):
            default = next(f.default for f in fields(section) if f.name == key)
            what = expected() if callable(expected) else expected
            raise UserError(
                f"config key {table}.{key} = {value!r} is not allowed: it must be {what}; "
                f"e.g. --set {table}.{key}={_toml_value(default)}"
            )
    if where == "data" and not (
        isinstance(section.system, str) and (section.system or section.path)
    ):
        raise UserError(
            "config key data.system is empty and no data.path is given: name a registered "
            "system (e.g. --set data.system=msd) or give a store with --data"
        )


def _validate_run(cfg: RunConfig) -> None:
    _path_part("name", cfg.name)
    if not isinstance(cfg.out_dir, str) or not cfg.out_dir:
        raise UserError(
            f'config key out_dir = {cfg.out_dir!r} must be a folder; e.g. --set out_dir="runs/out"'
        )
    for label in cfg.models:
        _path_part(f"models.{label}", label)


def _path_part(key: str, value) -> None:
    """A name that becomes one folder of a run's path: no separator, not empty, not . or .."""
    if not isinstance(value, str) or value in ("", ".", "..") or "/" in value or "\\" in value:
        raise UserError(
            f"config key {key} = {value!r} names a folder of the run's outputs and must be a "
            f"plain name (no '/', not empty, not '.' or '..'); e.g. --set name=my_run"
        )


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
    token = _WHERE.set(where)
    try:
        return cls(**kwargs)
    finally:
        _WHERE.reset(token)


def _coerce(value: Any, f: dataclasses.Field, key: str) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t.startswith("dict") and not isinstance(value, dict):
        raise UserError(
            f"config key {key} must be a table of options (e.g. {key} = {{ width = 8 }}); "
            f"got {value!r}"
        )
    expected = {"int": int, "float": float, "bool": bool, "str": str}.get(t)
    if expected is not None and (
        not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    ):
        raise UserError(f"config key {key} must be {t}; got {value!r}")
    return value


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def load_config(
    preset: str | None = None,
    overrides: list[str] | None = None,
    *,
    values: dict[str, Any] | None = None,
    base_models: Callable[[dict[str, Any]], dict[str, dict[str, Any]]] | None = None,
) -> RunConfig:
    """Load a preset and apply `values` (dotted key -> value), then the `--set` overrides.

    Args:
        preset: a name in runs/, a path to a .toml file, or None for the defaults.
        overrides: ``KEY=VALUE`` strings, VALUE parsed as TOML (else taken as a string).
        values: settings given as Python values, e.g. ``{"data.path": path}``: a path is never
            pasted into TOML text.
        base_models: for a compare whose preset names no [models.*] tables: returns the default
            model tables from the resolved [data] table; `--set models.X.key=...` then changes
            those tables instead of replacing them all.
    """
    loaded: dict[str, Any] = {}
    if preset:
        path = preset_path(preset)
        loaded = _read_toml(path, "config file")
        loaded.setdefault("name", path.stem)
    for key, value in (values or {}).items():
        set_value(loaded, key, value)
    preset_has_models = "models" in loaded
    for item in overrides or []:
        apply_override(loaded, item)
    if base_models is not None and not preset_has_models:
        data = _build(DataConfig, loaded.get("data", {}), "data") if "data" in loaded else None
        given = loaded.get("models", {})
        if not isinstance(given, dict):
            raise UserError(f"config [models] must be a table of model tables; got {given!r}")
        loaded["models"] = _merge(base_models(dataclasses.asdict(data or DataConfig())), given)
    return _build(RunConfig, loaded, "run")


def model_config(values: dict[str, Any], where: str = "model") -> ModelConfig:
    """Build a ModelConfig from a table (e.g. the one a run directory recorded), checked."""
    if not isinstance(values, dict):
        raise UserError(f"config [{where}] must be a table; got {values!r}")
    return _build(ModelConfig, values, where)


def preset_path(preset: str) -> Path:
    """Return the file of a preset: a name in runs/ (the packaged presets) or a path to a file."""
    path = Path(preset)
    if path.suffix != ".toml" and not path.is_file():
        path = presets_dir() / f"{preset}.toml"
    if not path.is_file():
        raise UserError(
            f"unknown preset {preset!r}; presets in {presets_dir()}/: {', '.join(preset_names())} "
            f"(or give the path of a .toml file)"
        )
    return path


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{what} {path} is not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file (not UTF-8): check the path") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror or err}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in, table by table (tables in both are merged, not replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(values: dict[str, Any], item: str) -> None:
    """Apply one `a.b=value` override in place; value is parsed as TOML, else taken as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set needs KEY=VALUE (e.g. train.lr=3e-4); got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    set_value(values, key.strip(), value)


def set_value(values: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (e.g. "data.path") of a nested table to `value`, in place."""
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
        lines += ["", f"[models.{_toml_key(label)}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in over.items()]
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_value(key)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + "".join(_toml_char(c) for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_char(c: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if c in ('"', "\\"):
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    if 0xD800 <= ord(c) <= 0xDFFF:  # a byte that was not UTF-8 in a file name
        raise UserError(f"cannot write {c!r} into a TOML file: rename the path to valid UTF-8")
    return c


def with_updates(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Return cfg with fields of its sections replaced, e.g. with_updates(cfg, train={"lr": 1e-3})."""
    changes = {}
    for name, vals in sections.items():
        current = getattr(cfg, name)
        changes[name] = _build(type(current), {**dataclasses.asdict(current), **vals}, name)
    return replace(cfg, **changes)
