"""nflax.evaluate: the test metrics of metrics.json, checked against closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nflax
from nflax.bijections import Affine
from nflax.distributions import ConditionalDiagNormal, Flow, StandardNormal
from nflax.metrics import evaluate

HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)


def _points():
    """101 points in 2-D, one far out (the worst), the rest spread over a few σ."""
    x = np.random.default_rng(0).normal(size=(101, 2)).astype(np.float32)
    x[17] = [6.0, -8.0]
    return x


def test_evaluate_a_standard_normal_flow_is_exact():
    x = _points()
    nll = 2 * HALF_LOG_2PI + 0.5 * np.sum(x.astype(np.float64) ** 2, axis=1)  # closed form
    m = nflax.evaluate(Flow(StandardNormal(2), Affine(2)), x)  # the identity: N(0, I)
    assert list(m) == [
        "test_nll", "test_nll_median", "test_nll_trimmed_1pct", "test_nll_worst",
        "num_test_points",
    ]  # fmt: skip
    assert m["num_test_points"] == 101 and isinstance(m["num_test_points"], int)
    assert m["test_nll_worst"] == pytest.approx(2 * HALF_LOG_2PI + 50.0, rel=1e-6)
    assert m["test_nll"] == pytest.approx(np.mean(nll), rel=1e-6)
    assert m["test_nll_median"] == pytest.approx(np.median(nll), rel=1e-6)
    # 1 % of 101 points: the worst one is left out, int(0.99 · 101) = 99 of the others kept
    assert m["test_nll_trimmed_1pct"] == pytest.approx(np.mean(np.sort(nll)[:99]), rel=1e-6)
    assert m["test_nll_trimmed_1pct"] < m["test_nll"]


def test_evaluate_with_the_exact_density_as_an_array_or_a_function():
    x = _points()
    flow = Flow(StandardNormal(2), Affine(2, log_scale=jnp.log(2.0)))  # N(0, 4 I)
    nll = 2 * HALF_LOG_2PI + 2 * np.log(2.0) + np.sum(x.astype(np.float64) ** 2, axis=1) / 8
    true_log_prob = -(2 * HALF_LOG_2PI + 0.5 * np.sum(x.astype(np.float64) ** 2, axis=1))
    by_array = evaluate(flow, x, log_prob_true=true_log_prob)
    by_function = evaluate(flow, x, log_prob_true=lambda y: -0.5 * jnp.sum(y**2, -1) - 1.8379)
    for m in (by_array, by_function):
        assert m["test_nll"] == pytest.approx(np.mean(nll), rel=1e-6)
        assert m["true_nll"] == pytest.approx(-np.mean(true_log_prob), rel=1e-5)
        assert m["true_nll_median"] == pytest.approx(-np.median(true_log_prob), rel=1e-5)
        assert m["test_minus_true_nll"] == m["test_nll"] - m["true_nll"]
    assert list(by_array)[-3:] == ["true_nll", "test_minus_true_nll", "true_nll_median"]


def test_evaluate_passes_the_context_to_the_flow_and_to_the_exact_density():
    # the base's network starts at zero: p(x | c) = N(0, 1) for every c; the exact p*(x | c)
    # is N(c, 1), so the gap is the mean of (c² − 2xc)/2 over the points
    flow = Flow(ConditionalDiagNormal(1, 1, rngs=nnx.Rngs(0)), Affine(1))
    x = np.array([[0.0], [1.0], [2.0], [3.0]], np.float32)
    c = np.array([[1.0], [1.0], [-1.0], [0.0]], np.float32)
    seen = []

    def log_prob_true(y, ctx):
        seen.append(np.asarray(ctx))
        return -HALF_LOG_2PI - 0.5 * np.sum((np.asarray(y) - np.asarray(ctx)) ** 2, -1)

    m = evaluate(flow, x, c, log_prob_true)
    np.testing.assert_array_equal(seen[0], c)
    assert m["test_nll"] == pytest.approx(HALF_LOG_2PI + 14 / 8, rel=1e-6)  # x²: 0, 1, 4, 9
    assert m["true_nll"] == pytest.approx(HALF_LOG_2PI + (1 + 0 + 9 + 9) / 8, rel=1e-6)
    assert m["test_minus_true_nll"] == pytest.approx(-5 / 8, rel=1e-5)
    assert m["test_nll_worst"] == pytest.approx(HALF_LOG_2PI + 4.5, rel=1e-6)


def test_evaluate_errors():
    flow = Flow(StandardNormal(2), Affine(2))
    message = r"one value per point, shape \(3,\); received shape \(2,\)"
    with pytest.raises(ValueError, match=message):
        evaluate(flow, np.zeros((3, 2)), log_prob_true=np.zeros(2))
    with pytest.raises(ValueError, match=r"expected shape \(n, 2\) .* received \(3, 5\)"):
        evaluate(flow, np.zeros((3, 5)))  # the checks of nflax.nll
    with pytest.raises(ValueError, match="no data points"):
        evaluate(flow, np.zeros((0, 2)))
