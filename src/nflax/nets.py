"""Conditioner networks: the small "hypernetworks" that predict a layer's parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Dense → activation → … → Dense, the tutorial's hypernetwork.

    With ``zero_init_output=True`` (the default) the last layer starts at zero, so a coupling
    layer built on it starts as the identity map.

    >>> from flax import nnx
    >>> net = MLP(2, 4, hidden=(8, 8), rngs=nnx.Rngs(0))
    >>> net(jnp.ones((3, 2))).shape
    (3, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[jax.Array], jax.Array] = jnp.tanh,
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        sizes = [int(in_features), *map(int, hidden)]
        if any(s < 1 for s in [*sizes, out_features]):
            raise ValueError(
                f"MLP: sizes must be positive, received in={in_features}, hidden={tuple(hidden)}, "
                f"out={out_features}"
            )
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        init = (
            nnx.initializers.zeros_init() if zero_init_output else nnx.initializers.lecun_normal()
        )
        self.out = nnx.Linear(sizes[-1], int(out_features), kernel_init=init, rngs=rngs)
        self.activation = activation
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.out(x)
