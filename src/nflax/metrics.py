"""Test metrics of a density model: the numbers ``nflax train`` writes to ``metrics.json``.

For integer data (images of ``K`` grey levels, see :mod:`nflax.dequantization`):
:func:`bits_per_dim` and the importance-weighted test NLL :func:`importance_weighted_nll`.

The mean negative log-likelihood is dominated by rare far-out points (a trained model can
pay thousands of nats for one point at 4σ), so :func:`evaluate` reports beside it the median,
the mean without the worst 1 % of points, and the worst point; with the exact density it
adds the exact NLL and the gap between the two.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nflax import _compile
from nflax.dequantization import (
    Dequantized,
    check_dequantizer,
    check_levels,
    check_num_levels,
    log_weights,
)
from nflax.distributions import Flow
from nflax.engine import positive_int
from nflax.training import nll

TRIM_FRACTION = 0.01  # test_nll_trimmed_1pct leaves out this fraction of the worst points


def evaluate(
    flow: Flow,
    x,
    context=None,
    log_prob_true: Callable | np.ndarray | None = None,
) -> dict[str, float | int]:
    """The test metrics of ``flow`` on the points ``x`` (rows; ``context`` rows with them).

    Returns ``test_nll`` (the mean of ``−log p(x)``), ``test_nll_median``,
    ``test_nll_trimmed_1pct`` (the mean of all but the worst 1 %; at least one point is
    kept), ``test_nll_worst`` and ``num_test_points``. With ``log_prob_true``, the exact
    ``log p*(x)`` as a function (called as ``log_prob_true(x)``, or ``log_prob_true(x,
    context)`` with a context) or an array of one value per point, it adds ``true_nll`` (the
    mean of ``−log p*(x)``), ``test_minus_true_nll`` (the gap; on average over ``p*`` it is
    ``KL(p* ‖ p) ≥ 0``) and ``true_nll_median``. Values are Python floats, in nats.

    A standard-normal flow on the points 0, 1, 2, 3, whose NLL is ``½ log 2π + x²/2``:

    >>> import jax.numpy as jnp
    >>> from jax.scipy.stats import norm
    >>> from nflax import Flow, StandardNormal
    >>> from nflax.bijections import Affine
    >>> flow = Flow(StandardNormal(1), Affine(1))  # the identity map: N(0, 1)
    >>> x = jnp.array([[0.0], [1.0], [2.0], [3.0]])
    >>> metrics = evaluate(flow, x, log_prob_true=lambda x: norm.logpdf(x[:, 0]))
    >>> for name, value in metrics.items():
    ...     print(name, round(value, 4))
    test_nll 2.6689
    test_nll_median 2.1689
    test_nll_trimmed_1pct 1.7523
    test_nll_worst 5.4189
    num_test_points 4
    true_nll 2.6689
    test_minus_true_nll 0.0
    true_nll_median 2.1689
    """
    values = nll(flow, x, context)
    metrics = _statistics(values)
    if log_prob_true is not None:
        metrics.update(_exact(metrics, _true_log_prob(log_prob_true, x, context, len(values))))
    return metrics


def _statistics(values: np.ndarray) -> dict[str, float | int]:
    """Mean, median, 1 %-trimmed mean and maximum of per-point NLLs, and their number."""
    kept = max(1, int((1 - TRIM_FRACTION) * len(values)))
    return {
        "test_nll": float(np.mean(values)),
        "test_nll_median": float(np.median(values)),
        "test_nll_trimmed_1pct": float(np.mean(np.sort(values)[:kept])),
        "test_nll_worst": float(np.max(values)),
        "num_test_points": int(len(values)),
    }


def _true_log_prob(log_prob_true, x, context, n: int) -> np.ndarray:
    """``log_prob_true`` evaluated at the points (or taken as given), one value per point."""
    if callable(log_prob_true):
        out = log_prob_true(x) if context is None else log_prob_true(x, context)
    else:
        out = log_prob_true
    out = np.asarray(out)
    if out.shape != (n,):
        raise ValueError(
            f"evaluate: log_prob_true must give one value per point, shape ({n},); received "
            f"shape {out.shape}"
        )
    return out


def _exact(metrics: dict, log_prob_true: np.ndarray) -> dict[str, float]:
    """The exact NLL, the model's gap to it, and the exact median."""
    true = -log_prob_true
    true_nll = float(np.mean(true))
    return {
        "true_nll": true_nll,
        "test_minus_true_nll": metrics["test_nll"] - true_nll,
        "true_nll_median": float(np.median(true)),
    }


