"""Pictures of flows: layer-by-layer trajectories, densities, samples, loss curves and image
grids.

Every function returns a matplotlib ``Figure`` (:func:`image_grid` draws on the axes it is
given) and never calls ``plt.show``; save it with
``fig.savefig(path)``. Headless use needs no setup (nflax selects no backend itself; set
``MPLBACKEND=Agg`` where there is no display).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from nflax.distributions import Flow
from nflax.training import History

Array = jax.Array
_DATA, _SAMPLES = "0.6", "tab:red"  # colours of the data and of the flow's samples


def _limits(points: np.ndarray, pad: float = 0.05) -> tuple[tuple[float, float], ...]:
    lo = np.quantile(points, 0.005, axis=0)
    hi = np.quantile(points, 0.995, axis=0)
    span = np.maximum(hi - lo, 1e-6)
    return tuple(
        (float(a - pad * s), float(b + pad * s)) for a, b, s in zip(lo, hi, span, strict=True)
    )


def _scatter(ax, pts: np.ndarray, color, title: str) -> None:
    pts = np.asarray(pts)
    if pts.shape[-1] == 1:  # one colour: a histogram cannot follow each point
        ax.hist(pts[:, 0], bins=60, color="tab:blue", alpha=0.8)
    else:
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c=color, alpha=0.6, linewidths=0)
        (x0, x1), (y0, y1) = _limits(pts[:, :2])
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=6)


def plot_trajectory(
    flow: Flow,
    x: Array,
    *,
    key: Array | None = None,
    n: int | None = None,
    direction: str = "both",
    max_cols: int = 10,
) -> Figure:
    """The tutorial's picture: a batch after every layer, one panel per layer (a histogram
    per layer for a 1-D flow).

    ``direction="forward"`` pushes the data ``x`` through the layers (data → noise);
    ``"inverse"`` pushes standard-normal noise back (noise → data), ``"both"`` draws one row
    of each. Panels are titled by the layer type. Colours follow each point through the flow
    (coloured by its first data coordinate), so one can see how the layers move mass.
    """
    if direction not in ("forward", "inverse", "both"):
        raise ValueError(
            f"plot_trajectory: direction must be 'forward', 'inverse' or 'both', "
            f"received {direction!r}"
        )
    x = jnp.asarray(x)
    names = flow.layer_names()
    rows = []
    if direction in ("forward", "both"):
        traj = [np.asarray(t) for t in flow.trajectory(x)]
        titles = ["data"] + [f"{i + 1}: {nm}" for i, nm in enumerate(names)]
        rows.append(("data → noise", traj, titles, np.asarray(x)[:, 0]))
    if direction in ("inverse", "both"):
        key = jax.random.key(0) if key is None else key
        n = int(n or x.shape[0])
        traj = [np.asarray(t) for t in flow.sample_trajectory(key, n)]
        rev = list(reversed(names))
        titles = ["noise"] + [f"{len(names) - i}: {nm}⁻¹" for i, nm in enumerate(rev)]
        rows.append(("noise → data", traj, titles, traj[-1][:, 0]))
    ncols = min(len(rows[0][1]), max_cols)
    # With many layers, show evenly spaced steps (always the first and the last).
    pick = np.unique(np.round(np.linspace(0, len(rows[0][1]) - 1, ncols)).astype(int))
    fig = Figure(figsize=(1.9 * len(pick), 2.0 * len(rows) + 0.3), layout="constrained")
    axes = fig.subplots(len(rows), len(pick), squeeze=False)
    for r, (label, traj, titles, colour_by) in enumerate(rows):
        colours = (colour_by - colour_by.min()) / (np.ptp(colour_by) + 1e-12)
        import matplotlib

        cmap = matplotlib.colormaps["viridis"]
        for c, i in enumerate(pick):
            _scatter(axes[r, c], traj[i], cmap(colours), titles[i])
        axes[r, 0].set_ylabel(label, fontsize=9)
    return fig


def _grid_limits(who: str, data, xlim, ylim) -> tuple[tuple[float, float], tuple[float, float]]:
    """``xlim``/``ylim`` as given, else spanning the bulk of ``data``."""
    if data is None and (xlim is None or ylim is None):
        raise ValueError(f"{who}: give data or both xlim and ylim")
    if data is not None:
        (dx0, dx1), (dy0, dy1) = _limits(np.asarray(data)[:, :2], pad=0.15)
        xlim = xlim or (dx0, dx1)
        ylim = ylim or (dy0, dy1)
    return xlim, ylim


def _log_density_on_grid(log_prob, xs: np.ndarray, ys: np.ndarray, context=None) -> np.ndarray:
    """``log_prob`` at every point of the grid ``xs × ys``, shape ``(len(ys), len(xs))``; a
    ``context`` row (shape ``(context_dim,)``) is passed with every point."""
    grid = jnp.asarray(np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2), jnp.float32)
    if context is None:
        out = log_prob(grid)
    else:
        c = jnp.broadcast_to(jnp.asarray(context, jnp.float32), (grid.shape[0], np.size(context)))
        out = log_prob(grid, c)
    return np.asarray(out).reshape(len(ys), len(xs))


def density_grid(
    flow: Flow,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    resolution: int = 200,
    context: Array | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``log p`` of a 2D flow on a regular grid: returns ``(xs, ys, logp[ys, xs])``.

    For a conditional flow, ``context`` is one context row (shape ``(context_dim,)``), used at
    every grid point.
    """
    if flow.event_shape != (2,):
        raise ValueError(f"density_grid: needs a 2D flow, received event shape {flow.event_shape}")
    xs = np.linspace(*xlim, resolution)
    ys = np.linspace(*ylim, resolution)
    return xs, ys, _log_density_on_grid(jax.jit(flow.log_prob), xs, ys, context)


