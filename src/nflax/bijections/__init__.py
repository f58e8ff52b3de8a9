"""Bijections: invertible maps with tractable log-determinants (forward = data → latent)."""

from nflax.bijections.autoregressive import MaskedAutoregressive
from nflax.bijections.base import Bijection, Chain, Invert, Stack
from nflax.bijections.continuous import ContinuousFlow
from nflax.bijections.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    SplineCoupling,
    alternating_mask,
    half_mask,
    random_mask,
)
from nflax.bijections.elementwise import Affine, LeakyReLU, Logit, Sigmoid, Tanh
from nflax.bijections.image import (
    Invertible1x1Conv,
    MultiScale,
    Squeeze,
    channel_mask,
    checkerboard_mask,
)
from nflax.bijections.linear import LULinear, Permute, Reverse
from nflax.bijections.normalization import ActNorm, BatchNorm
from nflax.bijections.planar import Planar, Radial
from nflax.bijections.splines import (
    num_spline_params,
    rq_spline_forward,
    rq_spline_inverse,
    rq_spline_log_derivative,
)
from nflax.bijections.transformers import (
    AdditiveTransformer,
    AffineTransformer,
    SplineTransformer,
    Transformer,
)
from nflax.variables import Buffer, DataInit

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AdditiveTransformer",
    "Affine",
    "AffineCoupling",
    "AffineTransformer",
    "BatchNorm",
    "Bijection",
    "Buffer",
    "Chain",
    "ContinuousFlow",
    "Coupling",
    "DataInit",
    "Invert",
    "Invertible1x1Conv",
    "LULinear",
    "LeakyReLU",
    "Logit",
    "MaskedAutoregressive",
    "MultiScale",
    "Permute",
    "Planar",
    "Radial",
    "Reverse",
    "Sigmoid",
    "SplineCoupling",
    "SplineTransformer",
    "Squeeze",
    "Stack",
    "Tanh",
    "Transformer",
    "alternating_mask",
    "channel_mask",
    "checkerboard_mask",
    "half_mask",
    "num_spline_params",
    "random_mask",
    "rq_spline_forward",
    "rq_spline_inverse",
    "rq_spline_log_derivative",
]
