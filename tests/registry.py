"""The registry of every bijection, feeding the parametrized contract tests.

Adding a bijection = adding one line to ``REGISTRY``: a name and a factory
``(dim, rngs) -> Bijection``. Conditional layers also get a line in ``CONDITIONAL``:
``(dim, rngs, context_dim) -> Bijection``. Image layers (event shape ``(H, W, C)``, shape
changing ones included) go in ``IMAGE_REGISTRY`` with the shapes to test them at, and
``IMAGE_CONDITIONAL``.
"""

import math

import jax
import numpy as np

import nflax
from nflax.bijections import (
    AffineCoupling,
    Chain,
    Invert,
    LeakyReLU,
    Stack,
    alternating_mask,
)
from nflax.bijections.autoregressive import MaskedAutoregressive
from nflax.bijections.continuous import ContinuousFlow
from nflax.bijections.coupling import AdditiveCoupling, SplineCoupling, half_mask
from nflax.bijections.elementwise import Affine, Logit, Sigmoid, Tanh
from nflax.bijections.image import (
    Invertible1x1Conv,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)
from nflax.bijections.linear import LULinear, Permute, Reverse
from nflax.bijections.normalization import ActNorm, BatchNorm
from nflax.bijections.planar import Planar, Radial
from nflax.bijections.splines import num_spline_params
from nflax.nets import MLP, ConvResNet
from nflax.vector_fields import VectorField


def _coupling(dim, rngs, parity=0, context_dim=None):
    # for dim 1 the mask is [0] whatever the parity: mask [1] would pass the one coordinate
    # through unchanged (an identity layer)
    net = MLP(dim + (context_dim or 0), 2 * dim, hidden=(16, 16), rngs=rngs)
    mask = alternating_mask(dim, 1 if dim == 1 else parity)
    return AffineCoupling(mask, net, context_dim=context_dim)


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


# Spline layers: float32 round-trip error is about ulp(z) / g'(x), and the tests' parameter
# noise on a wide conditioner gives slopes g' ~ 1e-2 (errors ~ 1e-5 after a few layers), so the
# spline entries use small conditioners (the spline-specific tests are in test_splines.py).
def _additive(dim, rngs, context_dim=None):
    net = MLP(dim + (context_dim or 0), dim, hidden=(16,), rngs=rngs)
    return AdditiveCoupling(alternating_mask(dim, 1), net, context_dim=context_dim)


def _spline_coupling(dim, rngs, context_dim=None):
    # half_mask: for dim 1 the mask is [0], so the one coordinate is transformed
    net = MLP(dim + (context_dim or 0), dim * num_spline_params(8), hidden=(8,), rngs=rngs)
    return SplineCoupling(half_mask(dim), net, bins=8, context_dim=context_dim)


def _continuous(dim, rngs, context_dim=None):
    # "direct": the Jacobian test differentiates the solve in forward mode (jax.jacfwd)
    field = VectorField(dim, hidden=(8,), context_dim=context_dim, rngs=rngs)
    return ContinuousFlow(field, adjoint="direct")


def _maf(dim, rngs, context_dim=None):
    # the spline transformer is covered by the nsf_autoregressive entries
    return MaskedAutoregressive(dim, hidden=(16,), context_dim=context_dim, rngs=rngs)


def _flow(name, dim, rngs, context_dim=None, hidden=(16,), **kw):
    flow = nflax.flows.build(name, dim=dim, hidden=hidden, context_dim=context_dim, rngs=rngs, **kw)
    return flow.bijection


def _nsf(dim, rngs, context_dim=None, variant="coupling"):
    return _flow("nsf", dim, rngs, context_dim, (4,), variant=variant, num_layers=2, bins=4)


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
    # a rotation, never the identity for d ≥ 2 (a drawn permutation of 2 is the identity half
    # the time); drawing one from a key is tested in test_catalogue
    "permute": lambda d, r: Chain([Affine(d), Permute(d, permutation=np.roll(np.arange(d), 1))]),
    "reverse": lambda d, r: Chain([Affine(d), Reverse(d)]),
    "tanh": lambda d, r: _squash(d, [Tanh(d)]),
    "sigmoid": lambda d, r: _squash(d, [Sigmoid(d)]),
    "logit": lambda d, r: _squash(
        d, [Sigmoid(d), Affine(d, loc=-1.0, log_scale=math.log(8)), Logit(d)]
    ),
    "planar": lambda d, r: Planar(d, rngs=r),
    "radial": lambda d, r: Radial(d, rngs=r),
    "planar_flow": lambda d, r: nflax.flows.planar(d, num_layers=3, rngs=r).bijection,
    "additive_coupling": lambda d, r: _additive(d, r),
    "spline_coupling": lambda d, r: _spline_coupling(d, r),
    "maf_affine_layer": lambda d, r: _maf(d, r),
    "nice": lambda d, r: _flow("nice", d, r, num_layers=2),
    "maf": lambda d, r: _flow("maf", d, r, num_layers=2),
    "iaf": lambda d, r: _flow("iaf", d, r, num_layers=2),
    "nsf_coupling": lambda d, r: _nsf(d, r),
    "nsf_autoregressive": lambda d, r: _nsf(d, r, variant="autoregressive"),
    "continuous": lambda d, r: _continuous(d, r),
}
# (name, dim) cases of the contract tests marked slow: an ODE solve and its derivatives take
# 10-30 s to compile on 2 cores (test_continuous.py checks the continuous flow's log-det, round
# trip and gradients in the fast suite).
SLOW = {("continuous", 1), ("continuous", 2), ("continuous", 5)}
SLOW_CONDITIONAL = SLOW

