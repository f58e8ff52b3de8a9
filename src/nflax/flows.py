"""Ready-made flows. Each constructor records its own arguments so a checkpoint can rebuild it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax.numpy as jnp  # noqa: F401  (doctest namespace)
from flax import nnx

from nflax.bijections import AffineCoupling, Bijection, Chain, LeakyReLU, Stack, alternating_mask
from nflax.distributions import Flow, StandardNormal
from nflax.nets import MLP

CONSTRUCTORS: dict[str, Callable[..., Flow]] = {}


def register(fn: Callable[..., Flow]) -> Callable[..., Flow]:
    """Register a constructor under its function name (used by checkpoints and the CLI)."""
    CONSTRUCTORS[fn.__name__] = fn
    return fn


def build(name: str, **kwargs) -> Flow:
    """Build a registered flow by name, e.g. ``build("realnvp", dim=2, rngs=nnx.Rngs(0))``."""
    if name not in CONSTRUCTORS:
        raise ValueError(f"unknown flow {name!r}; known flows: {', '.join(sorted(CONSTRUCTORS))}")
    return CONSTRUCTORS[name](**kwargs)


def _spec(name: str, **kwargs) -> str:
    return json.dumps({"constructor": name, "kwargs": kwargs}, sort_keys=True)


def _check_dim(name: str, dim: int, num_layers: int) -> None:
    if int(dim) < 1:
        raise ValueError(f"{name}: dim must be ≥ 1, received {dim}")
    if int(num_layers) < 1:
        raise ValueError(f"{name}: num_layers must be ≥ 1, received {num_layers}")


@register
def realnvp(
    dim: int,
    *,
    num_layers: int = 8,
    hidden: Sequence[int] = (64, 64),
    leaky_relu: bool = False,
    context_dim: int | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """RealNVP (Dinh et al. 2017): affine couplings with alternating masks, as in the tutorial.

    ``num_layers`` coupling layers, masks ``[1,0,…]`` and ``[0,1,…]`` alternating, each with an
    MLP conditioner (tanh, ``hidden`` sizes). ``leaky_relu=True`` follows every coupling with the
    tutorial's learnable :class:`~nflax.bijections.LeakyReLU`. The identical blocks are stacked
    and scanned, so compile time does not grow with ``num_layers``.

    >>> flow = realnvp(2, num_layers=4, rngs=nnx.Rngs(0))
    >>> flow.log_prob(jnp.zeros((3, 2))).shape
    (3,)
    """
    _check_dim("realnvp", dim, num_layers)
    dim, num_layers = int(dim), int(num_layers)
    hidden = tuple(int(h) for h in hidden)
    cin = dim + (context_dim or 0)

    def block(i: int) -> Bijection:
        net = MLP(cin, 2 * dim, hidden=hidden, rngs=rngs)
        layer = AffineCoupling(alternating_mask(dim, i % 2), net, context_dim=context_dim)
        return Chain([layer, LeakyReLU(dim)]) if leaky_relu else layer

    bijection = Stack([block(i) for i in range(num_layers)])
    spec = _spec(
        "realnvp",
        dim=dim,
        num_layers=num_layers,
        hidden=list(hidden),
        leaky_relu=bool(leaky_relu),
        context_dim=context_dim,
    )
    return Flow(StandardNormal(dim), bijection, spec=spec)
