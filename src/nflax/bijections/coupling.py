"""Coupling layers: one part of the input, picked by a binary mask, conditions the rest."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nflax.bijections.base import Bijection, Buffer, sum_event


def alternating_mask(dim: int, parity: int = 0) -> np.ndarray:
    """``[1, 0, 1, 0, …]`` (parity 0) or ``[0, 1, 0, 1, …]`` (parity 1)."""
    return ((np.arange(dim) + parity) % 2 == 0).astype(np.float32)


class AffineCoupling(Bijection):
    r"""RealNVP affine coupling layer (Dinh et al. 2017), as in the tutorial.

    With a binary ``mask`` ``m`` (1 = passed through and conditioning), the conditioner predicts
    ``(s̃, t) = net(m ⊙ x [, context])``; the scale is stabilised with a learned per-dimension
    ``c`` (initialised to 0) as ``s = tanh(s̃ / e^c) · e^c`` so ``|s| ≤ e^c``, and both are
    masked: ``s ← (1 − m) ⊙ s``, ``t ← (1 − m) ⊙ t``.

    forward (data → latent):   ``z = (x + t) ⊙ exp(s)``,      ``log|det J| = Σ_i s_i``
    inverse (latent → data):   ``x = z ⊙ exp(−s) − t``,       ``log|det J⁻¹| = −Σ_i s_i``

    ``s, t`` depend only on ``m ⊙ x = m ⊙ z``, so the inverse is exact.

    ``conditioner`` maps ``(*batch, dim [+ context_dim])`` to ``(*batch, 2·dim)`` (first half
    ``s̃``, second half ``t``), e.g. :class:`nflax.nets.MLP`.
    """

    def __init__(
        self,
        mask: Sequence[float] | np.ndarray,
        conditioner: nnx.Module,
        *,
        context_dim: int | None = None,
    ):
        mask = np.asarray(mask, np.float32)
        if mask.ndim != 1 or not np.all((mask == 0) | (mask == 1)):
            raise ValueError(f"AffineCoupling: mask must be a 1D array of 0/1, received {mask}")
        dim = mask.shape[0]
        self.event_shape = (dim,)
        self.context_dim = None if context_dim is None else int(context_dim)
        self.mask = Buffer(jnp.asarray(mask))
        self.conditioner = conditioner
        self.c = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def _shift_log_scale(self, x, context):
        m = self.mask[...]
        h = x * m
        if context is not None and self.context_dim is not None:
            h = jnp.concatenate([h, context.astype(h.dtype)], axis=-1)
        out = self.conditioner(h)
        dim = self.event_shape[0]
        if out.shape[-1] != 2 * dim:
            raise ValueError(
                f"AffineCoupling: conditioner must output 2*dim = {2 * dim} features, "
                f"received {out.shape[-1]}"
            )
        s, t = out[..., :dim], out[..., dim:]
        ec = jnp.exp(self.c[...])
        s = jnp.tanh(s / ec) * ec
        return s * (1 - m), t * (1 - m)

    def _forward(self, x, context):
        s, t = self._shift_log_scale(x, context)
        return (x + t) * jnp.exp(s), sum_event(s, 1)

    def _inverse(self, z, context):
        s, t = self._shift_log_scale(z, context)
        return z * jnp.exp(-s) - t, -sum_event(s, 1)
