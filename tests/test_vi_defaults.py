"""fit_vi with nothing but ``steps`` and ``num_samples`` recovers correlated Gaussians.

The bar is issue 11's: sample mean within 2 % of the largest standard deviation, every
covariance entry within 3 % of the largest entry. Measured over seeds 0-2 (benchmarks/README.md,
"fit_vi defaults"): at most 0.29 % and 0.74 % after 3000 steps. After 1500: over seeds 0-2
(initialisation and key), both targets, native and SSE4.2 kernels alike, at most 0.75 % and
0.66 % (the mean's error is mostly the Monte Carlo error of 65536 samples, ~0.4 % of a standard
deviation). The test runs 1000: on the 4-d target over seeds 0-2, at most 1.04 % and 0.68 %
natively and with SSE4.2 kernels alike, so one seed per dimension is tested here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nflax
from nflax.vi import default_vi_schedule


def _random_gaussian(dim: int, seed: int):
    """The issue's target: ``Σ = A Aᵀ/4 + ½ I`` with a standard-normal ``A``, a random mean."""
    rng = np.random.default_rng(100 + seed)
    a = rng.standard_normal((dim, dim))
    cov = a @ a.T / 4 + 0.5 * np.eye(dim)
    mean = rng.standard_normal(dim)
    prec, mu = jnp.asarray(np.linalg.inv(cov), jnp.float32), jnp.asarray(mean, jnp.float32)

    def log_density(x):
        u = x - mu
        return -0.5 * jnp.einsum("...i,ij,...j->...", u, prec, u)

    return log_density, mean, cov


def _builtin_gaussian(dim: int, seed: int):
    t = nflax.datasets.get_target("correlated_gaussian", dim=dim)
    return t.log_density, np.asarray(t.mean, np.float64), np.asarray(t.covariance, np.float64)


def moment_errors(flow, mean: np.ndarray, cov: np.ndarray, n: int = 1 << 16):
    """``(mean error / largest std, max covariance error / largest |entry|)`` from samples."""
    x = np.asarray(flow.sample(jax.random.key(1), n), np.float64)
    mean_err = np.max(np.abs(x.mean(0) - mean)) / np.sqrt(np.max(np.diag(cov)))
    cov_err = np.max(np.abs(np.cov(x.T) - cov)) / np.max(np.abs(cov))
    return float(mean_err), float(cov_err)


@pytest.mark.parametrize(
    "dim, make",
    [
        (4, _random_gaussian),
        # the same check on the built-in target in 8 dimensions (its moments: test_vi.py);
        # 4d-random checks what the defaults recover in the default run
        pytest.param(8, _builtin_gaussian, marks=pytest.mark.slow),
    ],
    ids=["4d-random", "8d-builtin"],
)
def test_defaults_recover_a_correlated_gaussian(dim, make):
    log_density, mean, cov = make(dim, 0)
    flow = nflax.flows.realnvp(dim, rngs=nnx.Rngs(0))
    steps = 1000 if dim == 4 else 1500  # the slow 8-d case keeps the 1500 steps measured
    hist = nflax.fit_vi(
        flow, log_density, key=jax.random.key(0), steps=steps, num_samples=256, progress=False
    )
    assert hist.stop_reason == "steps" and hist.stick_the_landing
    mean_err, cov_err = moment_errors(flow, mean, cov)
    assert mean_err < 0.02 and cov_err < 0.03, (mean_err, cov_err)


def test_default_schedule_warms_up_then_decays_to_zero():
    lr = default_vi_schedule(1000)
    got = [float(lr(t)) for t in (0, 50, 100, 550, 1000)]
    np.testing.assert_allclose(got, [0.0, 1.5e-3, 3e-3, 1.5e-3, 0.0], atol=1e-9)
    # too few steps for a warm-up: a cosine decay from the peak
    short = default_vi_schedule(5)
    assert float(short(0)) == pytest.approx(3e-3) and float(short(5)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        default_vi_schedule(0)
