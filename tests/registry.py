"""The registry of every bijection, feeding the parametrized contract tests.

Adding a bijection = adding one line to ``REGISTRY``: a name and a factory
``(dim, rngs) -> Bijection``. Conditional layers also get a line in ``CONDITIONAL``:
``(dim, rngs, context_dim) -> Bijection``.
"""

import math

import jax

import nflax
from nflax.bijections import (
    AffineCoupling,
    Chain,
    Invert,
    LeakyReLU,
    Stack,
    alternating_mask,
)
from nflax.bijections.elementwise import Affine, Logit, Sigmoid, Tanh
from nflax.bijections.linear import LULinear, Permute, Reverse
from nflax.bijections.normalization import ActNorm, BatchNorm
from nflax.bijections.planar import Planar, Radial
from nflax.nets import MLP


def _coupling(dim, rngs, parity=0, context_dim=None):
    net = MLP(dim + (context_dim or 0), 2 * dim, hidden=(16, 16), rngs=rngs)
    return AffineCoupling(alternating_mask(dim, parity), net, context_dim=context_dim)


def _batchnorm(dim, rngs):
    """BatchNorm in evaluation mode, with running statistics from one non-trivial batch."""
    b = BatchNorm(dim, momentum=0.0)
    b.forward(1.0 + 3.0 * jax.random.normal(rngs.params(), (64, dim)))
    b.eval()
    return b


def _squash(dim, layers):
    """Parameter-free layers after a scale-down Affine (x/4: inside tanh/sigmoid's accurate range;
    the Affine also gives the shared gradient test a parameter)."""
    return Chain([Affine(dim, log_scale=math.log(4.0)), *layers])


REGISTRY = {
    "leaky_relu": lambda d, r: LeakyReLU(d),
    "affine_coupling": lambda d, r: _coupling(d, r),
    "affine_coupling_odd": lambda d, r: _coupling(d, r, parity=1),
    "chain": lambda d, r: Chain([_coupling(d, r), LeakyReLU(d), _coupling(d, r, 1)]),
    "invert": lambda d, r: Invert(Chain([_coupling(d, r), LeakyReLU(d)])),
    "stack": lambda d, r: Stack([Chain([_coupling(d, r, i % 2), LeakyReLU(d)]) for i in range(3)]),
    "realnvp": lambda d, r: nflax.flows.realnvp(d, num_layers=4, hidden=(16,), rngs=r).bijection,
    "realnvp_leaky": lambda d, r: (
        nflax.flows.realnvp(d, num_layers=3, hidden=(16,), leaky_relu=True, rngs=r).bijection
    ),
    "affine": lambda d, r: Affine(d),
    "actnorm": lambda d, r: ActNorm(d),
    "batchnorm": lambda d, r: _batchnorm(d, r),
    "lu_linear": lambda d, r: LULinear(d, rngs=r, permutation="random"),
    "permute": lambda d, r: Chain([Affine(d), Permute(d, key=r.params())]),
    "reverse": lambda d, r: Chain([Affine(d), Reverse(d)]),
    "tanh": lambda d, r: _squash(d, [Tanh(d)]),
    "sigmoid": lambda d, r: _squash(d, [Sigmoid(d)]),
    "logit": lambda d, r: _squash(
        d, [Sigmoid(d), Affine(d, loc=-1.0, log_scale=math.log(8)), Logit(d)]
    ),
    "planar": lambda d, r: Planar(d, rngs=r),
    "radial": lambda d, r: Radial(d, rngs=r),
    "planar_flow": lambda d, r: nflax.flows.planar(d, num_layers=3, rngs=r).bijection,
}
# Conditional variants: factory (dim, rngs, context_dim) -> Bijection.
CONDITIONAL = {
    "affine_coupling": lambda d, r, c: _coupling(d, r, context_dim=c),
    "realnvp": lambda d, r, c: (
        nflax.flows.realnvp(d, num_layers=3, hidden=(16,), context_dim=c, rngs=r).bijection
    ),
}
