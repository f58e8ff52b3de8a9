"""The image sets' half of ``nflax train``: their flags turned into a run configuration.

:mod:`nflax.cli` parses the flags and calls :func:`image_config` when ``--dataset`` names an
image set (:func:`nflax.image_data.image_names`); the run itself is
:mod:`nflax.runs.images`. An image flow (``glow``, ``realnvp_image``) takes ``--levels``,
``--depth`` and one ``--hidden`` width; a flat vector flow trains on the flattened image. Each
set and flow has its defaults (below); a flag given explicitly (``args.given``, from
:func:`nflax.cli.given_flags`) overrides them, and one the chosen flow has no option for is
refused with a :class:`~nflax.cli.UsageError`.
"""

from __future__ import annotations

import inspect

from nflax.cli import UsageError, _flow_kwargs
from nflax.image_data import image_names

# The defaults of a run when its flag is not given, per set. digits: benchmarks/README.md,
# "Image flows on digits" (a spline glow, 2000 steps of 64 on the warm-up + cosine schedule,
# validated and kept as a moving average of the parameters, `ema`). The MNIST sets keep the
# recipe (and, below, the ResNet conditioner) their figures were measured with.
IMAGE_RECIPE = {
    "digits": {
        "steps": 2000,
        "batch_size": 64,
        "lr": 1e-3,
        "patience": 500,
        "iw_samples": 128,
        "ema": 0.999,
    },  # fmt: skip
    "mnist_5k": {"steps": 500, "batch_size": 64, "lr": 1e-3, "patience": 300, "iw_samples": 32},
    "mnist": {"steps": 20000, "batch_size": 128, "lr": 1e-3, "patience": 2000, "iw_samples": 32},
}
IMAGE_RECIPE["fashion_mnist"] = IMAGE_RECIPE["mnist"]
IMAGE_WEIGHT_DECAY = 0.0  # plain adam: the strong 2-D default (3) is for tails of toy sets
# the image flows' shape per set: (levels, depth, hidden); 28×28 takes 3 levels (7×7 last)
IMAGE_FLOW_SHAPE = {
    "glow": {"digits": (2, 4, 64), "mnist_5k": (3, 2, 32), "mnist": (3, 8, 64)},
    "realnvp_image": {"digits": (2, 2, 64), "mnist_5k": (3, 1, 32), "mnist": (3, 4, 64)},
}
# the image flows' other constructor arguments per set (no flags: a run records them in its
# config.json); digits: the benchmark's spline image flows at half its depth (a few minutes
# on 2 CPU cores)
_MNIST_OPTIONS = {"conditioner": "resnet"}
IMAGE_FLOW_OPTIONS = {
    "glow": {
        "digits": {"coupling": "spline", "squeeze_last": True},
        "mnist_5k": _MNIST_OPTIONS,
        "mnist": _MNIST_OPTIONS,
    },
    "realnvp_image": {
        "digits": {"coupling": "spline", "conditioner": "glow", "squeeze_last": True},
    },
}
# a flat flow on the flattened image: docs/dequantization.md's realnvp (2.50 test bits/dim on
# digits, bound; 6 layers of 256 overfit: 3.02), steps cheap enough for more of them
FLAT_ON_IMAGES = {"layers": 4, "hidden": [64], "steps": 2000}
DEFAULT_IMAGE_FLOW = "glow"
# flags of the 2-D runs that an image run has no use for: (flag, destination, why)
_NOT_FOR_IMAGES = [
    ("--num-points", "num_points", "the image sets have fixed splits"),
    ("--val-fraction", "val_fraction", "the image sets have a fixed validation split"),
    ("--conditional", "conditional", "image runs are unconditional"),
    ("--embedding", "embedding", "image runs are unconditional"),
    ("--devices", "devices", "image runs train on one device"),
    ("--coordinator", "coordinator", "image runs train on one device"),
    ("--num-processes", "num_processes", "image runs train on one device"),
    ("--process-id", "process_id", "image runs train on one device"),
]
_IMAGE_ONLY = [
    ("--data-dir", "data_dir"),
    ("--dequantization", "dequantization"),
    ("--levels", "levels"),
    ("--depth", "depth"),
    ("--iw-samples", "iw_samples"),
]


def is_image_run(args) -> bool:
    """Whether ``args`` (parsed ``nflax train`` flags) start a run on an image set."""
    return args.data is None and args.dataset in image_names()


def source(args) -> str:
    """The run's data, in words: ``--dataset banana`` or ``--data FILE``."""
    return f"--data {args.data}" if args.data is not None else f"--dataset {args.dataset}"


