"""Elementwise bijections: each output coordinate depends on its own input coordinate only."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nflax._numerics import clamp
from nflax.bijections.base import Bijection, sum_event


class LeakyReLU(Bijection):
    r"""The tutorial's learnable leaky ReLU, with slope ``α = sigmoid(a)`` on negative inputs.

    ``a`` is one learnable scalar, initialised to 1 as in the tutorial (``α ≈ 0.731``); since
    ``α ∈ (0, 1)`` the map is always invertible.

    forward (data → latent):   ``z = x`` if ``x ≥ 0`` else ``α·x``;
                               ``log|det J| = Σ_i [x_i < 0] · log α``
    inverse (latent → data):   ``x = z`` if ``z ≥ 0`` else ``z / α``;
                               ``log|det J⁻¹| = −Σ_i [z_i < 0] · log α``
    """

    def __init__(self, event_shape: int | Sequence[int], *, init: float = 1.0):
        self.event_shape = _shape(event_shape)
        self.a = nnx.Param(jnp.asarray(init, jnp.float32))

    def _log_alpha(self):
        return jax.nn.log_sigmoid(self.a[...])

    def _forward(self, x, context):
        log_alpha = self._log_alpha()
        neg = x < 0
        z = jnp.where(neg, x * jnp.exp(log_alpha), x)
        return z, sum_event(neg * log_alpha, len(self.event_shape))

    def _inverse(self, z, context):
        log_alpha = self._log_alpha()
        neg = z < 0
        x = jnp.where(neg, z * jnp.exp(-log_alpha), z)
        return x, -sum_event(neg * log_alpha, len(self.event_shape))


def _shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
    shape = (int(event_shape),) if isinstance(event_shape, int) else tuple(map(int, event_shape))
    if any(d < 1 for d in shape):
        raise ValueError(f"event_shape must contain positive sizes, received {shape}")
    return shape


class Affine(Bijection):
    r"""A learnable elementwise affine map: location ``μ`` and log-scale ``s``, one per element.

    forward (data → latent):   ``z = (x − μ) ⊙ exp(−s)``,   ``log|det J| = −Σ_i s_i``
    inverse (latent → data):   ``x = μ + z ⊙ exp(s)``,      ``log|det J⁻¹| = Σ_i s_i``

    ``μ`` and ``s`` have the event shape and start at ``loc`` and ``log_scale`` (scalars or
    arrays broadcasting to it; 0 and 0 by default, the identity map). In the generating
    direction ``μ`` and ``exp(s)`` are the location and scale given to the data.

    >>> layer = Affine(2, loc=1.0, log_scale=jnp.log(2.0))
    >>> layer.forward(jnp.array([[3.0, 5.0]]))[0]
    Array([[1., 2.]], dtype=float32)
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        *,
        loc: float | jax.Array = 0.0,
        log_scale: float | jax.Array = 0.0,
    ):
        self.event_shape = _shape(event_shape)
        self.loc = nnx.Param(_init_array("Affine", "loc", loc, self.event_shape))
        self.log_scale = nnx.Param(_init_array("Affine", "log_scale", log_scale, self.event_shape))

    def _forward(self, x, context):
        s = self.log_scale[...]
        z = (x - self.loc[...]) * jnp.exp(-s)
        return z, jnp.broadcast_to(-jnp.sum(s), x.shape[: x.ndim - len(self.event_shape)])

    def _inverse(self, z, context):
        s = self.log_scale[...]
        x = self.loc[...] + z * jnp.exp(s)
        return x, jnp.broadcast_to(jnp.sum(s), z.shape[: z.ndim - len(self.event_shape)])


def _init_array(layer: str, name: str, value, shape: tuple[int, ...]) -> jax.Array:
    arr = jnp.asarray(value, jnp.float32)
    try:
        arr = jnp.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(
            f"{layer}: {name} must broadcast to the event shape {shape}, received shape {arr.shape}"
        ) from None
    if not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError(f"{layer}: {name} must be finite, received {arr}")
    return jnp.array(arr)


def _clamp_open_unit(v: jax.Array, low: float) -> jax.Array:
    """Clamp into ``[low + ε, 1 − ε]`` with ``ε = finfo(dtype).eps`` (keeps logs finite)."""
    eps = jnp.finfo(v.dtype).eps
    return clamp(v, low + eps, 1.0 - eps)  # derivative 1 up to the ends (not 1/2 at ties)


def _log_sigmoid_derivative(x: jax.Array) -> jax.Array:
    """``log σ'(x) = log σ(x) + log σ(−x) = −softplus(−x) − softplus(x)``, stable for all x."""
    return -jax.nn.softplus(-x) - jax.nn.softplus(x)


