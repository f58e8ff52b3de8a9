"""The ``nflax`` command: ``nflax train``, ``nflax sample`` and ``nflax vi``.

This is the only module that knows about files and flags. Errors a user can cause (an unknown
data set, a bad flag value, a missing run) exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(message)


def _checked(convert, ok, what: str):
    """An argparse type: ``convert`` the text, then require ``ok(value)``, else say ``what``."""

    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v

    return parse


# nflax.nets.ACTIVATIONS, spelled out here so that parsing flags does not import JAX (a test
# checks that the two agree)
ACTIVATIONS = ("tanh", "silu", "gelu", "elu", "relu", "softplus")
# The activation `nflax train` gives conditioners when --activation is not set: silu's tails
# extrapolate where tanh saturates (benchmarks/README.md, robustness over seeds).
TRAIN_ACTIVATION = "silu"

_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_non_negative_float = _checked(float, lambda v: 0 <= v < float("inf"), "a number ≥ 0")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nflax", description="Normalizing flows in JAX: train, sample, vi.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a flow on a built-in 2D data set")
    t.add_argument("--dataset", default="banana", help="data set name (default: banana)")
    t.add_argument(
        "--data",
        default=None,
        help="train on your own file instead (.npy, .npz or .csv, points × dims); it is "
        "standardised, and samples come back in its units",
    )
    t.add_argument("--resume", default=None, metavar="RUN", help="continue a stopped run")
    t.add_argument(
        "--conditional",
        action="store_true",
        help="a conditional flow p(x | c) on a conditional set (default conditional_banana)",
    )
    t.add_argument(
        "--embedding",
        type=_positive_int,
        nargs="+",
        default=None,
        metavar="SIZE",
        help="with --conditional: an MLP embedding of the context, its layer sizes (the last is "
        "the number of features the layers see), e.g. --embedding 32 8",
    )
    t.add_argument(
        "--devices",
        choices=["all"],
        default=None,
        help="data-parallel training over every device (of every process)",
    )
    t.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process training: address of process 0 (jax.distributed)",
    )
    t.add_argument("--num-processes", type=_positive_int, default=None, help="with --coordinator")
    t.add_argument("--process-id", type=int, default=None, help="with --coordinator: 0 … N−1")
    t.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=500,
        help="steps between training checkpoints (a killed run loses at most this many)",
    )
    t.add_argument("--num-points", type=_positive_int, default=1024, help="training points")
    t.add_argument(
        "--flow",
        default=None,
        help="flow constructor (default: realnvp; nsf for 1-D data, where a coupling can only "
        "be affine)",
    )
    t.add_argument("--layers", type=_positive_int, default=8, help="number of layers")
    t.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        default=[64, 64],
        help="hidden layer sizes of the conditioner MLP",
    )
    t.add_argument(
        "--leaky-relu",
        action="store_true",
        help="interleave the tutorial's learnable LeakyReLU layers (realnvp)",
    )
    t.add_argument(
        "--no-actnorm",
        action="store_true",
        help="no leading ActNorm (which standardises the data); the tutorial's exact stack",
    )
    t.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default=None,
        help="conditioner activation (default: silu, which keeps growing beyond the data, so "
        "the tails extrapolate; tanh is the tutorial's)",
    )
    t.add_argument("--steps", type=_positive_int, default=4000, help="maximum optimizer steps")
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="minibatch size (default: full batch)",
    )
    t.add_argument(
        "--lr", type=_positive_float, default=2e-3, help="peak adamw learning rate (default 2e-3)"
    )
    t.add_argument(
        "--schedule",
        choices=["warmup-cosine", "constant"],
        default="warmup-cosine",
        help="learning rate: 200 warm-up steps then cosine decay over --steps, or constant",
    )
    t.add_argument(
        "--weight-decay",
        type=_non_negative_float,
        default=3.0,
        help="adamw weight decay of the conditioners' kernels (default 3: strong, so that the "
        "tails keep their shape; the tutorial used 1e-4)",
    )
    t.add_argument(
        "--patience",
        type=_positive_int,
        default=1000,
        help="early stopping patience in steps, on the validation NLL",
    )
    t.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="train for --steps on all points, no validation split",
    )
    t.add_argument(
        "--val-fraction",
        type=_fraction,
        default=0.1,
        help="fraction held out for validation (default 0.1)",
    )
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<time>/)")
    t.add_argument("--no-plots", action="store_true", help="skip the four figures")
    t.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="a run folder written by `nflax train`")
    s.add_argument("-n", "--num", type=_positive_int, default=1000, help="number of samples")
    s.add_argument("-o", "--output", required=True, help="output file, .npy or .csv")
    s.add_argument("--seed", type=int, default=0, help="random seed")

    v = sub.add_parser("vi", help="fit a flow to an unnormalised density (variational inference)")
    v.add_argument(
        "--target",
        default="energy1",
        help="target name (default: energy1; an unknown name lists the known ones)",
    )
    v.add_argument(
        "--dim", type=_positive_int, default=None, help="dimension (correlated_gaussian)"
    )
    v.add_argument(
        "--flow", default=None, help="flow constructor (default: realnvp; nsf for 1-D targets)"
    )
    v.add_argument("--layers", type=_positive_int, default=6, help="number of layers (default: 6)")
    v.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        default=[32],
        help="conditioner hidden sizes (default: 32)",
    )
    v.add_argument("--leaky-relu", action="store_true", help="interleave LeakyReLU (realnvp)")
    v.add_argument(
        "--activation", choices=ACTIVATIONS, default=None, help="conditioner activation (tanh)"
    )
    v.add_argument(
        "--steps", type=_positive_int, default=5000, help="optimizer steps (default: 5000)"
    )
    v.add_argument(
        "--num-samples",
        type=_positive_int,
        default=512,
        help="samples per step for the ELBO (default: 512)",
    )
    v.add_argument(
        "--lr",
        type=_positive_float,
        default=1e-2,
        help="peak adam learning rate: a short linear warm-up, then a cosine decay to 0 "
        "(default: 0.01)",
    )
    v.add_argument(
        "--stick-the-landing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="path-derivative gradient (Roeder et al. 2017): drop the score term (default: on; "
        "--no-stick-the-landing differentiates log q through the sample too)",
    )
    v.add_argument("--seed", type=int, default=0, help="random seed")
    v.add_argument("--out", default=None, help="run folder (default runs/vi-<target>-<time>/)")
    v.add_argument("--no-plots", action="store_true", help="skip the four figures")
    v.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return _train(args)
        if args.command == "vi":
            return _vi(args)
        return _sample(args)
    except UsageError as e:
        print(f"nflax: error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
def _default_flow(dim: int) -> str:
    """The constructor used when ``--flow`` is not given: realnvp, but nsf in one dimension
    (a coupling layer of one coordinate sees no other coordinate, so it can only be affine,
    and a realnvp there is a Gaussian; nsf's splines are not)."""
    return "nsf" if dim == 1 else "realnvp"


def _flow_kwargs(args, dim: int, activation: str = "tanh") -> dict:
    """The constructor's keyword arguments from the flags (``args.flow`` is set to the default
    flow for ``dim`` when it was not given); ``activation`` is the command's default for
    ``--activation``."""
    if args.flow is None:
        args.flow = _default_flow(dim)
    from nflax import flows

    if args.flow not in flows.CONSTRUCTORS:
        known = ", ".join(sorted(flows.CONSTRUCTORS))
        raise UsageError(f"unknown flow {args.flow!r}; known flows: {known}")
    import inspect

    params = inspect.signature(flows.CONSTRUCTORS[args.flow]).parameters
    kwargs = {"dim": dim}
    for flag, name, value in [
        ("--layers", "num_layers", args.layers),
        ("--hidden", "hidden", list(args.hidden)),
        ("--leaky-relu", "leaky_relu", args.leaky_relu),
        ("--no-actnorm", "actnorm", not getattr(args, "no_actnorm", True)),
        ("--activation", "activation", args.activation or activation),
    ]:
        if name in params:
            kwargs[name] = value
        elif (flag == "--leaky-relu" and value) or (flag == "--activation" and args.activation):
            raise UsageError(f"{flag} is not an option of flow {args.flow!r}")
    return kwargs


def _train(args) -> int:
    if args.coordinator is not None:
        if args.num_processes is None or args.process_id is None:
            raise UsageError("--coordinator needs --num-processes and --process-id")
        if args.out is None and args.resume is None:
            raise UsageError("--coordinator needs --out (the same run folder for every process)")
        from nflax import parallel

        try:
            parallel.initialize(args.coordinator, args.num_processes, args.process_id)
        except ValueError as e:
            raise UsageError(str(e)) from None
        args.devices = "all"
    if args.resume is not None:
        run = Path(args.resume)
        if not run.is_dir() or not (run / "config.json").is_file():
            raise UsageError(f"cannot resume {run}: not a run folder (no config.json)")
        try:
            config = json.loads((run / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot resume {run}: config.json is corrupt ({e})") from None
        if config.get("command") != "train":
            raise UsageError(f"cannot resume {run}: it is not a `nflax train` run")
        with _claim(run, fresh=False):
            return _run_training(
                config, run, resume=True, quiet=args.quiet, plots=not args.no_plots
            )

    from nflax import datasets

    config = {
        "command": "train",
        "flow": args.flow,
        "num_points": args.num_points,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "weight_decay": args.weight_decay,
        "early_stopping": not args.no_early_stopping,
        "patience": None if args.no_early_stopping else args.patience,
        "val_fraction": 0.0 if args.no_early_stopping else args.val_fraction,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
        "devices": args.devices,
    }
    if config["early_stopping"] and args.val_fraction == 0:
        raise UsageError(
            "--val-fraction 0 leaves nothing to stop early on; add --no-early-stopping"
        )
    if args.conditional:
        if args.data is not None:
            raise UsageError("--conditional works with the built-in conditional sets, not --data")
        cname = "conditional_banana" if args.dataset == "banana" else args.dataset
        try:
            cds = datasets.get_conditional(cname)
        except ValueError as e:
            raise UsageError(str(e)) from None
        config.update(dataset=cds.name, dim=cds.dim, conditional=True)
        name = cds.name
    elif args.data is not None:
        x, columns = _load_data_file(args.data)
        config.update(
            dataset=None,
            data_file=str(Path(args.data).absolute()),
            dim=x.shape[1],
            columns=columns,
        )
        name = Path(args.data).stem
    else:
        try:
            ds = datasets.get(args.dataset)
        except ValueError as e:
            raise UsageError(str(e)) from None
        config.update(dataset=ds.name, dim=ds.dim)
        name = ds.name
    config["flow_kwargs"] = _flow_kwargs(args, config["dim"], TRAIN_ACTIVATION)
    config["flow"] = args.flow
    if args.conditional:
        from nflax import flows

        if "context_dim" not in inspect.signature(flows.CONSTRUCTORS[args.flow]).parameters:
            raise UsageError(f"flow {args.flow!r} has no conditional form")
        config["flow_kwargs"]["context_dim"] = cds.context_dim
        if args.embedding is not None:
            config["flow_kwargs"]["embedding"] = list(args.embedding)
    elif args.embedding is not None:
        raise UsageError("--embedding needs --conditional (it embeds the context)")
    out = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _claim(out, fresh=True):
        return _run_training(config, out, resume=False, quiet=args.quiet, plots=not args.no_plots)


@contextlib.contextmanager
def _claim(out: Path, *, fresh: bool):
    """Hold the run folder ``out`` while training (process 0 only: the others share it)."""
    from nflax import parallel
    from nflax.runs import RunFolderError, claim_run_folder

    if not parallel.is_primary():
        yield out
        return
    try:
        with claim_run_folder(out, fresh=fresh):
            yield out
    except RunFolderError as e:  # raised only when claiming; the run itself cannot raise it
        raise UsageError(str(e)) from None


def _load_data_file(path: str):
    """The data file's array and its column names (``None`` without a CSV header)."""
    from nflax.datafiles import DataFileError, load_table

    try:
        return load_table(path)
    except DataFileError as e:
        raise UsageError(str(e)) from None


def _run_training(config: dict, out: Path, *, resume: bool, quiet: bool, plots: bool) -> int:
    """Train from a run configuration (fresh or resumed), then write every output file."""
    import types

    import jax
    import numpy as np
    from flax import nnx

    from nflax import checkpoint, datasets, flows
    from nflax.datafiles import DataFileError, standardize
    from nflax.training import default_optimizer, fit, nll

    key_data, key_test, key_fit, key_plot = jax.random.split(jax.random.key(config["seed"]), 4)
    log_det_std = 0.0
    if config.get("data_file"):
        raw, _ = _load_data_file(config["data_file"])
        if raw.shape[1] != config["dim"]:
            raise UsageError(
                f"data file {config['data_file']} now has {raw.shape[1]} column(s); the run was "
                f"started with {config['dim']}"
            )
        # A fixed 10 % of the rows (by the seed) is held out to report a test NLL.
        order = np.asarray(jax.random.permutation(key_test, len(raw)))
        n_test = max(1, len(raw) // 10) if len(raw) >= 20 else 0
        try:
            x_all, mean, std = standardize(raw, f"data file {config['data_file']}")
        except DataFileError as e:
            raise UsageError(str(e)) from None
        x, x_test = x_all[order[n_test:]], x_all[order[:n_test]]
        config["standardize"] = {"mean": mean.tolist(), "std": std.tolist()}
        log_det_std = float(np.sum(np.log(std)))  # NLL in data units = NLL in z-units + this
        ds = types.SimpleNamespace(
            name=Path(config["data_file"]).stem, dim=config["dim"], has_density=False, log_prob=None
        )
    elif config.get("conditional"):
        try:
            ds = datasets.get_conditional(config["dataset"])
        except ValueError as e:
            raise UsageError(f"cannot run: {e}") from None
        x, c = (np.asarray(a) for a in ds.sample(key_data, config["num_points"]))
        x_test, c_test = (np.asarray(a) for a in ds.sample(key_test, 16384))
    else:
        try:
            ds = datasets.get(config["dataset"])
        except ValueError as e:
            raise UsageError(f"cannot run: {e}") from None
        x = np.asarray(ds.sample(key_data, config["num_points"]))
        x_test = np.asarray(ds.sample(key_test, 16384))

    from nflax import parallel

    primary = parallel.is_primary()
    c = c if config.get("conditional") else None
    c_test = c_test if config.get("conditional") else None
    x_fit, c_fit = x, c
    if jax.process_count() > 1:  # each process passes its own block of rows; fit gathers them
        nproc, pid = jax.process_count(), jax.process_index()
        if len(x) % nproc:
            raise UsageError(f"{len(x)} training points do not split evenly over {nproc} processes")
        block = len(x) // nproc
        x_fit = x[pid * block : (pid + 1) * block]
        c_fit = None if c is None else c[pid * block : (pid + 1) * block]
    try:
        flow = flows.build(config["flow"], **config["flow_kwargs"], rngs=nnx.Rngs(config["seed"]))
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot build flow {config['flow']!r}: {e}") from None
    steps = config["steps"]
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            _write_json(out / "config.json", config)
    try:
        history = fit(
            flow,
            x_fit,
            context=c_fit,
            key=key_fit,
            steps=steps,
            optimizer=default_optimizer(
                steps, config["lr"], config["weight_decay"], config["schedule"]
            ),
            batch_size=config["batch_size"],
            patience=config["patience"],
            val_fraction=config["val_fraction"],
            progress=False if quiet else None,
            checkpoint_dir=out / "checkpoints",
            checkpoint_every=config["checkpoint_every"],
            resume=resume,
            devices=config.get("devices"),
        )
    except (ValueError, checkpoint.CheckpointError) as e:
        raise UsageError(str(e)) from None

    metrics = {"train_nll": float(np.mean(nll(flow, x, c))) + log_det_std}
    if len(x_test):
        test = nll(flow, x_test, c_test) + log_det_std
        metrics.update(
            test_nll=float(np.mean(test)),
            test_nll_median=float(np.median(test)),
            test_nll_trimmed_1pct=float(np.mean(np.sort(test)[: max(1, int(0.99 * len(test)))])),
            test_nll_worst=float(np.max(test)),
            num_test_points=int(len(x_test)),
        )
    metrics.update(
        steps_run=history.steps_run,
        stop_reason=history.stop_reason,
        best_step=history.best_step,
        steps_per_second=history.steps_per_second,
        compile_seconds=history.compile_seconds,
        train_seconds=history.train_seconds,
    )
    if ds.has_density:
        true = -np.asarray(ds.log_prob(x_test) if c is None else ds.log_prob(x_test, c_test))
        metrics["true_nll"] = float(np.mean(true))
        metrics["test_minus_true_nll"] = metrics["test_nll"] - metrics["true_nll"]
        metrics["true_nll_median"] = float(np.median(true))
    if config.get("standardize"):
        metrics["units"] = "NLL in the data file's own units (standardisation undone)"

    checkpoint.save(out / "flow", flow)  # every process takes part; process 0 writes
    if not primary:  # only process 0 writes files
        return 0
    history.to_csv(str(out / "history.csv"))
    if config.get("standardize"):
        _write_json(out / "config.json", config)
    _write_json(out / "metrics.json", metrics)
    if plots and c is not None:
        _conditional_plots(out, flow, ds, history, key_plot)
    elif plots:
        _plots(out, flow, x, ds, history, key_plot, _axis_labels(config))
    if not quiet:
        line = f"{ds.name}: "
        if "test_nll" in metrics:
            line += f"test NLL {metrics['test_nll']:.4f}"
        if "true_nll" in metrics:
            line += f" (exact {metrics['true_nll']:.4f}, gap {metrics['test_minus_true_nll']:+.4f})"
        line += f", {history.steps_run} steps ({history.stop_reason}) → {out}"
        print(line)
    return 0


def _conditional_plots(out: Path, flow, ds, history, key) -> None:
    import jax
    import numpy as np

    from nflax import plotting

    contexts = np.linspace(0.5, 1.5, 3, dtype=np.float32)[:, None]
    keys = jax.random.split(key, len(contexts) + 1)
    reference = [
        np.asarray(ds.sample_given(k, ctx, 1000)) for k, ctx in zip(keys[1:], contexts, strict=True)
    ]
    fig = plotting.plot_conditional_samples(flow, keys[0], contexts, 1000, reference=reference)
    fig.savefig(out / "samples.png", dpi=110)
    if ds.dim == 2:  # one grid for every context, spanning all the reference samples
        fig = plotting.plot_conditional_density(
            flow, contexts, data=np.concatenate(reference), true_log_prob=ds.log_prob
        )
        fig.savefig(out / "density.png", dpi=110)
    plotting.plot_history(history).savefig(out / "loss.png", dpi=110)


def _axis_labels(config: dict) -> list[str] | None:
    """Axis labels of a data-file run's plots: its CSV column names, in standardised units
    (the flow's); ``None`` when the file named no columns."""
    if not config.get("columns"):
        return None
    unit = " (standardised)" if config.get("standardize") else ""
    return [f"{name}{unit}" for name in config["columns"]]


def _plots(out: Path, flow, x, ds, history, key, labels: list[str] | None = None) -> None:
    """trajectory.png, samples.png (a pair plot beyond 2-D), loss.png and, in 1-D and 2-D,
    density.png; ``labels`` name the dimensions on the axes."""
    import jax

    from nflax import plotting

    k1, k2 = jax.random.split(key)
    figs = {
        "trajectory.png": plotting.plot_trajectory(flow, x, key=k1),
        "samples.png": plotting.plot_samples(flow, k2, n=len(x), data=x, labels=labels),
        "loss.png": plotting.plot_history(history),
    }
    if ds.dim <= 2:
        figs["density.png"] = plotting.plot_density(
            flow, x, true_log_prob=ds.log_prob if ds.has_density else None, labels=labels
        )
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=110)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _vi(args) -> int:
    from nflax import datasets

    try:
        target = datasets.get_target(
            args.target, **({"dim": args.dim} if args.dim is not None else {})
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    kwargs = _flow_kwargs(args, target.dim)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"vi-{target.name}-{stamp}"
    with _claim(out, fresh=True):
        return _run_vi(args, target, kwargs, out)


def _run_vi(args, target, kwargs: dict, out: Path) -> int:
    """Fit, evaluate, save and plot a `nflax vi` run into the claimed folder ``out``."""
    import jax
    import numpy as np
    from flax import nnx

    from nflax import checkpoint, flows
    from nflax.vi import default_vi_optimizer, fit_vi, vi_diagnostics

    key_fit, key_eval, key_plot = jax.random.split(jax.random.key(args.seed), 3)
    flow = flows.build(args.flow, **kwargs, rngs=nnx.Rngs(args.seed))
    config = {
        "command": "vi",
        "target": target.name,
        "dim": target.dim,
        "flow": args.flow,
        "flow_kwargs": kwargs,
        "steps": args.steps,
        "num_samples": args.num_samples,
        "lr": args.lr,
        "schedule": "linear warm-up over min(100, steps // 10) steps, cosine decay to 0",
        "stick_the_landing": args.stick_the_landing,
        "seed": args.seed,
    }
    history = fit_vi(
        flow,
        target.log_density,
        key=key_fit,
        steps=args.steps,
        num_samples=args.num_samples,
        optimizer=default_vi_optimizer(args.steps, args.lr),
        stick_the_landing=args.stick_the_landing,
        progress=None if not args.quiet else False,
    )
    diag = vi_diagnostics(flow, target.log_density, key=key_eval, num_samples=65536)
    metrics = {
        "elbo": diag["elbo"],
        "elbo_std_error": diag["elbo_std_error"],
        "ess_fraction": diag["ess_fraction"],
        "log_z_estimate": diag["log_z"],
        "log_z": target.log_normalizer,
        "num_eval_samples": diag["num_samples"],
        "steps_run": history.steps_run,
        "stop_reason": history.stop_reason,
        "steps_per_second": history.steps_per_second,
        "compile_seconds": history.compile_seconds,
        "train_seconds": history.train_seconds,
    }
    if target.log_normalizer is not None:
        metrics["kl_q_p"] = target.log_normalizer - diag["elbo"]  # log Z − ELBO = KL(q ‖ p)
    samples = np.asarray(flow.sample(key_plot, 65536))
    if target.mean is not None:
        mean, cov = np.asarray(target.mean), np.asarray(target.covariance)
        metrics["mean_abs_error"] = float(np.max(np.abs(samples.mean(0) - mean)))
        err = np.cov(samples.T).reshape(cov.shape) - cov
        metrics["covariance_rel_error"] = float(np.linalg.norm(err) / np.linalg.norm(cov))

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    checkpoint.save(out / "flow", flow)
    history.to_csv(str(out / "history.csv"))
    _write_json(out / "metrics.json", metrics)
    if not args.no_plots:
        _vi_plots(out, flow, target, history, samples[:2000], key_plot)
    if not args.quiet:
        line = f"{target.name}: ELBO {diag['elbo']:.4f}"
        if target.log_normalizer is not None:
            line += f" (log Z {target.log_normalizer:.4f}, KL {metrics['kl_q_p']:.4f})"
        line += f", ESS {100 * diag['ess_fraction']:.1f}%, {history.steps_run} steps → {out}"
        print(line)
    return 0


def _vi_plots(out: Path, flow, target, history, samples, key) -> None:
    from nflax import plotting

    figs = {
        "trajectory.png": plotting.plot_trajectory(flow, samples, key=key, direction="inverse"),
        "samples.png": plotting.plot_samples(flow, key, n=len(samples)),
        "loss.png": plotting.plot_elbo(history, target.log_normalizer),
    }
    if target.dim == 2:
        lim = target.box or (float(samples.min()), float(samples.max()))
        exact = target.log_normalizer is not None
        figs["density.png"] = plotting.plot_density(
            flow, xlim=lim, ylim=lim, true_log_prob=target.log_prob if exact else target.log_density
        )
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=110)


def _sample(args) -> int:
    import jax
    import numpy as np

    from nflax import checkpoint

    run = Path(args.run)
    if not run.exists():
        raise UsageError(f"run folder {run} does not exist")
    if not run.is_dir():
        raise UsageError(f"{run} is a file, expected a run folder")
    out = Path(args.output)
    if out.suffix not in (".npy", ".csv"):
        raise UsageError(f"output {out} must end in .npy or .csv")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder, expected a file name")
    try:
        flow = checkpoint.load(run / "flow")
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from None
    x = np.asarray(flow.sample(jax.random.key(args.seed), args.num))
    config = _run_config(run)
    std = config.get("standardize")
    if std:  # trained on a standardised file: back to its units
        x = x * np.asarray(std["std"]) + np.asarray(std["mean"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    if out.suffix == ".npy":
        np.save(tmp, x)
    else:  # with the training file's header row, when it had one
        header = _csv_row(config["columns"]) if config.get("columns") else ""
        np.savetxt(tmp, x, delimiter=",", fmt="%.8g", header=header, comments="")
    os.replace(tmp, out)
    print(f"wrote {len(x)} samples to {out}")
    return 0


def _run_config(run: Path) -> dict:
    """A run folder's config.json, or ``{}`` when it is missing or unreadable."""
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _csv_row(cells: list[str]) -> str:
    """One CSV line (quoted where a cell needs it), without the line ending."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