def plot_density(
    flow: Flow,
    data: Array | None = None,
    *,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    resolution: int = 200,
    true_log_prob=None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """The learned density of a 1-D or 2-D flow, with the data (and the true density).

    1-D: the density curve over a histogram of the data, on ``xlim`` (default: the bulk of the
    data). 2-D: the density on a grid, beside a scatter plot of the data. ``labels`` names the
    dimensions on the axes (e.g. a CSV file's column names).
    """
    if flow.event_shape == (1,):
        labels = _check_labels("plot_density", labels, 1)
        return _plot_density_1d(flow, data, xlim, resolution, true_log_prob, labels)
    labels = _check_labels("plot_density", labels, 2)
    xlim, ylim = _grid_limits("plot_density", data, xlim, ylim)
    data = None if data is None else np.asarray(data)
    xs, ys, logp = density_grid(flow, xlim, ylim, resolution)
    panels = []
    if data is not None:
        panels.append("data")
    panels.append("model")
    if true_log_prob is not None:
        panels.append("true")
    fig = Figure(figsize=(3.4 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    extent = (xlim[0], xlim[1], ylim[0], ylim[1])
    for ax, what in zip(axes, panels, strict=True):
        if what == "data":
            ax.scatter(data[:, 0], data[:, 1], s=2, c="k", alpha=0.5, linewidths=0)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_title(f"data ({len(data)} points)", fontsize=9)
        else:
            if what == "model":
                dens, title = np.exp(logp), "learned density"
            else:
                dens = np.exp(_log_density_on_grid(true_log_prob, xs, ys))
                title = "true density"
            ax.imshow(dens, origin="lower", extent=extent, aspect="auto", cmap="magma")
            ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        _label_axes(ax, labels)
    return fig


def _plot_density_1d(flow: Flow, data, xlim, resolution: int, true_log_prob, labels) -> Figure:
    """A 1-D flow's density curve over a histogram of the data (and the true density)."""
    if xlim is None:
        if data is None:
            raise ValueError("plot_density: give data or xlim")
        xlim = _limits(np.asarray(data)[:, :1], pad=0.15)[0]
    xs = np.linspace(*xlim, resolution)
    grid = jnp.asarray(xs[:, None], jnp.float32)
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    if data is not None:
        d = np.asarray(data)[:, 0]
        edges = np.linspace(*xlim, 61)
        weights = np.full(len(d), 1.0 / (len(d) * (edges[1] - edges[0])))  # density of all rows
        ax.hist(d, bins=edges, weights=weights, color=_DATA, label=f"data ({len(d)} points)")
    density = np.exp(np.asarray(jax.jit(flow.log_prob)(grid)))
    ax.plot(xs, density, color=_SAMPLES, lw=1.5, label="learned density")
    if true_log_prob is not None:
        ax.plot(xs, np.exp(np.asarray(true_log_prob(grid))), "k:", lw=1.2, label="true density")
    ax.set_xlim(*xlim)
    _label_axes(ax, [labels[0] if labels else "x", "density"])
    ax.legend(fontsize=8)
    return fig


def plot_samples(
    flow: Flow,
    key: Array,
    n: int = 2000,
    data: Array | None = None,
    *,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Samples of the flow (noise → data), over the data when given.

    A 1-D flow gives histograms, a 2-D flow a scatter plot, more dimensions a pair plot of
    every dimension (:func:`plot_pairs`). ``labels`` names the dimensions on the axes (e.g.
    a CSV file's column names).
    """
    samples = np.asarray(flow.sample(key, n))
    data = None if data is None else np.asarray(data)
    labels = _check_labels("plot_samples", labels, samples.shape[1])
    if samples.shape[1] > 2:
        return plot_pairs(samples, data, labels=labels)
    sets = _point_sets(samples, data)
    lims = _limits(np.concatenate([pts for _, pts, _ in sets]))
    fig = Figure(figsize=(4, 4), layout="constrained")
    ax = fig.subplots()
    if samples.shape[1] == 1:
        _histograms(ax, sets, 0, lims[0])
        _label_axes(ax, [labels[0] if labels else "x", "density"])
    else:
        _scatters(ax, sets, 0, 1)
        ax.set_ylim(*lims[1])
        _label_axes(ax, labels)
    ax.set_xlim(*lims[0])
    ax.legend(fontsize=8, markerscale=4)
    ax.set_title(f"{n} samples", fontsize=9)
    return fig


def plot_pairs(
    samples: Array, data: Array | None = None, *, labels: Sequence[str] | None = None
) -> Figure:
    """A pair (corner) plot of points with any number of dimensions: each pair of dimensions
    as a scatter plot below the diagonal, each dimension's histogram on the diagonal; the
    data (when given) in grey under the samples in red. ``labels`` names the dimensions
    (default ``x1, x2, …``).

    >>> import numpy as np
    >>> fig = plot_pairs(np.zeros((10, 3)), labels=["a", "b", "c"])
    >>> [ax.get_xlabel() for ax in fig.axes[-3:]]
    ['a', 'b', 'c']
    """
    samples = np.asarray(samples)
    dim = samples.shape[1]
    labels = _check_labels("plot_pairs", labels, dim) or [f"x{i + 1}" for i in range(dim)]
    sets = _point_sets(samples, None if data is None else np.asarray(data))
    lims = _limits(np.concatenate([pts for _, pts, _ in sets]))
    side = min(1.7 * dim + 0.4, 20.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    axes = fig.subplots(dim, dim, squeeze=False)
    for i in range(dim):
        for j in range(dim):
            _pair_panel(axes[i, j], sets, i, j, lims)
        axes[-1, i].set_xlabel(labels[i], fontsize=8)
        if i > 0:
            axes[i, 0].set_ylabel(labels[i], fontsize=8)
    if dim > 1:
        fig.legend(*axes[-1, 0].get_legend_handles_labels(), loc="upper right", markerscale=4)
    fig.suptitle(f"{len(samples)} samples", fontsize=9)
    return fig


def _pair_panel(ax, sets, i: int, j: int, lims) -> None:
    """Panel (row ``i``, column ``j``) of a corner plot: a histogram of dimension ``i`` on the
    diagonal, dimension ``j`` against ``i`` below it, nothing above."""
    if j > i:
        ax.set_axis_off()
        return
    if i == j:
        _histograms(ax, sets, i, lims[i])
        ax.set_yticks([])
    else:
        _scatters(ax, sets, j, i)
        ax.set_ylim(*lims[i])
    ax.set_xlim(*lims[j])
    ax.tick_params(labelsize=6, labelbottom=i == len(lims) - 1, labelleft=j == 0 and i > 0)


def _point_sets(samples: np.ndarray, data: np.ndarray | None) -> list:
    """``(label, points, colour)`` for the data (when given), drawn first, and the samples."""
    sets = [] if data is None else [("data", data, _DATA)]
    return sets + [("samples", samples, _SAMPLES)]


def _scatters(ax, sets, i: int, j: int) -> None:
    """Dimension ``i`` (horizontal) against ``j`` of every point set."""
    for label, pts, colour in sets:
        ax.scatter(pts[:, i], pts[:, j], s=3, c=colour, alpha=0.5, linewidths=0, label=label)


def _histograms(ax, sets, i: int, lim: tuple[float, float]) -> None:
    """Normalised histograms of dimension ``i`` of every point set, on ``lim``."""
    edges = np.linspace(*lim, 41)
    for label, pts, colour in sets:
        ax.hist(pts[:, i], bins=edges, density=True, color=colour, alpha=0.5, label=label)


def _check_labels(who: str, labels, dim: int) -> list[str] | None:
    """``labels`` as strings, one per dimension (``None`` stays ``None``)."""
    if labels is None:
        return None
    labels = [str(s) for s in labels]
    if len(labels) != dim:
        raise ValueError(
            f"{who}: expected {dim} label(s), one per dimension, received {len(labels)}"
        )
    return labels


def _label_axes(ax, labels: Sequence[str] | None) -> None:
    """The horizontal and vertical axis labels, when given."""
    if labels:
        ax.set_xlabel(labels[0], fontsize=8)
        ax.set_ylabel(labels[1], fontsize=8)


def plot_history(history: History, *, bits_per_dim: int | None = None) -> Figure:
    """Training (and validation) loss per step, with the best step marked: the NLL in nats per
    point (a history with a ``loss_name``, such as flow matching's, is labelled by it), or with
    ``bits_per_dim=D`` in bits per dimension, ``NLL / (D ln 2)`` (for a loss that is already
    the discrete NLL, as :func:`nflax.fit_dequantized`'s)."""
    name = getattr(history, "loss_name", "NLL")
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    scale = 1.0 if bits_per_dim is None else 1.0 / (int(bits_per_dim) * math.log(2))
    unit = name if bits_per_dim is None else "bits/dim"
    loss = np.asarray(history.loss) * scale
    val_loss = np.asarray(history.val_loss, np.float64) * scale
    ax.plot(np.arange(len(loss)), loss, lw=0.8, label=f"train {unit}")
    if len(val_loss):
        ax.plot(history.val_steps, val_loss, lw=1.2, label=f"validation {unit}")
    if history.best_step is not None and history.restored_best:
        ax.axvline(history.best_step, color="k", ls=":", lw=0.8, label="best")
    finite = loss[np.isfinite(loss)]
    if finite.size:
        lo = float(np.min(finite))
        hi = float(np.quantile(finite, 0.98))
        if len(val_loss):
            lo = min(lo, float(np.nanmin(val_loss)))
            hi = max(hi, float(np.nanquantile(val_loss, 0.98)))
        _set_ylim(ax, lo, hi, 0.05)
    _label_steps(ax, history, "NLL (nats)" if unit == "NLL" else unit)
    ax.legend(fontsize=8)
    if not math.isnan(history.steps_per_second):
        ax.text(
            0.99,
            0.98,
            f"{_rate(history.steps_per_second)} steps/s",
            ha="right",
            va="top",
            transform=ax.transAxes,
            fontsize=7,
        )
    return fig


def _rate(per_second: float) -> str:
    """A rate for a label: whole numbers with thousands separators, two significant digits
    below 10.

    >>> _rate(1234.4), _rate(0.5465)
    ('1,234', '0.55')
    """
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.2g}"


def _set_ylim(ax, lo: float, hi: float, margin: float) -> None:
    """Y limits ``[lo, hi]`` widened by ``margin`` of their span on each side."""
    pad = margin * max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad, hi + pad)


def _label_steps(ax, history, ylabel: str) -> None:
    """Axis labels of a per-step curve, titled with how the run stopped."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"stopped: {history.stop_reason} after {history.steps_run} steps", fontsize=9)


def plot_elbo(history, log_normalizer: float | None = None) -> Figure:
    """A :func:`nflax.fit_vi` run: the ELBO per step (and its running mean) with the
    ``log Z`` estimates and, when given, the true ``log Z``; the ESS fraction beside it."""
    elbo = np.asarray(history.elbo)
    fig = Figure(figsize=(8.5, 3.2), layout="constrained")
    ax, ax_ess = fig.subplots(1, 2, width_ratios=(3, 2))
    steps = np.arange(len(elbo))
    ax.plot(steps, elbo, lw=0.5, alpha=0.4, color="tab:blue", label="ELBO (per step)")
    if len(elbo) >= 20:
        k = max(len(elbo) // 50, 5)
        smooth = np.convolve(np.nan_to_num(elbo), np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.2, color="tab:blue", label=f"running mean ({k})")
    if len(history.eval_steps):
        ax.plot(
            history.eval_steps, history.log_z, "o", ms=3, color="tab:orange", label="log Z estimate"
        )
    if log_normalizer is not None:
        ax.axhline(log_normalizer, color="k", ls=":", lw=1, label=f"log Z = {log_normalizer:.3f}")
    finite = elbo[np.isfinite(elbo)]
    if finite.size:
        hi = max(float(np.max(finite)), log_normalizer if log_normalizer is not None else -np.inf)
        lo = float(np.quantile(finite, 0.05))
        _set_ylim(ax, lo, hi, 0.1)
    _label_steps(ax, history, "nats")
    ax.legend(fontsize=7)
    ax_ess.plot(history.eval_steps, history.ess_fraction, "o-", ms=3, lw=0.8, color="tab:green")
    ax_ess.set_ylim(0, 1.02)
    ax_ess.set_xlabel("step")
    ax_ess.set_title("effective sample size / samples", fontsize=9)
    return fig


def plot_conditional_samples(
    flow: Flow, key: Array, contexts, n: int = 1000, reference=None
) -> Figure:
    """Samples of a conditional 2D flow, one panel per context row (over reference samples)."""
    contexts = np.asarray(contexts, np.float32)
    samples = np.asarray(flow.sample(key, n, jnp.asarray(contexts)))
    fig = Figure(figsize=(3.2 * len(contexts), 3.2), layout="constrained")
    axes = fig.subplots(1, len(contexts), squeeze=False)[0]
    for i, ax in enumerate(axes):
        pts = [samples[i]]
        if reference is not None:
            ref = np.asarray(reference[i])
            ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.6", alpha=0.5, linewidths=0, label="true")
            pts.append(ref)
        ax.scatter(
            samples[i][:, 0],
            samples[i][:, 1],
            s=2,
            c="tab:red",
            alpha=0.5,
            linewidths=0,
            label="flow",
        )
        (x0, x1), (y0, y1) = _limits(np.concatenate(pts)[:, :2])
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(f"context {np.array2string(contexts[i], precision=2)}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7, markerscale=4)
    return fig


def plot_conditional_density(
    flow: Flow,
    contexts,
    *,
    data: Array | None = None,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    resolution: int = 150,
    true_log_prob=None,
) -> Figure:
    """The learned density of a conditional 2D flow, one column per context row; with
    ``true_log_prob(x, context)`` a second row shows the true conditional density. The grid
    spans ``xlim``/``ylim``, or else the bulk of ``data`` (points from any of the contexts)."""
    xlim, ylim = _grid_limits("plot_conditional_density", data, xlim, ylim)
    contexts = np.asarray(contexts, np.float32)
    if contexts.ndim != 2:
        raise ValueError(
            f"plot_conditional_density: contexts must be rows (k, context_dim), received shape "
            f"{contexts.shape}"
        )
    rows = ["learned"] + (["true"] if true_log_prob is not None else [])
    fig = Figure(figsize=(3.2 * len(contexts), 3.0 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(contexts), squeeze=False)
    extent = (xlim[0], xlim[1], ylim[0], ylim[1])
    for j, ctx in enumerate(contexts):
        xs, ys, logp = density_grid(flow, xlim, ylim, resolution, context=ctx)
        dens = {"learned": np.exp(logp)}
        if true_log_prob is not None:
            dens["true"] = np.exp(_log_density_on_grid(true_log_prob, xs, ys, ctx))
        for i, what in enumerate(rows):
            ax = axes[i, j]
            ax.imshow(dens[what], origin="lower", extent=extent, aspect="auto", cmap="magma")
            ax.set_title(f"{what}, context {np.array2string(ctx, precision=2)}", fontsize=9)
            ax.tick_params(labelsize=7)
    return fig


def image_grid(ax, images, *, ncols: int | None = None, title: str | None = None) -> None:
    """Draw ``images`` (shape ``(n, H, W, C)``, ``C`` 1 or 3, values in ``[0, 1]``; values
    outside are clipped) on the axes ``ax`` as one mosaic of ``ncols`` columns (default: a
    near-square grid), one pixel of gap between images, grey for one channel.

    >>> fig = Figure()
    >>> image_grid(fig.subplots(), np.zeros((6, 8, 8, 1)), ncols=3, title="zeros")
    >>> fig.axes[0].images[0].get_array().shape  # 2 rows × 3 columns of 8×8, 1-pixel gaps
    (17, 26)
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"image_grid: expected images of shape (n, H, W, C) with n ≥ 1 and C 1 or 3, "
            f"received {images.shape}"
        )
    n, h, w, c = images.shape
    cols = int(ncols) if ncols is not None else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    mosaic = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, c))
    for i, img in enumerate(np.clip(np.nan_to_num(images, nan=1.0), 0.0, 1.0)):
        r, q = divmod(i, cols)
        mosaic[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = img
    if c == 1:
        ax.imshow(mosaic[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(mosaic, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)