class Tanh(Bijection):
    r"""``tanh``, mapping the real line onto ``(−1, 1)``; no parameters.

    forward (data → latent):   ``z = tanh(x)``,
                               ``log|det J| = Σ_i log(1 − tanh² x_i)
                               = Σ_i 2·(log 2 − x_i − softplus(−2 x_i))`` (stable form)
    inverse (latent → data):   ``x = atanh(z)``,  ``log|det J⁻¹| = −Σ_i log(1 − z_i²)``

    Domain: the inverse is defined on ``(−1, 1)`` only. It clamps ``z`` to
    ``[−1 + ε, 1 − ε]`` (``ε = finfo(dtype).eps``, 1.2e-7 in float32) before ``atanh`` and the
    log, so it stays finite: inputs outside the open interval are silently clamped, and in
    float32 the round trip loses accuracy once ``|x| ≳ 4`` (``tanh x`` rounds towards ±1;
    ``tanh x == 1`` exactly for ``x ≳ 9``). To map *bounded data* to the real line, use
    ``Invert(Tanh(dim))``.
    """

    def __init__(self, event_shape: int | Sequence[int]):
        self.event_shape = _shape(event_shape)

    def _forward(self, x, context):
        ld = 2.0 * (jnp.log(2.0) - x - jax.nn.softplus(-2.0 * x))
        return jnp.tanh(x), sum_event(ld, len(self.event_shape))

    def _inverse(self, z, context):
        z = _clamp_open_unit(z, -1.0)
        ld = -(jnp.log1p(-z) + jnp.log1p(z))
        return jnp.arctanh(z), sum_event(ld, len(self.event_shape))


class Sigmoid(Bijection):
    r"""The logistic sigmoid ``σ(x) = 1 / (1 + e^{−x})``, real line → ``(0, 1)``; no parameters.

    forward (data → latent):   ``z = σ(x)``,
                               ``log|det J| = Σ_i log σ(x_i) + log σ(−x_i)``
    inverse (latent → data):   ``x = logit(z) = log z − log(1 − z)``,
                               ``log|det J⁻¹| = −Σ_i [log z_i + log(1 − z_i)]``

    Domain: the inverse is defined on ``(0, 1)`` only. It clamps ``z`` to ``[ε, 1 − ε]``
    (``ε = finfo(dtype).eps``) before the logs, so it stays finite; inputs outside are
    silently clamped, and in float32 the round trip loses accuracy once ``|x| ≳ 5``.
    :class:`Logit` is the same map in the other direction (bounded data → real line).
    """

    def __init__(self, event_shape: int | Sequence[int]):
        self.event_shape = _shape(event_shape)

    def _forward(self, x, context):
        return jax.nn.sigmoid(x), sum_event(_log_sigmoid_derivative(x), len(self.event_shape))

    def _inverse(self, z, context):
        z = _clamp_open_unit(z, 0.0)
        log_z, log_1mz = jnp.log(z), jnp.log1p(-z)
        return log_z - log_1mz, -sum_event(log_z + log_1mz, len(self.event_shape))


class Logit(Bijection):
    r"""The logit, ``(0, 1)`` → real line: the inverse of :class:`Sigmoid`; no parameters.

    Use it first in a flow for data in the unit box (pixel intensities, proportions). With
    ``alpha`` ``α ∈ [0, ½)`` the data are first pulled into ``[α, 1 − α]`` (RealNVP's image
    preprocessing), ``u = α + (1 − 2α)·x``, so pixels at exactly 0 or 1 map to ``∓logit α``:

    forward (data → latent):   ``z = logit(u) = log u − log(1 − u)``,
                               ``log|det J| = Σ_i [log(1 − 2α) − log u_i − log(1 − u_i)]``
    inverse (latent → data):   ``x = (σ(z) − α) / (1 − 2α)``,
                               ``log|det J⁻¹| = Σ_i [log σ(z_i) + log σ(−z_i) − log(1 − 2α)]``

    Any event shape (vectors, images). Domain: the forward pass is defined for ``u ∈ (0, 1)``;
    it clamps ``u`` to ``[ε, 1 − ε]`` (``ε = finfo(dtype).eps``) before the logs, so data at
    exactly 0 or 1 with ``α = 0`` give a finite, large ``|z|`` rather than ``±inf``.

    >>> Logit((1, 2, 1), alpha=0.05).forward(jnp.zeros((1, 2, 1)))[0].ravel().tolist()
    [-2.944438934326172, -2.944438934326172]
    """

    def __init__(self, event_shape: int | Sequence[int], *, alpha: float = 0.0):
        self.event_shape = _shape(event_shape)
        if not 0.0 <= float(alpha) < 0.5:
            raise ValueError(f"Logit: alpha must be in [0, 0.5), received {alpha!r}")
        self.alpha = float(alpha)

    def _log_det_shift(self) -> float:
        """``Σ_i log(1 − 2α)`` over one event (0 without rescaling)."""
        return math.prod(self.event_shape) * math.log1p(-2.0 * self.alpha)

    def _forward(self, x, context):
        u = _clamp_open_unit(self.alpha + (1.0 - 2.0 * self.alpha) * x, 0.0)
        log_u, log_1mu = jnp.log(u), jnp.log1p(-u)
        ld = self._log_det_shift() - sum_event(log_u + log_1mu, len(self.event_shape))
        return log_u - log_1mu, ld

    def _inverse(self, z, context):
        x = (jax.nn.sigmoid(z) - self.alpha) / (1.0 - 2.0 * self.alpha)
        ld = sum_event(_log_sigmoid_derivative(z), len(self.event_shape))
        return x, ld - self._log_det_shift()
