"""Time-dependent vector fields ``v(x, t[, c])``: the networks of continuous flows.

A vector field for :class:`~nflax.bijections.ContinuousFlow` is any NNX module called as
``field(x, t, context)`` with ``x`` of shape ``(*batch, dim)``, a scalar time ``t`` and a
context of shape ``(*batch, context_dim)`` (or ``None``), returning ``(*batch, dim)``; it
declares ``dim`` and ``context_dim``. :class:`VectorField` is the ready-made one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nflax.nets import Activation, get_activation

Array = jax.Array


def time_features(t: Array, num_frequencies: int) -> Array:
    """The time embedding ``φ(t) = [t, cos(πkt), sin(πkt) for k = 1 … K]`` (``2K + 1``
    features, shape ``(*t.shape, 2K + 1)``): smooth in ``t`` on ``[0, 1]``, with enough
    frequencies for a field that changes quickly near either end.

    >>> [round(float(v), 4) for v in time_features(jnp.array(0.25), 1)]  # cos = sin = √½
    [0.25, 0.7071, 0.7071]
    """
    t = jnp.asarray(t, jnp.float32)
    k = jnp.arange(1, int(num_frequencies) + 1, dtype=jnp.float32)
    angle = math.pi * t[..., None] * k
    return jnp.concatenate([t[..., None], jnp.cos(angle), jnp.sin(angle)], axis=-1)


class VectorField(nnx.Module):
    """``v(x, t, c) = MLP([x, φ(t), c])``: an MLP over the state, the time embedding
    :func:`time_features` (``2·time_frequencies + 1`` features) and the context, with the
    time features also added (through a linear map) to every hidden layer, so that each layer
    can change with ``t``.

    With ``zero_init_output=True`` (the default) the output layer starts at zero: the field
    is 0 and a continuous flow on it starts as the identity map.

    >>> field = VectorField(2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> field(jnp.ones((3, 2)), 0.5).shape, float(jnp.abs(field(jnp.ones((3, 2)), 0.5)).max())
    ((3, 2), 0.0)
    """

    def __init__(
        self,
        dim: int,
        *,
        hidden: Sequence[int] = (64, 64, 64),
        context_dim: int | None = None,
        time_frequencies: int = 4,
        activation: str | Activation = "silu",
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        hidden = tuple(int(h) for h in hidden)
        if int(dim) < 1 or not hidden or min(hidden) < 1 or int(time_frequencies) < 0:
            raise ValueError(
                f"VectorField: expected dim ≥ 1, at least one positive hidden size and "
                f"time_frequencies ≥ 0, received dim={dim}, hidden={hidden}, "
                f"time_frequencies={time_frequencies}"
            )
        if context_dim is not None and int(context_dim) < 1:
            raise ValueError(
                f"VectorField: context_dim must be ≥ 1 or None, received {context_dim}"
            )
        self.dim = int(dim)
        self.context_dim = None if context_dim is None else int(context_dim)
        self.time_frequencies = int(time_frequencies)
        n_time = 2 * self.time_frequencies + 1
        sizes = [self.dim + n_time + (self.context_dim or 0), *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        # the time enters every hidden layer after the first, as a learned shift
        self.time_in = nnx.List(
            [nnx.Linear(n_time, b, use_bias=False, rngs=rngs) for b in hidden[1:]]
        )
        init = (
            nnx.initializers.zeros_init() if zero_init_output else nnx.initializers.lecun_normal()
        )
        self.out = nnx.Linear(hidden[-1], self.dim, kernel_init=init, rngs=rngs)
        self.activation = get_activation(activation, "VectorField")

    def __call__(self, x: Array, t, context: Array | None = None) -> Array:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"VectorField: expected x of shape (*batch, {self.dim}), received {x.shape}"
            )
        phi = jnp.broadcast_to(
            time_features(t, self.time_frequencies), (*x.shape[:-1], 2 * self.time_frequencies + 1)
        ).astype(x.dtype)
        parts = [x, phi]
        if self.context_dim is not None:
            if context is None:
                raise ValueError(
                    f"VectorField: this field is conditional and needs a context of shape "
                    f"(*batch, {self.context_dim}); received none"
                )
            parts.append(jnp.broadcast_to(context, (*x.shape[:-1], self.context_dim)))
        h = self.activation(self.layers[0](jnp.concatenate(parts, axis=-1)))
        for layer, time_in in zip(self.layers[1:], self.time_in, strict=True):
            h = self.activation(layer(h) + time_in(phi))
        return self.out(h)
