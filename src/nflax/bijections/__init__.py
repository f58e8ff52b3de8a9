"""Bijections: invertible maps with tractable log-determinants (forward = data → latent)."""

from nflax.bijections.base import Bijection, Buffer, Chain, Invert, Stack
from nflax.bijections.coupling import AffineCoupling, alternating_mask
from nflax.bijections.elementwise import LeakyReLU

__all__ = [
    "AffineCoupling",
    "Bijection",
    "Buffer",
    "Chain",
    "Invert",
    "LeakyReLU",
    "Stack",
    "alternating_mask",
]
