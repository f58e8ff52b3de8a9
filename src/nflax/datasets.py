"""2D toy data sets, with exact log-densities where they are known.

>>> ds = get("banana")
>>> ds.sample(jax.random.key(0), 4).shape
(4, 2)
>>> # log N(x2; 0, 4²) + log N(x1; x2²/4, 1): on the ridge, and 3 below it
>>> [round(float(v), 4) for v in ds.log_prob(jnp.array([[1.0, 2.0], [4.0, 0.0]]))]
[-3.3492, -11.2242]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

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
# numpy, not jnp: importing nflax must not start a JAX backend (jax.distributed needs that)
_EG_CENTERS = _EG_RADIUS * np.stack(
    [np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], axis=-1
).astype(np.float32)


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


# -- conditional sets: (x, context) pairs with an exact conditional density --------------------
@dataclass(frozen=True)
class ConditionalDataset:
    """Pairs ``(x, c)``: ``c ~ p(c)``, ``x ~ p(x | c)``, with the exact ``log p(x | c)``."""

    name: str
    dim: int
    context_dim: int
    sampler: Callable[[Array, int], tuple[Array, Array]]
    density: Callable[[Array, Array], Array]
    description: str = ""
    has_density = True

    def sample(self, key: Array, n: int) -> tuple[Array, Array]:
        """``n`` pairs: ``x`` of shape ``(n, dim)`` and ``c`` of shape ``(n, context_dim)``."""
        if int(n) < 1:
            raise ValueError(f"dataset {self.name!r}: number of points must be ≥ 1, received {n}")
        return self.sampler(key, int(n))

    def sample_given(self, key: Array, context: Array, n: int) -> Array:
        """``n`` draws of ``x`` for one fixed context row."""
        return self.sampler(key, int(n), jnp.asarray(context, jnp.float32))[0]

    def log_prob(self, x: Array, context: Array) -> Array:
        """The exact conditional log-density ``log p(x | c)``."""
        return self.density(jnp.asarray(x), jnp.asarray(context))


_CB_LOW, _CB_HIGH = 0.5, 1.5


def _cond_banana_sample(key, n, fixed=None):
    k0, k1, k2 = jax.random.split(key, 3)
    if fixed is None:
        c = jax.random.uniform(k0, (n,), minval=_CB_LOW, maxval=_CB_HIGH)
    else:
        c = jnp.broadcast_to(fixed.reshape(()), (n,))
    x2 = 4.0 * jax.random.normal(k1, (n,))
    x1 = c * x2**2 / 4.0 + jax.random.normal(k2, (n,))
    return jnp.stack([x1, x2], axis=-1), c[:, None]


def _cond_banana_log_prob(x, c):
    x1, x2, k = x[..., 0], x[..., 1], c[..., 0]
    return _normal_logpdf(x2, 0.0, 4.0) + _normal_logpdf(x1, k * x2**2 / 4.0, 1.0)


CONDITIONAL_DATASETS: dict[str, ConditionalDataset] = {
    "conditional_banana": ConditionalDataset(
        "conditional_banana",
        2,
        1,
        _cond_banana_sample,
        _cond_banana_log_prob,
        f"the banana with curvature c ~ U({_CB_LOW}, {_CB_HIGH}) as context: "
        "x2 ~ N(0, 4²), x1 | x2, c ~ N(c·x2²/4, 1)",
    ),
}


def get_conditional(name: str) -> ConditionalDataset:
    """A conditional data set; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return CONDITIONAL_DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(CONDITIONAL_DATASETS))
        raise ValueError(f"unknown conditional dataset {name!r}; known: {known}") from None


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


# ================================================================================================
# Targets for variational inference: unnormalised log-densities log p̃(x), exact where known.
# ================================================================================================
@dataclass(frozen=True)
class Target:
    """A named unnormalised density ``p̃(x) = exp(log_density(x))`` on ``R^dim``.

    ``log_density`` maps a batch ``(n, dim)`` to ``(n,)``. ``log_normalizer`` is
    ``log Z = log ∫ p̃(x) dx`` where it is known (exactly, or numerically to the accuracy stated
    in ``description``), else ``None``; then ``log_prob(x) = log_density(x) − log Z``.
    ``mean`` and ``covariance`` are set for Gaussian targets. ``box`` is a square window
    ``(low, high)`` holding nearly all the mass of a 2D target (for plots and grid integrals).
    """

    name: str
    dim: int
    log_density: Callable[[Array], Array]
    log_normalizer: float | None = None
    description: str = ""
    mean: Array | None = None
    covariance: Array | None = None
    box: tuple[float, float] | None = None

    def log_prob(self, x: Array) -> Array:
        """The normalised log-density; raises when the normaliser is not known."""
        if self.log_normalizer is None:
            raise ValueError(f"target {self.name!r} has no known log-normaliser")
        return self.log_density(jnp.asarray(x)) - self.log_normalizer