# Elementary layers (by layer name) that are the identity for every input at these dims, by
# definition: permuting one coordinate. Every other layer must move its input at every dim.
IDENTITY_AT = {"Permute": {1}, "Reverse": {1}}

# Parameters that get no gradient by construction, as (dim, only without context, path
# suffix): at dim 1 a coupling's conditioner sees m ⊙ x = 0 (its first kernel only ever
# multiplies zeros; with a context, the context's rows of it are live), and a MADE's first
# masked layer connects the one coordinate to nothing (it has no predecessors; the context
# enters through a separate dense layer). Only the biases after them carry the layer.
NO_GRADIENT = [
    (1, True, ("conditioner", "hidden", 0, "kernel")),
    (1, False, ("made", "hidden", 0, "kernel")),
    # LULinear, Invertible1x1Conv (dim = channels for images): the strictly triangular parts
    # of a 1×1 matrix are empty
    (1, False, ("lower",)),
    (1, False, ("upper",)),
]

# Conditional variants: factory (dim, rngs, context_dim) -> Bijection.
CONDITIONAL = {
    "affine_coupling": lambda d, r, c: _coupling(d, r, context_dim=c),
    "realnvp": lambda d, r, c: (
        nflax.flows.realnvp(d, num_layers=3, hidden=(16,), context_dim=c, rngs=r).bijection
    ),
    "additive_coupling": lambda d, r, c: _additive(d, r, context_dim=c),
    "spline_coupling": lambda d, r, c: _spline_coupling(d, r, context_dim=c),
    "maf_affine_layer": lambda d, r, c: _maf(d, r, c),
    "iaf": lambda d, r, c: _flow("iaf", d, r, c, num_layers=2),
    "nsf_autoregressive": lambda d, r, c: _nsf(d, r, c, "autoregressive"),
    "continuous": lambda d, r, c: _continuous(d, r, c),
}


# -- images: event shape (H, W, C) ------------------------------------------------------------
# name -> (factory (event_shape, rngs) -> Bijection, the event shapes it is tested at). The
# contract test feeds each bijection inputs of its own event_shape, so a layer whose data side
# is latent-shaped (an inverted squeeze) needs no special case.
IMAGE_SHAPES = [(4, 4, 2), (2, 2, 1)]


def _image_coupling(mask, rngs, context_dim=None):
    c = mask.shape[-1]
    net = ConvResNet(c + (context_dim or 0), 2 * c, width=8, blocks=1, rngs=rngs)
    return AffineCoupling(mask, net, context_dim=context_dim)


def _to_unit(shape, layers):
    """Real inputs squashed into (0, 1) first, for layers that take data in [0, 1]."""
    return Chain([Affine(shape, log_scale=math.log(4.0)), Sigmoid(shape), *layers])


def _image_flow(name, shape, rngs, **kw):
    return nflax.flows.build(name, event_shape=shape, hidden=8, blocks=1, rngs=rngs, **kw)


IMAGE_REGISTRY = {
    "squeeze": (lambda s, r: Chain([Affine(s), Squeeze(s)]), IMAGE_SHAPES),
    "invert_squeeze": (lambda s, r: Invert(Chain([Affine(s), Squeeze(s)])), [(4, 4, 2)]),
    "checkerboard_coupling": (lambda s, r: _image_coupling(checkerboard_mask(s), r), IMAGE_SHAPES),
    "checkerboard_coupling_odd": (
        lambda s, r: _image_coupling(checkerboard_mask(s, 1), r),
        IMAGE_SHAPES,
    ),
    "channel_coupling": (lambda s, r: _image_coupling(channel_mask(s, 1), r), [(4, 4, 2)]),
    "conv1x1": (lambda s, r: Invertible1x1Conv(s, rngs=r), IMAGE_SHAPES),
    "actnorm_image": (lambda s, r: ActNorm(s), IMAGE_SHAPES),
    "logit_image": (lambda s, r: _to_unit(s, [Logit(s, alpha=0.05)]), IMAGE_SHAPES),
    "realnvp_image": (
        lambda s, r: (
            _image_flow("realnvp_image", s, r, depth=1, split_prior=True, logit=False).bijection
        ),
        IMAGE_SHAPES,
    ),
    "glow": (
        lambda s, r: _to_unit(s, [_image_flow("glow", s, r, depth=2).bijection]),
        IMAGE_SHAPES,
    ),
}
# Conditional image layers: factory (event_shape, rngs, context_dim) -> Bijection.
IMAGE_CONDITIONAL = {
    "checkerboard_coupling": lambda s, r, c: _image_coupling(checkerboard_mask(s), r, c),
}


def exceptions(dim: int, conditional: bool = False) -> dict[str, list]:
    """The declared exceptions at ``dim`` (channels for images), as the options of
    ``nflax.testing.check_bijection``: ``no_gradient`` from ``NO_GRADIENT`` and
    ``identity_layers`` from ``IDENTITY_AT``."""
    no_gradient = [
        suffix
        for d, only_unconditional, suffix in NO_GRADIENT
        if d == dim and not (only_unconditional and conditional)
    ]
    identity = [name for name, dims in IDENTITY_AT.items() if dim in dims]
    return dict(no_gradient=no_gradient, identity_layers=identity)