def bits_per_dim(nll, dim: int | Sequence[int], *, num_levels: int | None):
    r"""Bits per dimension of a model of integer data: ``NLL_discrete / (D · ln 2)``.

    ``num_levels`` says what ``nll`` (nats per point, a number or an array of them) is, and
    must be given:

    * ``num_levels=K``: the NLL of the continuous ``y = (x + u)/K ∈ [0, 1]^D`` under the
      flow's density (what :func:`nflax.nll` gives on dequantized data). The discrete NLL
      adds the volume of a cell, ``D log K``: bits/dim ``= (nll + D log K) / (D ln 2)``.
    * ``num_levels=None``: ``nll`` is already the discrete ``−log P(x)`` (or its bound), as
      from :func:`importance_weighted_nll` or :func:`nflax.dequantization.fit_dequantized`'s
      History: bits/dim ``= nll / (D ln 2)``.

    ``dim`` is ``D`` or the event shape, e.g. ``(8, 8, 1)``.

    >>> round(bits_per_dim(0.0, (8, 8, 1), num_levels=17), 4)  # p = 1 on [0, 1]^64: log2 17
    4.0875
    >>> round(bits_per_dim(64 * math.log(17), 64, num_levels=None), 4)  # the same, discrete
    4.0875
    """
    d = math.prod(dim) if isinstance(dim, Sequence) else int(dim)
    if d < 1:
        raise ValueError(f"bits_per_dim: dim must be ≥ 1, received {dim!r}")
    cell = 0.0 if num_levels is None else d * math.log(check_num_levels(num_levels))
    out = (np.asarray(nll, np.float64) + cell) / (d * math.log(2))
    return float(out) if out.ndim == 0 else out


def importance_weighted_nll(
    flow: Flow,
    levels,
    num_levels: int,
    *,
    key: jax.Array,
    num_samples: int = 128,
    dequantizer: str | Flow = "uniform",
    batch_size: int = 256,
) -> np.ndarray:
    r"""Per-point importance-weighted NLL of integer data, nats:

    ``−log (1/S) Σ_s p((x + u_s)/K) · K^{−D} / q(u_s | x)``, ``u_s ~ q(· | x)``,

    with ``S = num_samples`` noise draws (``q = 1``: uniform, or the conditional flow trained
    as ``dequantizer``; :mod:`nflax.dequantization`). Its expectation is an upper bound on
    ``−log P(x)`` that falls with ``S`` and reaches it as ``S → ∞``; ``S = 1`` is the
    dequantization bound itself. Rows go ``batch_size`` at a time (a last, shorter batch is
    padded), samples 32 at a time, summed with logsumexp: one compiled program per flow
    structure and batch shape, reused by later calls. Batch ``b`` draws from
    ``fold_in(key, b)``: the same key and batch size give the same values.

    >>> from nflax import Flow
    >>> from nflax.bijections import Affine
    >>> from nflax.distributions import Uniform
    >>> flat = Flow(Uniform(0.0, 1.0, dim=64), Affine(64))  # p = 1 on [0, 1]^64
    >>> x = np.zeros((5, 64), np.int64)
    >>> v = importance_weighted_nll(flat, x, 17, key=jax.random.key(0), num_samples=10)
    >>> round(bits_per_dim(v.mean(), 64, num_levels=None), 4)  # log2 17
    4.0875
    """
    k = check_num_levels(num_levels)
    x = check_levels(levels, k, flow.event_shape)
    noise = check_dequantizer(dequantizer, flow.event_shape, "importance_weighted_nll")
    num_samples = positive_int("num_samples", num_samples, "importance_weighted_nll")
    size = min(len(x), positive_int("batch_size", batch_size, "importance_weighted_nll"))
    graphdef, state = nnx.split(Dequantized(flow, noise))
    static = (_compile.Static(graphdef), k, num_samples)
    out = []
    for b, start in enumerate(range(0, len(x), size)):
        rows = x[start : start + size]
        padded = np.concatenate([rows, np.repeat(rows[:1], size - len(rows), 0)])
        values = _iw_program(*static, state, jnp.asarray(padded), jax.random.fold_in(key, b))
        out.append(np.asarray(values)[: len(rows)])
    return np.concatenate(out)


_SAMPLE_CHUNK = 32  # noise draws per pass of the flow inside the importance-weighted NLL


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _iw_program(graphdef: _compile.Static, num_levels: int, num_samples: int, state, x, key):
    """``log S − logsumexp_s log w_s`` for each row of ``x``, samples drawn in chunks."""
    chunk = min(num_samples, _SAMPLE_CHUNK)

    def draw(state, i):  # the state is the loop's carry: ActNorm may not write across traces
        joint = nnx.merge(graphdef.value, state)
        k = jax.random.fold_in(key, i)
        return state, log_weights(joint.flow, joint.dequantizer, k, x, num_levels, chunk)

    steps = jnp.arange(-(-num_samples // chunk))
    chunks = jax.lax.scan(draw, state, steps)[1]  # (chunks, n, chunk)
    log_w = jnp.moveaxis(chunks, 0, 1).reshape(x.shape[0], -1)[:, :num_samples]
    return math.log(num_samples) - jax.nn.logsumexp(log_w, axis=1)
