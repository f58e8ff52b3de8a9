"""A ``nflax train`` run on an image set: dequantized maximum likelihood, bits per dimension.

The run's configuration names an image set (:func:`nflax.image_data.load_images`: ``digits``,
``mnist_5k``, or ``mnist`` / ``fashion_mnist`` read from ``data_dir``) and a flow: an image
flow (``glow``, ``realnvp_image``: event ``(H, W, C)``) or a flat vector flow on the
flattened image (event ``(D,)``), so one command compares the two. The flow is trained on
the train split by :func:`nflax.fit_dequantized` (uniform or variational noise), with the
validation split for early stopping, and the run folder gets the flow (and a variational
run's noise flow, ``dequantizer/``), ``history.csv``, ``metrics.json`` (the test bits/dim,
importance-weighted with ``iw_samples`` noise draws, and the single-sample bound) and the
figures ``samples.png`` (temperatures 1.0 and 0.7), ``reconstructions.png`` and ``loss.png``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nflax import _compile, checkpoint, image_data
from nflax.dequantization import fit_dequantized, uniform_dequantize
from nflax.metrics import bits_per_dim, importance_weighted_nll
from nflax.runs.common import build_flow, history_metrics, save_run
from nflax.runs.folder import RunError, write_json
from nflax.runs.sample import to_levels
from nflax.training import default_optimizer

NUM_SHOWN = 36  # images per panel of samples.png and reconstructions.png
TEMPERATURES = (1.0, 0.7)
# The variational noise flow q(u | x) of `--dequantization variational`, over the flattened
# noise's logit (docs/dequantization.md measured this one on digits).
VARIATIONAL = {"flow": "realnvp", "num_layers": 4, "hidden": [64]}


def describe_images(name: str, data_dir: str | None = None) -> dict:
    """The ``config.json`` entries of the image set ``name`` (read from ``data_dir`` for
    ``mnist`` / ``fashion_mnist``): ``dataset``, ``data_dir``, ``num_levels``,
    ``event_shape`` and ``dim``; :class:`RunError` for an unknown set, a missing folder or
    files, or a file that cannot be read.

    >>> describe_images("digits")
    {'dataset': 'digits', 'data_dir': None, 'num_levels': 17, 'event_shape': [8, 8, 1], 'dim': 64}
    """
    data = load_images(name, data_dir)
    where = None if data_dir is None else str(Path(data_dir).absolute())
    return {
        "dataset": name,
        "data_dir": where,
        "num_levels": data.num_levels,
        "event_shape": list(data.event_shape),
        "dim": data.dim,
    }


def load_images(name: str, data_dir: str | None = None) -> image_data.ImageData:
    """:func:`nflax.image_data.load_images`, its errors as :class:`RunError`. IDX files
    (``data_dir``) keep the last ``min(5000, n // 10)`` of their ``n`` training images for
    validation: MNIST's 5 000, a tenth of a smaller file."""
    try:
        if data_dir is None:
            return image_data.load_images(name, data_dir)
        n = len(image_data.read_mnist(data_dir, "train")[0])
        return image_data.load_images(name, data_dir, validation=min(5000, n // 10))
    except (ValueError, OSError, ImportError) as e:  # IDXError is a ValueError
        raise RunError(str(e)) from None


def variational_spec(dim: int) -> dict:
    """The ``flow`` and ``flow_kwargs`` of a variational run's noise flow over ``(dim,)``.

    >>> variational_spec(64)["flow_kwargs"]["context_dim"]
    64
    """
    kwargs = {"dim": dim, "num_layers": VARIATIONAL["num_layers"], "hidden": VARIATIONAL["hidden"]}
    return {"flow": VARIATIONAL["flow"], "flow_kwargs": {**kwargs, "context_dim": dim}}


def train_images(config: dict, out: Path, *, resume: bool, quiet: bool, plots: bool) -> dict:
    """The image run ``config`` in the claimed folder ``out``: data, flow, fit, metrics,
    files. Returns the metrics."""
    data = load_images(config["dataset"], config.get("data_dir"))
    if list(data.event_shape) != config["event_shape"]:
        raise RunError(
            f"{config['dataset']} now has images of shape {data.event_shape}; the run was "
            f"started with {tuple(config['event_shape'])}"
        )
    key_fit, key_eval, key_plot = jax.random.split(jax.random.key(config["seed"]), 3)
    flow = build_flow(config)
    noise = None
    if config.get("dequantizer"):
        noise = build_flow({**config["dequantizer"], "seed": config["seed"] + 1})
    shape = tuple(flow.event_shape)  # (H, W, C), or (D,) for a flat flow
    train, val, test = (a.reshape(len(a), *shape) for a in (data.train, data.validation, data.test))
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(out / "config.json", config)
    history = _fit(flow, noise, train, val, config, out, key_fit, resume=resume, quiet=quiet)
    metrics = image_metrics(flow, noise, (train, test), history, key_eval, config)
    shown = test[:NUM_SHOWN]
    recon = reconstruct(flow, shown, config["num_levels"], key_plot)
    metrics.update(recon["metrics"])
    save_run(out, flow, history, metrics)
    if noise is not None:
        checkpoint.save(out / "dequantizer", noise)
    if plots:
        from nflax.runs.figures import image_figures

        images = (shown, recon["levels"])
        image_figures(out, flow, images, history, key_plot, config)
    if not quiet:
        print(image_summary_line(config["dataset"], metrics, out))
    return metrics


def _fit(flow, noise, train, val, config: dict, out: Path, key, *, resume: bool, quiet: bool):
    """``fit_dequantized`` with the run's recipe, checkpointing into ``out``."""
    steps = config["steps"]
    early = config["early_stopping"]
    try:
        return fit_dequantized(
            flow,
            train,
            config["num_levels"],
            key=key,
            steps=steps,
            dequantizer="uniform" if noise is None else noise,
            validation=val if early else None,
            optimizer=default_optimizer(
                steps, config["lr"], config["weight_decay"], config["schedule"]
            ),
            batch_size=config["batch_size"],
            patience=config["patience"] if early else None,
            progress=False if quiet else None,
            checkpoint_dir=out / "checkpoints",
            checkpoint_every=config["checkpoint_every"],
            resume=resume,
            ema=config.get("ema"),  # absent from the configs of older runs: none
        )
    except (ValueError, checkpoint.CheckpointError) as e:
        raise RunError(str(e)) from None


def image_metrics(flow, noise, splits, history, key, config: dict) -> dict:
    """The entries of ``metrics.json``: test bits/dim importance-weighted with
    ``config["iw_samples"]`` noise draws per image (``test_bits_per_dim``) and the
    single-sample bound (``test_bits_per_dim_bound``), the training bound, the best
    validation figure, the NLLs behind them (nats per image), the data's ``num_levels`` and
    ``dim``, the uniform-over-levels figure ``log2 K``, and how training went."""
    train, test = splits
    k, d, s = config["num_levels"], config["dim"], config["iw_samples"]
    deq = "uniform" if noise is None else noise
    keys = jax.random.split(key, 3)

    def nll(levels, key, num_samples: int) -> float:
        v = importance_weighted_nll(
            flow, levels, k, key=key, num_samples=num_samples, dequantizer=deq
        )
        return float(np.mean(v))

    test_iw, test_bound, train_bound = (
        nll(test, keys[0], s),
        nll(test, keys[1], 1),
        nll(train, keys[2], 1),
    )
    metrics = {
        "test_bits_per_dim": bits_per_dim(test_iw, d, num_levels=None),
        "test_bits_per_dim_bound": bits_per_dim(test_bound, d, num_levels=None),
        "train_bits_per_dim": bits_per_dim(train_bound, d, num_levels=None),
    }
    if history.best_loss is not None and len(history.val_loss):
        metrics["validation_bits_per_dim"] = bits_per_dim(
            float(np.nanmin(history.val_loss)), d, num_levels=None
        )
    metrics.update(
        test_nll=test_iw,
        test_nll_bound=test_bound,
        train_nll_bound=train_bound,
        iw_samples=s,
        num_levels=k,
        dim=d,
        uniform_bits_per_dim=math.log2(k),
        num_train_images=len(train),
        num_test_images=len(test),
        dequantization=config["dequantization"],
        units="nats per image for the NLLs; bits/dim = NLL / (dim · ln 2), in data space",
    )
    metrics.update(history_metrics(history))
    return metrics


def reconstruct(flow, levels: np.ndarray, num_levels: int, key) -> dict:
    """Round trip of dequantized images ``y = (x + u)/K`` through the flow's bijection, data →
    latent → data (``inverse(forward(y))``), and the result mapped back to levels
    ``⌊K·y'⌋``. Returns ``levels`` (the reconstructed levels) and ``metrics``:
    ``reconstruction_max_abs_error`` (``max |y' − y|``, in the flow's ``[0, 1]`` units) and
    ``reconstruction_wrong_levels`` (values whose level changed: 0 for an exact flow)."""
    y = uniform_dequantize(key, levels, num_levels)
    y_back = np.asarray(apply_bijection(flow, apply_bijection(flow, y, "forward"), "inverse"))
    y = np.asarray(y)
    back = to_levels(y_back, num_levels, levels.shape[1:])
    return {
        "levels": back,
        "metrics": {
            "reconstruction_max_abs_error": float(np.max(np.abs(y_back - y))),
            "reconstruction_wrong_levels": int(np.sum(back != levels)),
        },
    }


def sample_images(flow, key, n: int, temperature: float, event_shape) -> np.ndarray:
    """``n`` samples of the flow at ``temperature`` (``flow.sample(key, n,
    temperature=temperature)``: the base's noise scaled by it, pushed through the inverse)
    as images ``(n, H, W, C)`` in the flow's ``[0, 1]`` units (a flat flow's vectors
    reshaped). The inverse pass is the one compiled program of :func:`apply_bijection`."""
    z = temperature * flow.base.sample(key, (n,))
    return np.asarray(jnp.reshape(apply_bijection(flow, z, "inverse"), (n, *event_shape)))


def apply_bijection(flow, x, direction: str) -> jax.Array:
    """``flow.bijection.forward(x)[0]`` (data → latent) or ``.inverse(x)[0]`` (latent →
    data), compiled once per flow structure, shape and direction (eager, a Glow's hundreds of
    small operations each compile on their own)."""
    graphdef, state = nnx.split(flow)
    return _bijection_program(_compile.Static(graphdef), state, jnp.asarray(x), direction)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _bijection_program(graphdef: _compile.Static, state, x, direction: str):
    return getattr(nnx.merge(graphdef.value, state).bijection, direction)(x)[0]


def image_summary_line(name: str, metrics: dict, out: Path) -> str:
    """The line ``nflax train`` prints at the end of an image run.

    >>> print(image_summary_line("digits", {"test_bits_per_dim": 1.5,
    ...     "test_bits_per_dim_bound": 1.6, "iw_samples": 128, "uniform_bits_per_dim": 4.087,
    ...     "steps_run": 900, "stop_reason": "patience"}, Path("r")))
    digits: test 1.5000 bits/dim (IW 128; bound 1.6000; uniform 4.087), 900 steps (patience) → r
    """
    return (
        f"{name}: test {metrics['test_bits_per_dim']:.4f} bits/dim (IW {metrics['iw_samples']}; "
        f"bound {metrics['test_bits_per_dim_bound']:.4f}; uniform "
        f"{metrics['uniform_bits_per_dim']:.3f}), {metrics['steps_run']} steps "
        f"({metrics['stop_reason']}) → {out}"
    )
