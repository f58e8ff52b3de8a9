"""Elementwise bijections: each output coordinate depends on its own input coordinate only."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

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