def refuse_image_flags(args) -> None:
    """A 2-D (or data-file) run refuses the flags that only image sets use."""
    for flag, dest in _IMAGE_ONLY:
        if dest in args.given:
            raise UsageError(
                f"{flag} is for the image sets ({', '.join(image_names())}), not {source(args)}"
            )


def image_config(args) -> tuple[dict, str]:
    """A new image run's configuration from the flags, and its name."""
    from nflax.runs.images import describe_images, variational_spec

    for flag, dest, why in _NOT_FOR_IMAGES:
        if dest in args.given:
            raise UsageError(f"{flag} does not apply to --dataset {args.dataset}: {why}")
    if args.dataset in ("mnist", "fashion_mnist") and args.data_dir is None:
        raise UsageError(
            f"--dataset {args.dataset} is read from IDX files in a folder: add --data-dir DIR"
        )
    if args.data_dir is not None and args.dataset not in ("mnist", "fashion_mnist"):
        raise UsageError(f"--data-dir is for --dataset mnist or fashion_mnist, not {args.dataset}")
    spec = describe_images(args.dataset, args.data_dir)  # RunError: missing folder, files
    recipe = IMAGE_RECIPE[args.dataset]
    for dest, value in {**recipe, "weight_decay": IMAGE_WEIGHT_DECAY}.items():
        if dest not in args.given:
            setattr(args, dest, value)
    flow, kwargs = _image_flow_kwargs(args, spec)
    if args.no_early_stopping and "patience" in args.given:
        raise UsageError("--patience needs early stopping; drop --no-early-stopping")
    deq = args.dequantization or "uniform"
    config = {
        "command": "train",
        "images": True,
        "flow": flow,
        "flow_kwargs": kwargs,
        **spec,
        "dequantization": deq,
        "dequantizer": variational_spec(spec["dim"]) if deq == "variational" else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "weight_decay": args.weight_decay,
        "ema": recipe.get("ema"),
        "early_stopping": not args.no_early_stopping,
        "patience": None if args.no_early_stopping else args.patience,
        "checkpoint_every": args.checkpoint_every,
        "iw_samples": args.iw_samples,
        "seed": args.seed,
    }
    return config, f"{args.dataset}-{flow}"


def _image_flow_kwargs(args, spec: dict) -> tuple[str, dict]:
    """The flow of an image run and its keyword arguments: an image flow over ``(H, W, C)``
    (``--levels``, ``--depth``, one ``--hidden`` width, ``--activation``, ``--no-actnorm``
    where it has the option; the set's defaults otherwise), or a flat flow over ``(D,)``. A
    flag given explicitly that the flow has no option for is refused."""
    from nflax import flows

    flow = args.flow or DEFAULT_IMAGE_FLOW
    if flow not in flows.IMAGE_CONSTRUCTORS:  # a flat vector flow on the flattened image
        for flag, dest in (("--levels", "levels"), ("--depth", "depth")):
            if dest in args.given:
                known = ", ".join(sorted(flows.IMAGE_CONSTRUCTORS))
                raise UsageError(f"{flag} is an option of the image flows ({known}), not {flow!r}")
        for dest, value in FLAT_ON_IMAGES.items():
            if dest not in args.given:
                setattr(args, dest, value)
        args.flow = flow
        return flow, _flow_kwargs(args, spec["dim"])
    params = inspect.signature(flows.IMAGE_CONSTRUCTORS[flow]).parameters
    group = "mnist" if args.dataset == "fashion_mnist" else args.dataset
    levels, depth, hidden = IMAGE_FLOW_SHAPE.get(flow, {}).get(group, (None, None, None))
    if "hidden" in args.given:
        if len(args.hidden) != 1:
            raise UsageError(
                f"--hidden of flow {flow!r} is one width (its conv nets' channels), received "
                f"{len(args.hidden)} sizes"
            )
        hidden = args.hidden[0]
    options = [  # (flag, destination, the constructor's argument, value, default)
        ("--levels", "levels", "levels", args.levels, levels),
        ("--depth", "depth", "depth", args.depth, depth),
        ("--hidden", "hidden", "hidden", hidden, hidden),
        ("--activation", "activation", "activation", args.activation, None),
        ("--no-actnorm", "no_actnorm", "actnorm", False, None),
        ("--layers", "layers", "num_layers", args.layers, None),
        ("--leaky-relu", "leaky_relu", "leaky_relu", True, None),
    ]
    kwargs = {"event_shape": spec["event_shape"]}
    for flag, dest, name, value, default in options:
        if dest in args.given and name not in params:
            raise UsageError(f"{flag} is not an option of flow {flow!r}")
        if dest in args.given:
            kwargs[name] = value
        elif default is not None:
            kwargs[name] = default
    kwargs.update(IMAGE_FLOW_OPTIONS.get(flow, {}).get(group, {}))
    return flow, kwargs
