"""The registry of every bijection, feeding the parametrized contract tests.

Adding a bijection = adding one line to ``REGISTRY``: a name and a factory
``(dim, rngs) -> Bijection``. Conditional layers also get a line in ``CONDITIONAL``:
``(dim, rngs, context_dim) -> Bijection``.
"""

import nflax
from nflax.bijections import (
    AffineCoupling,
    Chain,
    Invert,
    LeakyReLU,
    Stack,
    alternating_mask,
)
from nflax.nets import MLP


def _coupling(dim, rngs, parity=0, context_dim=None):
    net = MLP(dim + (context_dim or 0), 2 * dim, hidden=(16, 16), rngs=rngs)
    return AffineCoupling(alternating_mask(dim, parity), net, context_dim=context_dim)


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
}
# Conditional variants: factory (dim, rngs, context_dim) -> Bijection.
CONDITIONAL = {
    "affine_coupling": lambda d, r, c: _coupling(d, r, context_dim=c),
    "realnvp": lambda d, r, c: (
        nflax.flows.realnvp(d, num_layers=3, hidden=(16,), context_dim=c, rngs=r).bijection
    ),
}
