"""Test metrics of a density model: the numbers ``nflax train`` writes to ``metrics.json``.

The mean negative log-likelihood is dominated by rare far-out points (a trained model can
pay thousands of nats for one point at 4σ), so :func:`evaluate` reports beside it the median,
the mean without the worst 1 % of points, and the worst point; with the exact density it
adds the exact NLL and the gap between the two.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nflax.distributions import Flow
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
