"""2D toy data sets, with exact log-densities where they are known.

>>> ds = get("banana")
>>> x = ds.sample(jax.random.key(0), 4)
>>> x.shape, ds.log_prob(x).shape
((4, 2), (4,))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

Array = jax.Array
_LOG_2PI = math.log(2 * math.pi)


def _normal_logpdf(x: Array, mean: Array | float, std: float) -> Array:
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * _LOG_2PI


@dataclass(frozen=True)
class Dataset:
    """A named sampler, with the exact ``log_prob`` when the density is known (else ``None``)."""

    name: str
    dim: int
    sampler: Callable[[Array, int], Array]
    density: Callable[[Array], Array] | None = None
    description: str = ""

    @property
    def has_density(self) -> bool:
        return self.density is not None

    def sample(self, key: Array, n: int) -> Array:
        """``n`` independent draws, shape ``(n, dim)``."""
        if int(n) < 1:
            raise ValueError(f"dataset {self.name!r}: number of points must be ≥ 1, received {n}")
        return self.sampler(key, int(n))

    def log_prob(self, x: Array) -> Array:
        """The exact log-density; raises for sets whose density is not known in closed form."""
        if self.density is None:
            raise ValueError(f"dataset {self.name!r} has no exact density")
        return self.density(jnp.asarray(x))


# -- banana: the tutorial's set -----------------------------------------------------------------
def _banana_sample(key, n):
    k1, k2 = jax.random.split(key)
    x2 = 4.0 * jax.random.normal(k1, (n,))
    x1 = x2**2 / 4.0 + jax.random.normal(k2, (n,))
    return jnp.stack([x1, x2], axis=-1)


def _banana_log_prob(x):
    x1, x2 = x[..., 0], x[..., 1]
    return _normal_logpdf(x2, 0.0, 4.0) + _normal_logpdf(x1, x2**2 / 4.0, 1.0)


# -- two moons (no closed-form density) ----------------------------------------------------------
def _moons_sample(key, n, noise=0.1):
    k1, k2, k3 = jax.random.split(key, 3)
    t = jnp.pi * jax.random.uniform(k1, (n,))
    upper = jax.random.bernoulli(k2, 0.5, (n,))
    x = jnp.where(upper, jnp.cos(t), 1.0 - jnp.cos(t))
    y = jnp.where(upper, jnp.sin(t), 0.5 - jnp.sin(t))
    return jnp.stack([x, y], axis=-1) + noise * jax.random.normal(k3, (n, 2))


# -- eight Gaussians on a circle -----------------------------------------------------------------
_EG_RADIUS, _EG_STD = 2.0, 0.25
_EG_CENTERS = _EG_RADIUS * jnp.stack(
    [jnp.cos(jnp.arange(8) * jnp.pi / 4), jnp.sin(jnp.arange(8) * jnp.pi / 4)], axis=-1
)


def _eight_sample(key, n):
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (n,), 0, 8)
    return _EG_CENTERS[idx] + _EG_STD * jax.random.normal(k2, (n, 2))


def _eight_log_prob(x):
    comp = _normal_logpdf(x[..., None, :], _EG_CENTERS, _EG_STD).sum(-1)
    return jax.nn.logsumexp(comp, axis=-1) - math.log(8)


DATASETS: dict[str, Dataset] = {
    "banana": Dataset(
        "banana",
        2,
        _banana_sample,
        _banana_log_prob,
        "x2 ~ N(0, 4²), x1 | x2 ~ N(x2²/4, 1) (the tutorial's set)",
    ),
    "moons": Dataset("moons", 2, _moons_sample, None, "two interleaved half circles, noise 0.1"),
    "eight_gaussians": Dataset(
        "eight_gaussians",
        2,
        _eight_sample,
        _eight_log_prob,
        f"equal mixture of 8 Gaussians (std {_EG_STD}) on a circle of radius {_EG_RADIUS}",
    ),
}


def names() -> list[str]:
    """The known data set names."""
    return sorted(DATASETS)


def get(name: str) -> Dataset:
    """The data set ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(names())}"
        ) from None
