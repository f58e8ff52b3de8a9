"""The ``nflax`` command: ``nflax train``, ``nflax sample`` and ``nflax vi``.

This module parses flags and dispatches; the work (data, training, metrics, files) lives in
:mod:`nflax.runs`. Errors a user can cause (an unknown data set, a bad flag value, a missing
run) exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import inspect
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

# Training objectives of `nflax train`, the flows flow matching can train, and each
# objective's default weight decay (benchmarks/README.md: 3 for likelihood, "Robust defaults";
# 0 for flow matching, "Continuous flows": a decay of 3 left a 0.7-nat gap on the banana).
OBJECTIVES = ("likelihood", "flow-matching")
DEFAULT_WEIGHT_DECAY = {"likelihood": 3.0, "flow-matching": 0.0}
# `nflax train`'s steps per objective and hidden sizes per flow, when not given (flow
# matching's steps are cheap, no ODE solve, and its noisy regression wants more of them)
TRAIN_STEPS = {"likelihood": 4000, "flow-matching": 8000}
TRAIN_PATIENCE = {"likelihood": 1000, "flow-matching": None}
TRAIN_HIDDEN = {"cnf": [128, 128, 128]}
DEFAULT_HIDDEN = [64, 64]
FLOW_MATCHING_FLOWS = ("cnf",)

_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive number")
_non_negative_float = _checked(float, lambda v: 0 <= v < float("inf"), "a number ≥ 0")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")

# The flags `train` and `vi` share: each command's defaults, and its words in their help.
# (train's --hidden and --steps: None, resolved per flow and per objective below)
SHARED_DEFAULTS = {
    "train": {"layers": None, "hidden": None, "steps": None, "lr": 2e-3},
    "vi": {"layers": None, "hidden": [32], "steps": 5000, "lr": 1e-2},
}
# --layers when not given (None above, so a flow without layers can refuse the flag)
DEFAULT_LAYERS = {"train": 8, "vi": 6}
DEFAULT_ACTIVATION = {"train": TRAIN_ACTIVATION, "vi": "tanh"}
_SHARED_HELP = {
    "train": {
        "activation": "silu, which keeps growing beyond the data, so the tails extrapolate; "
        "tanh is the tutorial's",
        "lr": "peak adamw learning rate, on the --schedule",
        "out": "runs/<dataset>-<time>/",
        "hidden": "64 64; 128 128 128 for cnf",
        "steps": "4000; 8000 with flow matching",
    },
    "vi": {
        "activation": "tanh, the tutorial's",
        "lr": "peak adam learning rate: a short linear warm-up, then a cosine decay to 0",
        "out": "runs/vi-<target>-<time>/",
        "hidden": "32",
        "steps": "5000",
    },
}


def _shared_flags(command: str) -> argparse.ArgumentParser:
    """The parent parser (argparse ``parents=``) of the flags `train` and `vi` share: the flow,
    the optimizer, the seed and the outputs, with ``command``'s defaults. Each command gets
    its own (argparse shares a parent's actions, so one parent cannot hold two defaults)."""
    words = _SHARED_HELP[command]
    p = _Parser(add_help=False)
    p.add_argument(
        "--flow",
        default=None,
        help="flow constructor (default: realnvp; nsf in one dimension, where a coupling can "
        "only be affine)",
    )
    p.add_argument(
        "--layers",
        type=_positive_int,
        help=f"number of layers (default: {DEFAULT_LAYERS[command]}; not an option of cnf)",
    )
    p.add_argument(
        "--hidden",
        type=_positive_int,
        nargs="+",
        help=f"hidden layer sizes of the conditioner MLP (default: {words['hidden']})",
    )
    p.add_argument(
        "--leaky-relu",
        action="store_true",
        help="interleave the tutorial's learnable LeakyReLU layers (realnvp)",
    )
    p.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default=None,  # None: the command's default, and flows without the option accept it
        help=f"conditioner activation (default: {words['activation']})",
    )
    p.add_argument(
        "--steps", type=_positive_int, help=f"optimizer steps, at most (default: {words['steps']})"
    )
    p.add_argument("--lr", type=_positive_float, help=f"{words['lr']} (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help=f"run folder (default: {words['out']})")
    p.add_argument("--no-plots", action="store_true", help="skip the four figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    _add_cache_flag(p)
    p.set_defaults(**SHARED_DEFAULTS[command])
    return p


def _add_cache_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="do not keep compiled programs on disk (JAX's persistent compilation cache, in "
        "$NFLAX_CACHE_DIR or ~/.cache/nflax/jax; NFLAX_NO_CACHE=1 does the same)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nflax", description="Normalizing flows in JAX: train, sample, vi.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train_flags(
        sub.add_parser(
            "train", parents=[_shared_flags("train")], help="train a flow on a built-in 2D data set"
        )
    )
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="a run folder written by `nflax train`")
    s.add_argument("-n", "--num", type=_positive_int, default=1000, help="number of samples")
    s.add_argument("-o", "--output", required=True, help="output file, .npy or .csv")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    _add_cache_flag(s)
    _add_vi_flags(
        sub.add_parser(
            "vi",
            parents=[_shared_flags("vi")],
            help="fit a flow to an unnormalised density (variational inference)",
        )
    )
    return p


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    """`train`'s own flags: the data, then the run and the training recipe."""
    t.add_argument(
        "--dataset",
        default="banana",
        help="data set name (default: banana); the image sets digits, mnist_5k, mnist and "
        "fashion_mnist train by dequantized maximum likelihood and report bits/dim",
    )
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
    t.add_argument("--num-points", type=_positive_int, default=1024, help="training points")
    t.add_argument(
        "--no-actnorm",
        action="store_true",
        help="no leading ActNorm (which standardises the data); the tutorial's exact stack",
    )
    _add_image_flags(t)
    _add_process_flags(t)
    _add_recipe_flags(t)


