"""The multi-scale architecture (RealNVP, Glow) as ONE bijection from an image to a vector."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from nflax.bijections.base import Bijection, _common_context_dim


def _level_shapes(levels: Sequence[Bijection]) -> list[tuple[int, ...]]:
    """The shape factored out after each level but the last, checking that the levels fit."""
    factored, expected = [], None
    for i, b in enumerate(levels):
        if not isinstance(b, Bijection):
            raise ValueError(f"MultiScale: level {i} is a {type(b).__name__}, not a Bijection")
        out = b.latent_shape
        if i and tuple(b.event_shape) != expected:
            raise ValueError(
                f"MultiScale: level {i} ({type(b).__name__}) has event shape "
                f"{tuple(b.event_shape)}, expected {expected}: the channels level {i - 1} "
                "keeps"
            )
        if len(out) != 3:
            raise ValueError(
                f"MultiScale: level {i} ({type(b).__name__}) must output images (H, W, C), "
                f"its latent shape is {out}"
            )
        if i < len(levels) - 1:
            if out[-1] % 2:
                raise ValueError(
                    f"MultiScale: level {i} ({type(b).__name__}) outputs {out[-1]} channels "
                    f"(latent shape {out}); half of them are factored out, so it needs an even "
                    "number"
                )
            expected = (*out[:2], out[-1] // 2)
            factored.append((*out[:2], out[-1] - out[-1] // 2))
    return factored


class MultiScale(Bijection):
    r"""A multi-scale flow as one bijection, image ``(H, W, C)`` → vector ``(H·W·C,)``.

    ``levels`` are bijections ``f_0, …, f_{L−1}`` on images (each typically a squeeze, then
    ``K`` flow steps, then optionally Glow's split prior, see below). Level ``l < L − 1``
    outputs ``h_l`` with an even number of channels ``c_l``; its first ``c_l/2`` channels go
    on to level ``l + 1`` and the last ``c_l/2`` are *factored out*: passed through to the
    output unchanged. The last level keeps everything.

    forward (data → latent):   ``h_0 = f_0(x)``, ``h_{l+1} = f_{l+1}(h_l[…, :c_l/2])``,
                               ``z = concat(vec h_0[…, c_0/2:], …, vec h_{L−2}[…, c_{L−2}/2:],
                               vec h_{L−1})``, ``log|det J| = Σ_l log|det J_{f_l}|``
    inverse (latent → data):   split ``z`` into the same pieces, then from the last level
                               down ``x_l = f_l⁻¹(concat(x_{l+1}, piece_l))``;
                               ``log|det J⁻¹| = Σ_l log|det J_{f_l⁻¹}|``

    Factoring out is a permutation of coordinates, so the log-determinant is the levels' sum.
    Under one ``N(0, I)`` base on ``z``, this is the multi-scale model of RealNVP and Glow.
    Glow's learned prior for a factored-out half, ``N(μ(kept), σ(kept)²)``, is the same as
    ending the level with an affine coupling that transforms the factored-out half conditioned
    on the kept half (``channel_mask(shape, 0)``) before it is factored out.
    """

    def __init__(self, levels: Sequence[Bijection]):
        levels = list(levels)
        if not levels:
            raise ValueError("MultiScale: needs at least one level, received an empty list")
        self._factored = tuple(_level_shapes(levels))
        self.levels = nnx.List(levels)
        self.event_shape = tuple(levels[0].event_shape)
        self._latent_shape = (math.prod(self.event_shape),)
        self.context_dim = _common_context_dim(levels)

    def _forward(self, x, context):
        batch = x.shape[:-3]
        pieces, total = [], jnp.zeros(batch, x.dtype)
        for i, level in enumerate(self.levels):
            x, ld = level.forward(x, context)
            total = total + ld
            if i < len(self.levels) - 1:
                keep = x.shape[-1] // 2
                pieces.append(x[..., keep:].reshape(*batch, -1))
                x = x[..., :keep]
        pieces.append(x.reshape(*batch, -1))
        return jnp.concatenate(pieces, axis=-1), total

    def _inverse(self, z, context):
        batch = z.shape[:-1]
        sizes = [math.prod(s) for s in self._factored]
        starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        h = z[..., starts[-1] :].reshape(*batch, *self.levels[-1].latent_shape)
        total = jnp.zeros(batch, z.dtype)
        for i in range(len(self.levels) - 1, -1, -1):
            if i < len(self.levels) - 1:
                piece = z[..., starts[i] : starts[i + 1]].reshape(*batch, *self._factored[i])
                h = jnp.concatenate([h, piece], axis=-1)
            h, ld = self.levels[i].inverse(h, context)
            total = total + ld
        return h, total
