"""Plots show what they say: the data drawn in each panel is checked against the flow itself
(trajectories, grids of log_prob, samples, histories), not only that a figure exists."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

import nflax
from nflax import plotting
from nflax.training import History
from nflax.vi import VIHistory


@pytest.fixture(scope="module")
def flow():
    f = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    perturb(f, jax.random.key(1), scale=0.3)
    return f


@pytest.fixture(scope="module")
def data():
    return np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 300))


def _offsets(ax, i=0):
    return np.asarray(ax.collections[i].get_offsets())


def test_plot_trajectory_panels_are_the_layers(flow, data):
    fig = plotting.plot_trajectory(flow, data, key=jax.random.key(3), n=200)
    axes = np.asarray(fig.axes).reshape(2, 3)  # data → noise above, noise → data below
    forward = [np.asarray(t) for t in flow.trajectory(data)]
    backward = [np.asarray(t) for t in flow.sample_trajectory(jax.random.key(3), 200)]
    assert [ax.get_title() for ax in axes[0]] == ["data", "1: AffineCoupling", "2: AffineCoupling"]
    assert [ax.get_title() for ax in axes[1]] == [
        "noise",
        "2: AffineCoupling⁻¹",
        "1: AffineCoupling⁻¹",
    ]
    for ax, pts in zip(axes[0], forward, strict=True):
        np.testing.assert_allclose(_offsets(ax), pts, rtol=1e-6)
    for ax, pts in zip(axes[1], backward, strict=True):
        np.testing.assert_allclose(_offsets(ax), pts, rtol=1e-6)
    # one direction only, and many layers thinned to max_cols panels (first and last kept)
    deep = nflax.flows.realnvp(2, num_layers=12, hidden=(4,), rngs=nnx.Rngs(0))
    fig = plotting.plot_trajectory(deep, data, direction="forward", max_cols=4)
    assert [ax.get_title() for ax in fig.axes] == [
        "data",
        "4: AffineCoupling",
        "8: AffineCoupling",
        "12: AffineCoupling",
    ]
    with pytest.raises(ValueError, match="direction must be 'forward', 'inverse' or 'both'"):
        plotting.plot_trajectory(flow, data, direction="up")


def test_density_grid_is_log_prob_on_the_grid(flow):
    xs, ys, logp = plotting.density_grid(flow, (-3.0, 5.0), (-2.0, 2.0), resolution=21)
    np.testing.assert_allclose(xs, np.linspace(-3, 5, 21))
    np.testing.assert_allclose(ys, np.linspace(-2, 2, 21))
    assert logp.shape == (21, 21)  # rows: y, columns: x
    for i, j in [(0, 0), (3, 17), (20, 5)]:
        point = jnp.array([[xs[j], ys[i]]], jnp.float32)
        np.testing.assert_allclose(logp[i, j], flow.log_prob(point)[0], rtol=1e-5)
    with pytest.raises(ValueError, match=r"needs a 2D flow, received event shape \(3,\)"):
        plotting.density_grid(
            nflax.flows.realnvp(3, num_layers=1, rngs=nnx.Rngs(0)), (0, 1), (0, 1)
        )


def test_plot_density_panels(flow, data):
    ds = nflax.datasets.get("banana")
    fig = plotting.plot_density(flow, data, resolution=30, true_log_prob=ds.log_prob)
    data_ax, model_ax, true_ax = fig.axes
    np.testing.assert_allclose(_offsets(data_ax), data)
    xlim, ylim = data_ax.get_xlim(), data_ax.get_ylim()
    assert xlim[0] < np.quantile(data[:, 0], 0.01) and xlim[1] > np.quantile(data[:, 0], 0.99)
    xs, ys, logp = plotting.density_grid(flow, xlim, ylim, 30)
    np.testing.assert_allclose(model_ax.images[0].get_array(), np.exp(logp), rtol=1e-5)
    assert tuple(model_ax.images[0].get_extent()) == pytest.approx((*xlim, *ylim))
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).astype(np.float32)
    np.testing.assert_allclose(
        true_ax.images[0].get_array(), np.exp(ds.log_prob(grid)), rtol=1e-5, atol=1e-30
    )
    assert [ax.get_title() for ax in fig.axes] == [
        "data (300 points)",
        "learned density",
        "true density",
    ]
    # limits given instead of data: one panel
    (ax,) = plotting.plot_density(flow, xlim=(-1, 1), ylim=(0, 2), resolution=10).axes
    assert tuple(ax.images[0].get_extent()) == (-1, 1, 0, 2)
    with pytest.raises(ValueError, match="give data or both xlim and ylim"):
        plotting.plot_density(flow, xlim=(-1, 1))


def test_plot_samples_draws_the_flows_samples(flow, data):
    (ax,) = plotting.plot_samples(flow, jax.random.key(4), n=250, data=data).axes
    np.testing.assert_allclose(_offsets(ax, 0), data)  # the data first, in grey
    np.testing.assert_allclose(_offsets(ax, 1), flow.sample(jax.random.key(4), 250), rtol=1e-6)
    assert ax.get_title() == "250 samples"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["data", "samples"]


def test_plot_pairs_histograms_and_scatters():
    x = np.random.default_rng(0).normal(size=(400, 3)) * [1.0, 2.0, 3.0]
    fig = plotting.plot_pairs(x, labels=["a", "b", "c"])
    axes = np.asarray(fig.axes).reshape(3, 3)
    np.testing.assert_allclose(_offsets(axes[2, 0]), x[:, [0, 2]])  # column j against row i
    heights = np.array([p.get_height() for p in axes[1, 1].patches])
    widths = np.array([p.get_width() for p in axes[1, 1].patches])
    assert np.sum(heights * widths) == pytest.approx(1.0, abs=0.02)  # a density histogram
    assert fig.get_suptitle() == "400 samples"
    with pytest.raises(ValueError, match=r"expected 3 label\(s\), one per dimension, received 2"):
        plotting.plot_pairs(x, labels=["a", "b"])


def test_plot_history_lines():
    hist = History(
        loss=np.array([3.0, 2.0, 1.5, 1.4, 1.45]),
        val_loss=np.array([3.1, 1.6, 1.7]),
        val_steps=np.array([0, 2, 4]),
        stop_reason="patience",
        steps_run=5,
        best_step=2,
        restored_best=True,
        steps_per_second=1234.0,
    )
    ax = plotting.plot_history(hist).axes[0]
    train, val, best = ax.get_lines()
    np.testing.assert_array_equal(train.get_ydata(), hist.loss)
    np.testing.assert_array_equal(val.get_xdata(), [0, 2, 4])
    np.testing.assert_array_equal(val.get_ydata(), hist.val_loss)
    assert list(best.get_xdata()) == [2, 2]  # the best step, marked
    lo, hi = ax.get_ylim()
    assert lo < 1.4 and hi > 3.0
    assert ax.get_title() == "stopped: patience after 5 steps"
    assert "1,234 steps/s" in [t.get_text() for t in ax.texts]
    assert ax.get_ylabel() == "NLL (nats)"
    # in bits per dimension: NLL / (D ln 2), and the axis says so
    ax = plotting.plot_history(hist, bits_per_dim=4).axes[0]
    train, val, _ = ax.get_lines()
    np.testing.assert_allclose(train.get_ydata(), hist.loss / (4 * np.log(2)))
    np.testing.assert_allclose(val.get_ydata(), hist.val_loss / (4 * np.log(2)))
    assert ax.get_ylabel() == "bits/dim" and train.get_label() == "train bits/dim"


def test_image_grid_tiles_the_images_row_by_row():
    from matplotlib.figure import Figure

    images = np.stack([np.full((2, 3, 1), v) for v in (0.0, 0.25, 0.5, 2.0, -1.0)])
    ax = Figure().subplots()
    plotting.image_grid(ax, images, ncols=3, title="five")
    mosaic = ax.images[0].get_array()
    assert mosaic.shape == (2 * 2 + 1, 3 * 3 + 2)  # 2 rows × 3 columns, one-pixel gaps
    assert mosaic[0, 0] == 0.0 and mosaic[0, 4] == 0.25 and mosaic[0, 8] == 0.5
    assert mosaic[3, 0] == 1.0 and mosaic[3, 4] == 0.0  # clipped to [0, 1]
    assert mosaic[2, 0] == 1.0 and mosaic[3, 8] == 1.0  # the gaps and the empty cell: white
    assert ax.get_title() == "five"
    with pytest.raises(ValueError, match=r"image_grid: expected images of shape \(n, H, W, C\)"):
        plotting.image_grid(ax, np.zeros((2, 3, 1)))


def test_plot_elbo_lines():
    elbo = np.linspace(-3.0, 1.0, 40)
    hist = VIHistory(
        elbo=elbo,
        eval_steps=np.array([0, 20, 39]),
        ess_fraction=np.array([0.1, 0.5, 0.9]),
        log_z=np.array([0.2, 0.9, 1.1]),
        steps_run=40,
    )
    ax, ess_ax = plotting.plot_elbo(hist, log_normalizer=1.2).axes
    lines = ax.get_lines()
    np.testing.assert_array_equal(lines[0].get_ydata(), elbo)
    k = 5  # running mean over max(40 // 50, 5) steps
    np.testing.assert_allclose(lines[1].get_ydata(), np.convolve(elbo, np.ones(k) / k, "valid"))
    np.testing.assert_array_equal(lines[2].get_ydata(), hist.log_z)
    assert list(lines[3].get_ydata()) == [1.2, 1.2]  # the true log Z
    np.testing.assert_array_equal(ess_ax.get_lines()[0].get_ydata(), hist.ess_fraction)
    assert ess_ax.get_ylim() == (0, 1.02)


def test_plot_conditional_samples_one_panel_per_context():
    flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), context_dim=1, rngs=nnx.Rngs(0))
    perturb(flow, jax.random.key(2), scale=0.3)
    contexts = np.array([[0.5], [1.5]], np.float32)
    ref = [np.zeros((10, 2)), np.ones((10, 2))]
    fig = plotting.plot_conditional_samples(flow, jax.random.key(5), contexts, 60, reference=ref)
    samples = np.asarray(flow.sample(jax.random.key(5), 60, jnp.asarray(contexts)))
    for i, ax in enumerate(fig.axes):
        np.testing.assert_array_equal(_offsets(ax, 0), ref[i])
        np.testing.assert_allclose(_offsets(ax, 1), samples[i], rtol=1e-6)
        assert ax.get_title() == f"context [{contexts[i, 0]:.1f}]"
    assert not np.allclose(samples[0], samples[1])  # the context changes the samples