def grid_log_normalizer(
    log_density: Callable[[Array], Array],
    low: float,
    high: float,
    resolution: int = 2000,
    chunk: int = 250_000,
) -> float:
    """``log ∫ p̃`` of a 2D density by the midpoint rule on ``resolution²`` cells of
    ``[low, high]²`` (summed with logsumexp, in chunks). For a smooth density that is
    negligible at the edges of the square the error falls faster than any power of the cell
    size; the values below were checked by doubling ``resolution``.

    >>> round(grid_log_normalizer(lambda x: -0.5 * (x**2).sum(-1), -8.0, 8.0, 200), 4)
    1.8379
    """
    h = (high - low) / resolution
    centers = np.linspace(low + h / 2, high - h / 2, resolution)
    grid = np.stack(np.meshgrid(centers, centers), axis=-1).reshape(-1, 2)
    fn = jax.jit(lambda g: jax.nn.logsumexp(log_density(g)))
    parts = [float(fn(jnp.asarray(grid[i : i + chunk]))) for i in range(0, len(grid), chunk)]
    return float(jax.nn.logsumexp(jnp.asarray(parts)) + 2 * math.log(h))


# -- the four energy functions of Rezende & Mohamed (2015), Table 1: p̃ = exp(−U) --------------
def _w1(z1):
    return jnp.sin(2 * jnp.pi * z1 / 4)


def _w2(z1):
    return 3 * jnp.exp(-0.5 * ((z1 - 1) / 0.6) ** 2)


def _w3(z1):
    return 3 * jax.nn.sigmoid((z1 - 1) / 0.3)


# U2–U4 do not decay along z1 (improper). The paper draws them on [−4, 4]²; we confine z1 to
# that window with a soft quadratic wall, −U −= ½·(max(|z1| − 4, 0)/0.2)² (flat inside).
_WALL_AT, _WALL_WIDTH = 4.0, 0.2


def _wall(z1):
    return 0.5 * (jax.nn.relu(jnp.abs(z1) - _WALL_AT) / _WALL_WIDTH) ** 2


def _two_bumps(a, sa, b, sb):
    """``log(exp(−½(a/sa)²) + exp(−½(b/sb)²))``."""
    return jnp.logaddexp(-0.5 * (a / sa) ** 2, -0.5 * (b / sb) ** 2)


def _energy1(x):
    z1, r = x[..., 0], jnp.sqrt(jnp.sum(x**2, axis=-1) + 1e-12)
    return -0.5 * ((r - 2) / 0.4) ** 2 + _two_bumps(z1 - 2, 0.6, z1 + 2, 0.6)


def _energy2(x):
    z1, z2 = x[..., 0], x[..., 1]
    return -0.5 * ((z2 - _w1(z1)) / 0.4) ** 2 - _wall(z1)


def _energy3(x):
    z1, z2 = x[..., 0], x[..., 1]
    a = z2 - _w1(z1)
    return _two_bumps(a, 0.35, a + _w2(z1), 0.35) - _wall(z1)


def _energy4(x):
    z1, z2 = x[..., 0], x[..., 1]
    a = z2 - _w1(z1)
    return _two_bumps(a, 0.4, a + _w3(z1), 0.35) - _wall(z1)


# log Z by grid_log_normalizer in float64 on [−8, 8]² with 4000² cells. 1000² and 2000² cells,
# and [−12, 12]² with 3000² cells, give the same nine decimals; the same rule reproduces the
# ring's exact log Z (below) to 1e-9. So these are accurate to ~1e-8 nats.
_ENERGY_LOG_Z = {
    "energy1": 1.877501626,
    "energy2": 2.142869912,
    "energy3": 2.702485700,
    "energy4": 2.771478571,
}
_ENERGY_DOC = {
    "energy1": "U1: a ring of radius 2 with two modes at z1 = ±2",
    "energy2": "U2: a sine band z2 ≈ sin(πz1/2), std 0.4, |z1| ≲ 4 (soft wall)",
    "energy3": "U3: the sine band and a second band bent by a bump at z1 = 1, |z1| ≲ 4",
    "energy4": "U4: the sine band and a second band shifted by a sigmoid step, |z1| ≲ 4",
}


# -- a ring: radial Gaussian, radius 2, std 0.2 ------------------------------------------------
_RING_RADIUS, _RING_STD = 2.0, 0.2


def _ring(x):
    r = jnp.sqrt(jnp.sum(x**2, axis=-1) + 1e-12)
    return -0.5 * ((r - _RING_RADIUS) / _RING_STD) ** 2