def _add_image_flags(t: argparse.ArgumentParser) -> None:
    """The flags of the image sets: where MNIST lives, the noise, the image flows' shape."""
    t.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="folder of the IDX files (train-images-idx3-ubyte[.gz] …) for --dataset mnist or "
        "fashion_mnist",
    )
    t.add_argument(
        "--dequantization",
        choices=["uniform", "variational"],
        default=None,
        help="image sets: the noise that makes the levels continuous (default: uniform; "
        "variational trains a conditional realnvp q(u | x) with the flow)",
    )
    t.add_argument(
        "--levels",
        type=_positive_int,
        default=None,
        help="image flows (glow, realnvp_image): number of scales (default: per data set)",
    )
    t.add_argument(
        "--depth",
        type=_positive_int,
        default=None,
        help="image flows: flow steps per scale (default: per data set)",
    )
    t.add_argument(
        "--iw-samples",
        type=_positive_int,
        default=None,
        metavar="K",
        help="image sets: noise draws per test image for the importance-weighted test "
        "bits/dim (default: per data set)",
    )


def _add_process_flags(t: argparse.ArgumentParser) -> None:
    """Devices, processes and checkpoints."""
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


def _add_recipe_flags(t: argparse.ArgumentParser) -> None:
    """The objective, minibatches, the schedule, weight decay and early stopping."""
    t.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="maximum likelihood (any flow; through the ODE solver for cnf, as FFJORD) or flow "
        "matching (cnf only); default: flow-matching for cnf, likelihood for the others",
    )
    t.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="minibatch size (default: full batch)",
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
        default=None,
        help="adamw weight decay of the conditioners' kernels (default 3 for likelihood: strong, "
        "so that the tails keep their shape; the tutorial used 1e-4. Default 0 for "
        "flow-matching, where decay pulls the vector field toward zero)",
    )
    t.add_argument(
        "--patience",
        type=_positive_int,
        default=None,
        help="early stopping patience in steps, on the validation loss (default 1000 with "
        "likelihood; none with flow-matching, whose flow is the moving average of the whole run)",
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


def _add_vi_flags(v: argparse.ArgumentParser) -> None:
    """`vi`'s own flags: the target and the ELBO's estimator."""
    v.add_argument(
        "--target",
        default="energy1",
        help="target name (default: energy1; an unknown name lists the known ones)",
    )
    v.add_argument(
        "--dim", type=_positive_int, default=None, help="dimension (correlated_gaussian)"
    )
    v.add_argument(
        "--num-samples",
        type=_positive_int,
        default=512,
        help="samples per step for the ELBO (default: 512)",
    )
    v.add_argument(
        "--stick-the-landing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="path-derivative gradient (Roeder et al. 2017): drop the score term (default: on; "
        "--no-stick-the-landing differentiates log q through the sample too)",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        args.given = given_flags(argv)
        return _dispatch(args)
    except UsageError as e:
        print(f"nflax: error: {e}", file=sys.stderr)
        return 2


def given_flags(argv: list[str]) -> set[str]:
    """The destinations (``args`` attribute names) of the flags ``argv`` sets explicitly,
    however they are spelled (abbreviated, ``--flag=value``): ``argv`` parsed again with every
    default suppressed.

    >>> sorted(given_flags(["train", "--dataset", "digits", "--steps=5"]))
    ['command', 'dataset', 'steps']
    """
    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    for parser in sub.choices.values():
        parser._defaults.clear()
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _dispatch(args) -> int:
    """Run the command; a :class:`nflax.runs.RunError` (bad input found while running) is a
    usage error too. :mod:`nflax.runs` (and JAX) is imported only once the flags parse.

    The command keeps its compiled programs in JAX's persistent compilation cache
    (:func:`cache_dir`), so the next command with the same settings loads them from disk; a
    cache folder that cannot be used costs one warning line, never the run."""
    from nflax import _compile, runs

    if not hasattr(args, "given"):  # parsed elsewhere: no flag counts as given explicitly
        args.given = set()
    try:
        with _compile.persistent_cache(cache_dir(args.no_cache)):
            {"train": _train, "vi": _vi, "sample": _sample}[args.command](args, runs)
    except runs.RunError as e:
        raise UsageError(str(e)) from None
    return 0


NO_CACHE_VALUES = ("", "0", "false", "no", "off")


def cache_dir(no_cache: bool = False) -> str | None:
    """The folder of the persistent compilation cache: ``$NFLAX_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/nflax/jax``, else ``~/.cache/nflax/jax``; ``None`` (off) with
    ``--no-cache`` or ``NFLAX_NO_CACHE`` set to anything but 0/false/no/off.

    >>> cache_dir(no_cache=True) is None
    True
    """
    if no_cache or os.environ.get("NFLAX_NO_CACHE", "").strip().lower() not in NO_CACHE_VALUES:
        return None
    if os.environ.get("NFLAX_CACHE_DIR"):
        return os.environ["NFLAX_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nflax", "jax")


# ---------------------------------------------------------------------------------------------
def _default_flow(dim: int) -> str:
    """The constructor used when ``--flow`` is not given: realnvp, but nsf in one dimension
    (a coupling layer of one coordinate sees no other coordinate, so it can only be affine,
    and a realnvp there is a Gaussian; nsf's splines are not)."""
    return "nsf" if dim == 1 else "realnvp"


def _flow_kwargs(args, dim: int) -> dict:
    """The constructor's keyword arguments from the flags (``args.flow`` is set to the default
    flow for ``dim`` when it was not given)."""
    if args.flow is None:
        args.flow = _default_flow(dim)
    from nflax import flows

    if args.flow in flows.IMAGE_CONSTRUCTORS:
        from nflax.cli_images import image_names, source

        raise UsageError(
            f"flow {args.flow!r} models images: it needs an image set (nflax train --dataset "
            f"{' | '.join(image_names())}), not {source(args)}"
        )
    if args.flow not in flows.CONSTRUCTORS:
        known = ", ".join(sorted(flows.CONSTRUCTORS))
        raise UsageError(f"unknown flow {args.flow!r}; known flows: {known}")
    params = inspect.signature(flows.CONSTRUCTORS[args.flow]).parameters
    activation = args.activation or DEFAULT_ACTIVATION[args.command]
    kwargs = {"dim": dim}
    if args.layers is not None and "num_layers" not in params:
        raise UsageError(f"--layers is not an option of flow {args.flow!r}")
    layers = args.layers or DEFAULT_LAYERS[args.command]
    for flag, name, value in [
        ("--layers", "num_layers", layers),
        ("--hidden", "hidden", list(_hidden(args))),
        ("--leaky-relu", "leaky_relu", args.leaky_relu),
        ("--no-actnorm", "actnorm", not getattr(args, "no_actnorm", True)),
        ("--activation", "activation", activation),
    ]:
        if name in params:
            kwargs[name] = value
        elif (flag == "--leaky-relu" and value) or (flag == "--activation" and args.activation):
            raise UsageError(f"{flag} is not an option of flow {args.flow!r}")
    return kwargs


def _hidden(args) -> list[int]:
    """``--hidden``, else the flow's own default for ``nflax train``."""
    if args.hidden is not None:
        return args.hidden
    return TRAIN_HIDDEN.get(args.flow, DEFAULT_HIDDEN)


def _start_processes(args) -> None:
    """With ``--coordinator``: join the multi-process run (every device of every process)."""
    if args.coordinator is None:
        return
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


def _train(args, runs) -> None:
    plots = not args.no_plots
    from nflax import cli_images

    if args.resume is None and cli_images.is_image_run(args):
        config, name = cli_images.image_config(args)
    else:
        cli_images.refuse_image_flags(args)
        _start_processes(args)
        if args.resume is not None:
            runs.resume_train(args.resume, quiet=args.quiet, plots=plots)
            return
        config, name = _train_config(args, runs)
    out = Path(args.out) if args.out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs.run_train(config, out, quiet=args.quiet, plots=plots)


def _train_config(args, runs) -> tuple[dict, str]:
    """A new training run's configuration from the flags, and its data's name."""
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
    if args.conditional and args.data is not None:
        raise UsageError("--conditional works with the built-in conditional sets, not --data")
    dataset = (
        "conditional_banana" if args.conditional and args.dataset == "banana" else args.dataset
    )
    data = runs.describe_data(dataset, args.data, conditional=args.conditional)
    config.update(data.config)
    config["flow_kwargs"] = _flow_kwargs(args, config["dim"])
    config["flow"] = args.flow
    config["objective"] = _objective(args)
    if config["steps"] is None:
        config["steps"] = TRAIN_STEPS[config["objective"]]
    if config["weight_decay"] is None:
        config["weight_decay"] = DEFAULT_WEIGHT_DECAY[config["objective"]]
    if args.patience is None and not args.no_early_stopping:
        config["patience"] = TRAIN_PATIENCE[config["objective"]]
    if args.conditional:
        from nflax import flows

        if "context_dim" not in inspect.signature(flows.CONSTRUCTORS[args.flow]).parameters:
            raise UsageError(f"flow {args.flow!r} has no conditional form")
        config["flow_kwargs"]["context_dim"] = data.context_dim
        if args.embedding is not None:
            config["flow_kwargs"]["embedding"] = list(args.embedding)
    elif args.embedding is not None:
        raise UsageError("--embedding needs --conditional (it embeds the context)")
    return config, data.name


def _objective(args) -> str:
    """The training objective: ``--objective``, else flow matching for the flows it can train
    and maximum likelihood for the others."""
    default = "flow-matching" if args.flow in FLOW_MATCHING_FLOWS else "likelihood"
    objective = args.objective or default
    if objective == "flow-matching" and args.flow not in FLOW_MATCHING_FLOWS:
        known = ", ".join(FLOW_MATCHING_FLOWS)
        raise UsageError(
            f"--objective flow-matching trains a continuous flow ({known}), not {args.flow!r}"
        )
    return objective


def _vi(args, runs) -> None:
    target = runs.vi_target(args.target, args.dim)
    kwargs = _flow_kwargs(args, target.dim)
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"vi-{target.name}-{stamp}"
    runs.run_vi(target, config, out, quiet=args.quiet, plots=not args.no_plots)


def _sample(args, runs) -> None:
    runs.run_sample(args.run, args.num, args.output, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
