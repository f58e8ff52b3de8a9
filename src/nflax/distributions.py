"""Base distributions and :class:`Flow` (a base distribution pushed through a bijection)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nflax.bijections.base import Bijection

Array = jax.Array


class Distribution(nnx.Module):
    """A distribution over events of shape ``event_shape``.

    ``log_prob(x)`` sums over the event axes; ``sample(key, shape)`` returns
    ``(*shape, *event_shape)``.
    """

    event_shape: tuple[int, ...] = ()

    def log_prob(self, x: Array, context: Array | None = None) -> Array:
        raise NotImplementedError

    def sample(self, key: Array, shape: Sequence[int] = (), context: Array | None = None) -> Array:
        raise NotImplementedError


class StandardNormal(Distribution):
    """``N(0, I)`` over ``event_shape``: ``log p(z) = −½‖z‖² − (d/2)·log 2π``."""

    def __init__(self, event_shape: int | Sequence[int]):
        self.event_shape = (
            (int(event_shape),) if isinstance(event_shape, int) else tuple(event_shape)
        )

    def log_prob(self, x, context=None):
        axes = tuple(range(x.ndim - len(self.event_shape), x.ndim))
        d = math.prod(self.event_shape)
        return -0.5 * jnp.sum(x**2, axis=axes) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, key, shape=(), context=None):
        return jax.random.normal(key, (*tuple(shape), *self.event_shape))


class Flow(nnx.Module):
    """A normalizing flow: ``x = f⁻¹(z)``, ``z ~ base``, with ``f`` the ``bijection``.

    ``log p(x) = log p_base(f(x)) + log|det ∂f/∂x|`` — the forward (data → latent) pass.
    Sampling runs the inverse (latent → data) pass.

    ``spec`` (set by the constructors in :mod:`nflax.flows`) records how to rebuild the flow:
    a JSON string with the constructor name and its keyword arguments.
    """

    def __init__(self, base: Distribution, bijection: Bijection, *, spec: str | None = None):
        if tuple(base.event_shape) != tuple(bijection.event_shape):
            raise ValueError(
                f"Flow: base event shape {tuple(base.event_shape)} does not match the "
                f"bijection's event shape {tuple(bijection.event_shape)}"
            )
        self.base = base
        self.bijection = bijection
        self.event_shape = tuple(bijection.event_shape)
        self.spec = spec

    def log_prob(self, x: Array, context: Array | None = None) -> Array:
        """``log p(x)`` for a batch ``x`` of shape ``(*batch, *event_shape)``."""
        x = jnp.asarray(x)
        z, log_det = self.bijection.forward(x, context)
        return self.base.log_prob(z, context) + log_det

    def sample(self, key: Array, n: int, context: Array | None = None) -> Array:
        """Draw ``n`` samples, shape ``(n, *event_shape)`` (noise → data)."""
        return self.sample_and_log_prob(key, n, context)[0]

    def sample_and_log_prob(
        self, key: Array, n: int, context: Array | None = None
    ) -> tuple[Array, Array]:
        """Samples and their ``log p(x)`` in one inverse pass (no second forward pass)."""
        z = self.base.sample(key, (int(n),), context)
        x, log_det_inv = self.bijection.inverse(z, context)
        return x, self.base.log_prob(z, context) - log_det_inv

    def trajectory(self, x: Array, context: Array | None = None) -> list[Array]:
        """The batch after each layer, data → latent, input first (last is the latent)."""
        return self.bijection.trajectory(jnp.asarray(x), context)

    def sample_trajectory(self, key: Array, n: int, context: Array | None = None) -> list[Array]:
        """Noise pushed through each layer in the generating direction, noise first."""
        z = self.base.sample(key, (int(n),), context)
        return self.bijection.inverse_trajectory(z, context)

    def layer_names(self) -> list[str]:
        """Elementary layer names in forward order (``trajectory(x)[i + 1]`` follows layer i)."""
        return self.bijection.layer_names()