def _ring_log_z(radius: float, std: float) -> float:
    # Z = ∫_0^∞ 2πr·exp(−(r−R)²/2σ²) dr = 2π[σ²·exp(−R²/2σ²) + Rσ√(2π)·Φ(R/σ)]
    phi = 0.5 * (1 + math.erf(radius / (std * math.sqrt(2))))
    z = std**2 * math.exp(-(radius**2) / (2 * std**2)) + radius * std * math.sqrt(2 * math.pi) * phi
    return math.log(2 * math.pi * z)


# -- a correlated Gaussian in d dimensions -----------------------------------------------------
def correlated_gaussian_moments(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of ``correlated_gaussian(dim)``: ``μ = linspace(1, −1, d) + ½``,
    standard deviations ``s = linspace(1.5, 0.5, d)``, correlations ``ρ^|i−j|`` with
    ``ρ = 0.8``; ``Σ = diag(s)·C·diag(s)``. (For ``d = 1``: ``μ = 1.5``, ``s = 1.5``.)"""
    d = int(dim)
    mean = np.linspace(1.0, -1.0, d) + 0.5
    std = np.linspace(1.5, 0.5, d)
    idx = np.arange(d)
    corr = 0.8 ** np.abs(idx[:, None] - idx[None, :])
    return mean, std[:, None] * corr * std[None, :]


def correlated_gaussian(dim: int = 2) -> Target:
    """``p̃(x) = exp(−½(x − μ)ᵀΣ⁻¹(x − μ))`` (unnormalised), ``log Z = ½·log det(2πΣ)``."""
    if isinstance(dim, bool) or int(dim) != dim or int(dim) < 1:
        raise ValueError(f"target 'correlated_gaussian': dim must be ≥ 1, received {dim!r}")
    d = int(dim)
    mean, cov = correlated_gaussian_moments(d)
    precision = np.linalg.inv(cov)
    log_z = 0.5 * (d * _LOG_2PI + np.linalg.slogdet(cov)[1])
    mu, prec = jnp.asarray(mean, jnp.float32), jnp.asarray(precision, jnp.float32)

    def log_density(x):
        u = x - mu
        return -0.5 * jnp.einsum("...i,ij,...j->...", u, prec, u)

    return Target(
        "correlated_gaussian",
        d,
        log_density,
        float(log_z),
        f"N(μ, Σ) in {d}D, correlations 0.8^|i−j|, exact log Z",
        mean=jnp.asarray(mean, jnp.float32),
        covariance=jnp.asarray(cov, jnp.float32),
        box=(-4.0, 6.0) if d == 2 else None,
    )


def _fixed(target: Target) -> Callable[[], Target]:
    def make() -> Target:
        return target

    make.__doc__ = target.description
    return make


TARGETS: dict[str, Callable[..., Target]] = {
    **{
        name: _fixed(Target(name, 2, fn, _ENERGY_LOG_Z[name], _ENERGY_DOC[name], box=(-5.0, 5.0)))
        for name, fn in [
            ("energy1", _energy1),
            ("energy2", _energy2),
            ("energy3", _energy3),
            ("energy4", _energy4),
        ]
    },
    "ring": _fixed(
        Target(
            "ring",
            2,
            _ring,
            _ring_log_z(_RING_RADIUS, _RING_STD),
            f"radial Gaussian: radius {_RING_RADIUS}, std {_RING_STD}, exact log Z",
            box=(-3.0, 3.0),
        )
    ),
    "correlated_gaussian": correlated_gaussian,
}


def target_names() -> list[str]:
    """The known target names."""
    return sorted(TARGETS)


def get_target(name: str, **kwargs) -> Target:
    """The target ``name``; ``get_target("correlated_gaussian", dim=5)`` passes ``dim``.

    Unknown names, or options a target does not take, raise ``ValueError``.

    >>> t = get_target("energy1")
    >>> t.dim, round(t.log_normalizer, 4)
    (2, 1.8775)
    >>> [round(float(v), 4) for v in t.log_density(jnp.array([[2.0, 0.0], [0.0, 0.0]]))]
    [0.0, -17.3624]
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(target_names())}")
    try:
        return TARGETS[name](**kwargs)
    except TypeError:
        raise ValueError(
            f"target {name!r} takes no options {sorted(kwargs)} "
            f"(only correlated_gaussian takes dim=)"
        ) from None


# ---- images: integer grey levels, offline (nflax.image_data) ---------------------------------
from nflax.image_data import (  # noqa: E402, F401  (re-exported from their own module)
    ImageData,
    digits,
    image_names,
    load_images,
    mnist,
    mnist_5k,
    read_idx,
    read_mnist,
)

__all__ = [
    "ConditionalDataset",
    "Dataset",
    "ImageData",
    "Target",
    "correlated_gaussian",
    "correlated_gaussian_moments",
    "digits",
    "get",
    "get_conditional",
    "get_target",
    "grid_log_normalizer",
    "image_names",
    "load_images",
    "mnist",
    "mnist_5k",
    "names",
    "read_idx",
    "read_mnist",
    "target_names",
]
