"""Bijections: invertible maps with tractable log-determinants (forward = data → latent)."""

from nflax.bijections.autoregressive import MaskedAutoregressive
from nflax.bijections.base import Bijection, Buffer, Chain, Invert, Stack
from nflax.bijections.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    SplineCoupling,
    alternating_mask,
    half_mask,
    random_mask,
)
from nflax.bijections.elementwise import Affine, LeakyReLU, Logit, Sigmoid, Tanh
from nflax.bijections.linear import LULinear, Permute, Reverse
from nflax.bijections.normalization import ActNorm, BatchNorm, DataInit
from nflax.bijections.planar import Planar, Radial
from nflax.bijections.splines import (
    num_spline_params,
    rq_spline_forward,
    rq_spline_inverse,
    rq_spline_log_derivative,
)

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "Affine",
    "AffineCoupling",
    "BatchNorm",
    "Bijection",
    "Buffer",
    "Chain",
    "DataInit",
    "Invert",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MaskedAutoregressive",
    "Permute",
    "Planar",
    "Radial",
    "Reverse",
    "Sigmoid",
    "SplineCoupling",
    "Stack",
    "Tanh",
    "alternating_mask",
    "half_mask",
    "num_spline_params",
    "random_mask",
    "rq_spline_forward",
    "rq_spline_inverse",
    "rq_spline_log_derivative",
]
