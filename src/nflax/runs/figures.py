"""The figures of a run folder: ``trajectory.png``, ``samples.png``, ``loss.png`` and, in one
and two dimensions, ``density.png``; an image run's ``samples.png`` (grids at two
temperatures), ``reconstructions.png`` and ``loss.png`` (bits/dim)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

from nflax import plotting
from nflax.runs.data import RunData

DPI = 110


def train_figures(out: Path, flow, data: RunData, history, key, config: dict) -> None:
    """The figures of a ``nflax train`` run (a conditional run's: :func:`conditional_figures`);
    a data-file run's axes are named by its CSV columns."""
    if data.context is not None:
        return conditional_figures(out, flow, data.dataset, history, key)
    k1, k2 = jax.random.split(key)
    labels = axis_labels(config)
    figs = {
        "trajectory.png": plotting.plot_trajectory(flow, data.x, key=k1),
        "samples.png": plotting.plot_samples(flow, k2, n=len(data.x), data=data.x, labels=labels),
        "loss.png": plotting.plot_history(history),
    }
    if data.dim <= 2:
        figs["density.png"] = plotting.plot_density(
            flow, data.x, true_log_prob=data.log_prob_true, labels=labels
        )
    _save(out, figs)


def conditional_figures(out: Path, flow, dataset, history, key) -> None:
    """Samples at three contexts beside the conditional set's own, the densities there (2-D
    sets) and the loss."""
    contexts = np.linspace(0.5, 1.5, 3, dtype=np.float32)[:, None]
    keys = jax.random.split(key, len(contexts) + 1)
    reference = [
        np.asarray(dataset.sample_given(k, ctx, 1000))
        for k, ctx in zip(keys[1:], contexts, strict=True)
    ]
    figs = {
        "samples.png": plotting.plot_conditional_samples(
            flow, keys[0], contexts, 1000, reference=reference
        )
    }
    if dataset.dim == 2:  # one grid for every context, spanning all the reference samples
        figs["density.png"] = plotting.plot_conditional_density(
            flow, contexts, data=np.concatenate(reference), true_log_prob=dataset.log_prob
        )
    figs["loss.png"] = plotting.plot_history(history)
    _save(out, figs)


def axis_labels(config: dict) -> list[str] | None:
    """Axis labels of a data-file run's plots: its CSV column names, in standardised units
    (the flow's); ``None`` when the file named no columns.

    >>> axis_labels({"columns": ["age", "income"], "standardize": {}})
    ['age', 'income']
    >>> axis_labels({"columns": ["age"], "standardize": {"mean": [40.0], "std": [12.0]}})
    ['age (standardised)']
    """
    if not config.get("columns"):
        return None
    unit = " (standardised)" if config.get("standardize") else ""
    return [f"{name}{unit}" for name in config["columns"]]


def vi_figures(out: Path, flow, target, history, samples: np.ndarray, key) -> None:
    """The figures of a ``nflax vi`` run: the trajectory of ``samples`` (drawn from the flow)
    in the generating direction, fresh samples, the ELBO and, for a 2-D target, the flow's
    density beside the target's."""
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
    _save(out, figs)


def image_figures(out: Path, flow, images, history, key, config: dict) -> None:
    """An image run's figures: ``samples.png`` (a grid per temperature of
    :data:`nflax.runs.images.TEMPERATURES`), ``reconstructions.png`` (``images``: test levels
    and their reconstructions through the latent) and ``loss.png`` in bits/dim."""
    from nflax.runs.images import TEMPERATURES, sample_images

    shape, k = config["event_shape"], config["num_levels"]
    n = len(images[0])
    keys = jax.random.split(key, len(TEMPERATURES))
    samples = Figure(figsize=(3.2 * len(TEMPERATURES), 3.4), layout="constrained")
    for ax, t, kt in zip(samples.subplots(1, len(TEMPERATURES)), TEMPERATURES, keys, strict=True):
        plotting.image_grid(ax, sample_images(flow, kt, n, t, shape), title=f"temperature {t}")
    samples.suptitle(f"{config['flow']} on {config['dataset']}: samples", fontsize=10)
    recon = Figure(figsize=(6.4, 3.4), layout="constrained")
    for ax, levels, title in zip(
        recon.subplots(1, 2), images, ("test images", "reconstructed from the latent"), strict=True
    ):
        plotting.image_grid(ax, np.reshape(levels, (n, *shape)) / (k - 1), title=title)
    loss = plotting.plot_history(history, bits_per_dim=config["dim"])
    _save(out, {"samples.png": samples, "reconstructions.png": recon, "loss.png": loss})


def _save(out: Path, figs: dict) -> None:
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=DPI)
