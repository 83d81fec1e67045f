"""The `warp-phys` command line. The only module that reads argv.

Known errors (`UserError`) become one line on stderr and exit code 2; anything else keeps
its traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import gc
import logging
import os
import re
import sys
from typing import NoReturn

from warp_phys.errors import RankError, UserError

_COUNTS = {
    "train": 1024,
    "val": 128,
    "test": 128,
    "test_ood": 128,
}  # default trajectories per split


def cmd_systems(args: argparse.Namespace) -> int:
    from warp_phys.system import get_system, system_names

    if args.dysts:
        return print_dysts()
    for name in system_names():
        system = get_system(name)
        params = ", ".join(
            f"{n}={p.default:g}" + (f" [{p.train[0]:g}, {p.train[1]:g}]" if p.train else "")
            for n, p in system.params.items()
        )
        print(
            f"{name}  (state: {', '.join(system.state)}; "
            f"T={system.n_steps} on {list(system.t_span)})"
        )
        for eq in system.equations:
            print(f"    {eq}")
        print(f"    params: {params}")
    print(
        "and the dysts catalogue as dysts:NAME (optional extra .[dysts]): warp-phys systems --dysts"
    )
    return 0


def print_dysts() -> int:
    """List the dysts flows: dimension, path, physics prior, parameters; coverage counts."""
    from warp_phys.dysts import DEFAULTS, catalogue, describe_catalogue

    entries = catalogue()
    print(
        "dysts flows (use as dysts:NAME). path: symbolic (sympy trace of dysts' rhs, verified), "
        "callback (dysts' numpy rhs, data only) or delay (refused); prior: the physics prior "
        "that applies (lsq: linear in its parameters, ode: any differentiable field, none)"
    )
    print(
        f"defaults: parameters ±{DEFAULTS.train_fraction:.0%} (train), "
        f"±{DEFAULTS.ood_fraction:.0%} (test_ood); y0 = ic ± {DEFAULTS.y0_fraction:g} std; "
        f"{DEFAULTS.periods:g} periods, ~{DEFAULTS.points_per_period} steps per period"
    )
    for e in entries:
        params = ", ".join(f"{n}={v:g}" for n, v in e.params.items()) or "(none)"
        why = f"  [{e.why}]" if e.why else ""
        print(f"{e.name:<34} dim {e.dim:<3} {e.path:<8} prior {e.prior:<4}  {params}{why}")
    counts = describe_catalogue(entries)
    print("coverage: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def parse_ranges(items: list[str] | None, flag: str) -> dict[str, tuple[float, float]]:
    """Turn ``["k=4,16", ...]`` into ``{"k": (4.0, 16.0)}``."""
    ranges: dict[str, tuple[float, float]] = {}
    number = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
    for item in items or []:
        match = re.fullmatch(rf"\s*(\w+)\s*={number},{number}", item)
        if match is None:
            raise UserError(f"{flag} expects NAME=LO,HI (e.g. {flag} k=4,16); got {item!r}")
        name = match.group(1)
        if name in ranges:
            raise UserError(f"{flag} gives parameter {name!r} twice; give each parameter once")
        ranges[name] = (float(match.group(2)), float(match.group(3)))
    return ranges


def cmd_generate(args: argparse.Namespace) -> int:
    from warp_phys.store import generate_store, store_info
    from warp_phys.system import get_system

    system = get_system(
        args.system,
        train_ranges=parse_ranges(args.range, "--range"),
        test_ranges=parse_ranges(args.ood_range, "--ood-range"),
    )
    counts = {split: getattr(args, f"n_{split}") for split in _COUNTS}
    kwargs = dict(
        counts=counts,
        seed=args.seed,
        chunk=args.chunk,
        batch=args.batch,
        rtol=args.rtol,
        atol=args.atol,
        noise=args.noise,
        progress=not args.quiet,
    )
    if args.dask is not None:
        from warp_phys.cluster import connect, dashboard

        with connect(args.dask, timeout=args.dask_timeout) as client:
            if dashboard(client):
                print(f"dask dashboard: {dashboard(client)}", flush=True)
            report = generate_store(system, args.out, client=client, **kwargs)
    else:
        report = generate_store(system, args.out, **kwargs)
    if report.already_complete:  # and every chunk still what was written
        from warp_phys.integrity import verify_store

        verify_store(args.out)
        print(f"{args.out} is already complete with these arguments (verified); nothing to do")
    elif report.skipped:
        print(
            f"resumed {args.out}: {report.skipped} chunks were already done, "
            f"{report.written} written now"
        )
    print_summary(store_info(args.out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from warp_phys.integrity import check_metadata, verify_store
    from warp_phys.store import store_info

    info = store_info(args.path)
    check_metadata(args.path)  # no data read; --verify reads every chunk
    if args.verify:
        report = verify_store(args.path)
    print_summary(info)
    if args.verify:
        sums = (
            "every chunk's CRC-32C checksum matched"
            if report["checksums"]
            else f"no checksums to check (store format {report['format']}, before format 2)"
        )
        print(
            f"verified: {report['arrays']} arrays, {report['trajectories']} trajectories read; "
            f"{sums}; shapes as declared, values finite and within their recorded ranges, "
            f"parameters within their declared ranges; system {info['system']!r} as registered"
        )
    return 0


def print_summary(info: dict) -> None:
    """Print what a store holds and how to open it."""
    t, integ = info["time"], info["integrator"]
    noise = f", observation noise {info['noise']:g} of each state's std" if info["noise"] else ""
    print(
        f"{info['path']}: system {info['system']!r} (zarr v3, warp-phys {info['version']}), "
        f"seed {info['seed']}{noise}, "
        f"{t['n']} steps on t in [{t['start']:g}, {t['stop']:g}], "
        f"{integ.get('method', '?')} rtol={integ.get('rtol', '?')} atol={integ.get('atol', '?')}"
    )
    for eq in info["equations"]:
        print(f"    {eq}")
    print(f"  {'split':<9} {'y (trajectory, time, state)':<28} value range per state")
    for split, s in info["splits"].items():
        ranges = "  ".join(f"{n} [{lo:.4g}, {hi:.4g}]" for n, (lo, hi) in s["value_range"].items())
        print(f"  {split:<9} {str(tuple(s['shape'])):<28} {ranges}")
    first = next(iter(info["splits"]))
    print(
        f'open it: xarray.open_zarr("{info["path"]}", group="{first}")  '
        f"(groups: {', '.join(info['splits'])}; variables y, params, y0"
        + (", obs (noisy observations of y))" if info["noise"] else ")")
    )


def _add_run_options(p: argparse.ArgumentParser, *, what: str) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="train/evaluate on this device")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help=f"continue an interrupted {what} from its checkpoints (same settings and data only)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an earlier {what} in the same place (else that is an error)",
    )
    _add_quiet(p)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    """The one quiet flag, the same for every verb."""
    p.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bars or progress lines (only results and errors)",
    )  # fmt: skip


def _progress(args: argparse.Namespace) -> bool | None:
    """False with --quiet; else None: a bar on a terminal, one line per evaluation otherwise."""
    return False if args.quiet else None


def _run_config(
    preset: str | None,
    args: argparse.Namespace,
    values: dict | None = None,
    *,
    base_models=None,
):
    from warp_phys.config import load_config, preset_names
    from warp_phys.system import is_system_name

    values = dict(values or {})
    if preset and preset not in preset_names() and not preset.endswith(".toml"):
        if is_system_name(preset):  # a bare system name (or dysts:NAME): defaults on it
            name = preset.replace(":", "_")  # dysts:Lorenz -> runs/out/dysts_Lorenz
            values = {"data.system": preset, "name": name} | values
            preset = None
    if getattr(args, "device", None):
        values["train.device"] = args.device
    return load_config(preset, args.overrides, values=values, base_models=base_models)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from warp_phys import distributed
    from warp_phys.run import prepare_data, show_bars, train_and_evaluate

    # paths and names are passed as values, never pasted into TOML text
    values = {"model.kind": args.model} if args.model else {}
    values |= {"model.prior": args.prior} if args.prior else {}
    if args.data:
        values["data.path"] = args.data
        if not args.preset:  # the store's own system, unless --set data.system names one
            values["data.system"] = ""
    cfg = _run_config(args.preset, args, values)
    label = cfg.model.kind if cfg.model.kind != "warp" else f"warp-{cfg.model.prior}"
    run_dir = Path(args.out) if args.out else Path(cfg.out_dir) / cfg.name / label
    with distributed.session(cfg.train.device) as group:
        data = prepare_data(cfg, progress=show_bars(_progress(args)))
        res = train_and_evaluate(
            cfg,
            data,
            label,
            cfg.model,
            run_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=_progress(args),
        )
    if not group.main:  # under torchrun rank 0 reports
        return 0
    if res.get("reused"):
        print(
            f"{run_dir} already holds this run, finished with these settings and data: its "
            f"results follow (--overwrite trains it again)"
        )
    if "failed" in res:
        print(f"warp-phys: {label} failed in training: {res['failed']}", file=sys.stderr)
        print(f"run directory: {run_dir}")
        return 1
    for split, r in res["metrics"]["splits"].items():
        m = r["model"]
        refs = {k: v["mse"] for k, v in r["references"].items() if "mse" in v}
        best = min(refs, key=refs.get)
        print(
            f"{label} {split}: forecast MSE {m['mse']:.4g} (median {m['median_mse']:.4g}); "
            f"best reference {best} {refs[best]:.4g}"
        )
    if res["train"]["stopped"]:
        print(f"{label}: training stopped early: {res['train']['stopped']}")
    tcfg = cfg.train_for(cfg.model)
    if tcfg.max_seconds and res["train"]["train_seconds"] >= 0.99 * tcfg.max_seconds:
        print(
            f"{label}: trained for the {tcfg.max_seconds:g} s budget ({res['train']['steps']} "
            f"steps); for longer, --set train.max_seconds={4 * tcfg.max_seconds:g}"
        )
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from warp_phys.run import (
        EVAL_SPLITS,
        evaluate_run,
        load_run,
        predictions_dataset,
        write_predictions,
    )

    run_dir = Path(args.run_dir)
    opts = {"data_path": args.data, "allow_unfinished": args.allow_unfinished}
    cfg, label, _, data, _, _ = load_run(run_dir, **opts)
    res = evaluate_run(run_dir, data=data, device=args.device, **opts)
    preds = res["predictions"]
    ds = {s: predictions_dataset(data, s, cfg.data.context, {label: preds[s]}) for s in EVAL_SPLITS}
    shutil.rmtree(run_dir / "predictions.zarr", ignore_errors=True)
    write_predictions(run_dir / "predictions.zarr", ds)
    for split, r in res["metrics"]["splits"].items():
        print(
            f"{label} {split}: forecast MSE {r['model']['mse']:.4g} (median {r['model']['median_mse']:.4g})"
        )
    print(f"wrote {run_dir / 'metrics.json'} and {run_dir / 'predictions.zarr'}")
    if "unfinished" in res["metrics"]:
        print(
            f"warp-phys: warning: {run_dir} had not finished training; these metrics are of its "
            f"best checkpoint so far and metrics.json is marked unfinished",
            file=sys.stderr,
        )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from warp_phys import distributed
    from warp_phys.compare import compare
    from warp_phys.report import results_table

    cfg = _run_config(args.target, args, base_models=_default_models)
    with distributed.session(cfg.train.device) as group:
        summary = compare(
            cfg, resume=args.resume, overwrite=args.overwrite, progress=_progress(args)
        )
    if not group.main:  # under torchrun rank 0 reports
        return 0
    print(results_table(summary))
    print(f"outputs in {Path(cfg.out_dir) / cfg.name}")
    return 0


def _default_models(data: dict) -> dict:
    """The default models of a compare on the system of the [data] table (or of its store)."""
    from warp_phys.compare import default_models
    from warp_phys.store import store_info
    from warp_phys.system import get_system

    system = data["system"] or store_info(data["path"])["system"]
    return default_models(get_system(system))


def integer(text: str) -> int:
    """argparse type: an integer (the library checks its sign and names the fix)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line naming the fix, like every other error here.

    A negative number in any notation (-5, -1e-8, -.5, -inf) is a value, never an option, so
    that `--atol -1e-8` reaches the check that names the fix."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|nan)$", re.IGNORECASE
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from warp_phys.simulate import DEFAULT_ATOL, DEFAULT_RTOL

    parser = Parser(prog="warp-phys", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument(
        "--plugins",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of your own systems and priors (*.py files, as in systems/ and "
        "priors/); repeatable; also WARP_PHYS_PLUGINS=DIR1:DIR2",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("systems", help="list the registered systems with their equations")
    p.add_argument(
        "--dysts",
        action="store_true",
        help="list the flows of the dysts catalogue instead (optional extra: .[dysts])",
    )
    p.set_defaults(func=cmd_systems)

    p = sub.add_parser(
        "generate",
        help="simulate train/val/test/test_ood ensembles into a zarr store",
        description="Simulate ensembles into one zarr store (groups train, val, test, "
        "test_ood). Rerunning the same command resumes an interrupted run.",
    )
    p.add_argument(
        "system", help="registered system name or dysts:NAME (see `warp-phys systems [--dysts]`)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="store to create or resume: a directory or an fsspec URL (s3://bucket/x.zarr)",
    )
    for split, n in _COUNTS.items():
        p.add_argument(
            f"--n-{split.replace('_', '-')}",
            dest=f"n_{split}",
            type=integer,
            default=n,
            metavar="N",
            help=f"trajectories in {split} (default {n})",
        )
    p.add_argument("--seed", type=integer, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--chunk",
        type=integer,
        default=256,
        metavar="N",
        help="trajectories per zarr chunk: the unit of writing and resuming (default 256)",
    )
    p.add_argument(
        "--batch",
        type=integer,
        default=None,
        metavar="N",
        help="trajectories integrated at once, whole chunks; bounds memory (default: up to "
        "8192, or what fits in 256 MiB of output). The bytes never depend on it",
    )
    p.add_argument(
        "--range",
        action="append",
        metavar="NAME=LO,HI",
        help="training range of a parameter (train/val/test); repeatable",
    )
    p.add_argument(
        "--ood-range",
        action="append",
        metavar="NAME=LO,HI",
        help="range of a parameter for test_ood; repeatable",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=DEFAULT_RTOL,
        help=f"relative tolerance (default {DEFAULT_RTOL:g})",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help=f"absolute tolerance (default {DEFAULT_ATOL:g})",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="Gaussian observation noise, as a fraction of each state's std over the train "
        "split (stored as `obs` beside the clean `y`; default 0)",
    )
    p.add_argument(
        "--dask",
        metavar="local[:N]|ADDRESS",
        help="integrate the chunks on dask workers: `local` starts a cluster of one worker per "
        "core (local:N, N workers), an address (tcp://HOST:8786) joins a running scheduler; "
        "the same bytes as without it (needs the [dask] extra)",
    )
    p.add_argument(
        "--dask-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up on a scheduler address that does not answer within this (default 10)",
    )
    _add_quiet(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="summarise a store made by `generate`")
    p.add_argument("path", help="store directory")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read every chunk: checksums, declared shapes, finite values within their "
        "recorded ranges, parameters within their declared ranges",
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "train",
        help="train one model on a stored dataset or a preset; writes a run directory",
        description="Train one forecaster (WARP with a prior, GRU or LSTM), select on val, "
        "evaluate on test and test_ood. PRESET is a name in runs/ or a .toml file.",
    )
    p.add_argument("preset", nargs="?", help="preset in runs/ (or .toml path, or system name)")
    p.add_argument("--data", help="zarr store made by `generate` (else the preset's dataset)")
    p.add_argument(
        "--model", choices=("warp", "gru", "lstm"), help="model kind (default: preset's)"
    )
    p.add_argument(
        "--prior", help="root-network prior for warp: blackbox, ode, hybrid, ... (see README)"
    )
    p.add_argument(
        "--out", help="run directory (default runs/out/<name>/<model>; never silently replaced)"
    )
    _add_run_options(p, what="run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="re-evaluate a run directory; export predictions")
    p.add_argument(
        "run_dir", help="a directory written by `train` (or a model folder of `compare`)"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="evaluate on this device")
    p.add_argument(
        "--data", help="the run's store, when it moved (its content must be the one trained on)"
    )
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="evaluate a run whose training did not finish (its metrics are marked unfinished)",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "compare",
        help="train WARP, WARP-Phys, GRU and LSTM on one dataset; table, plots, predictions",
    )
    p.add_argument(
        "target",
        nargs="?",
        default="msd_small",
        help="preset in runs/ (or a .toml path) or registered system (default msd_small)",
    )
    _add_run_options(p, what="compare")
    p.set_defaults(func=cmd_compare)
    return parser


def tune_allocator() -> None:
    """Keep freed large blocks on the heap (glibc) for this process.

    A training step allocates and frees the same (batch, time, Dθ)-sized buffers every step;
    served by glibc from fresh mmap regions each time, every page faults on first touch (on
    this project's CPUs that was half of vanilla WARP's training step:
    benchmarks/results/train_step_cpu.md). It changes the whole process, so the program's
    entry point calls it, never the library; a notebook may call it too.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest on 64-bit
    libc.mallopt(m_trim_threshold, 2**30)


# faults of the disk or the path, not of the program: one line naming the fix
_DISK_FAULTS = {
    errno.ENOSPC: "free some space, or choose a place on another disk",
    errno.EDQUOT: "free some of your quota, or choose a place on another disk",
    errno.EROFS: "choose a place on a writable disk",
    errno.EACCES: "choose a place you may write to, or fix its permissions",
    errno.EPERM: "choose a place you may write to, or fix its permissions",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "a folder stands where a file should be written: fix the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EFBIG: "the file grew past the size limit of this file system or process",
    errno.EIO: "the disk reported an input/output error: check it, or use another one",
}


def _disk_fault(err: OSError, args: argparse.Namespace) -> str:
    where = err.filename or getattr(args, "out", None) or getattr(args, "run_dir", None)
    where = f" {where}" if where else ""
    then = {
        "generate": "then run the same command again (a store cut short resumes where it stopped)",
        "train": "then rerun with --resume to continue from the last checkpoint",
        "compare": "then rerun with --resume to continue",
    }.get(args.command, "then run the command again")
    if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return f"cannot write{where}: {err.strerror or err}; {_DISK_FAULTS[err.errno]}"
    return f"cannot write{where}: {err.strerror or err}; {_DISK_FAULTS[err.errno]}, {then}"


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _check_launcher(command: str) -> None:
    """Only train and compare run on several processes (torchrun); the rest runs in one."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and command not in ("train", "compare"):
        hint = " (spread it over a dask cluster with --dask)" if command == "generate" else ""
        raise UserError(
            f"`warp-phys {command}` runs in one process{hint}; run it without torchrun "
            f"(torchrun is for train and compare)"
        )


def run() -> NoReturn:
    """The `warp-phys` command: `main`, then exit with its code.

    Before the interpreter shuts down, every object still alive is frozen out of the garbage
    collector (`gc.freeze`): they are freed at exit anyway, and the collections of the
    shutdown would otherwise walk torch's whole object graph (0.3-0.4 s of every command on
    these machines). Files are closed and exit handlers run as usual."""
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run one verb and return the exit code (argparse's own exits, e.g. --help, included)."""
    tune_allocator()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    if not getattr(args, "quiet", True) and not sys.stderr.isatty():
        # no terminal for a bar: training says one line per evaluation instead
        logging.getLogger("warp_phys.train").setLevel(logging.INFO)
    try:
        from warp_phys.registry import add_plugin_folder

        for folder in args.plugins:
            add_plugin_folder(folder)
        _check_launcher(args.command)
        return int(args.func(args) or 0)
    except UserError as err:
        # under torchrun rank 0 reports what every process meets; another, only its own
        if _rank() == 0 or isinstance(err, RankError):
            print(f"warp-phys: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _DISK_FAULTS:
            raise
        print(f"warp-phys: error: {_disk_fault(err, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "warp-phys: interrupted (rerun the same command, with --resume for train/compare, "
            "to continue)",
            file=sys.stderr,
        )
        return 130
