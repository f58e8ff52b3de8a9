"""The invertible 1×1 convolution of Glow: a learned channel mixing at every pixel."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.linalg import solve_triangular

from nflax.bijections.base import Array, Bijection
from nflax.bijections.image.squeeze import image_shape
from nflax.variables import Buffer


class Invertible1x1Conv(Bijection):
    r"""Invertible 1×1 convolution (Kingma & Dhariwal 2018), LU-parameterised.

    One ``C × C`` matrix ``W = P L U`` applied to the channels of every pixel: ``P`` a fixed
    permutation matrix (a :class:`~nflax.variables.Buffer`), ``L`` unit lower-triangular,
    ``U`` upper-triangular with diagonal ``sign(s) ⊙ exp(log|s|)`` (``sign(s)`` fixed,
    ``log|s|`` learned), so ``W`` stays invertible.

    forward (data → latent):   ``z[i, j] = W x[i, j]``,    ``log|det J| = H·W·Σ_c log|s_c|``
    inverse (latent → data):   ``x[i, j] = W⁻¹ z[i, j]`` (``W⁻¹ = U⁻¹ L⁻¹ Pᵀ``, triangular
                               solves),                    ``log|det J⁻¹| = −H·W·Σ_c log|s_c|``

    ``W`` starts as a random rotation (the Q of a QR decomposition of a Gaussian matrix drawn
    from ``rngs.params()``), factored as ``P L U``.

    >>> from flax import nnx
    >>> layer = Invertible1x1Conv((2, 2, 3), rngs=nnx.Rngs(0))
    >>> w = layer.weight()
    >>> bool(jnp.allclose(w @ w.T, jnp.eye(3), atol=1e-5))  # a rotation at initialisation
    True
    """

    def __init__(self, event_shape: Sequence[int], *, rngs: nnx.Rngs):
        self.event_shape = image_shape("Invertible1x1Conv", event_shape)
        c = self.event_shape[-1]
        q, _ = jnp.linalg.qr(jax.random.normal(rngs.params(), (c, c)))
        p, lower, upper = jax.scipy.linalg.lu(q)
        s = jnp.diag(upper)
        self.permutation = Buffer(p)
        self.sign_s = Buffer(jnp.sign(s))
        self.lower = nnx.Param(jnp.tril(lower, k=-1))
        self.upper = nnx.Param(jnp.triu(upper, k=1))
        self.log_abs_s = nnx.Param(jnp.log(jnp.abs(s)))

    def _factors(self) -> tuple[Array, Array]:
        c = self.event_shape[-1]
        lower = jnp.tril(self.lower[...], k=-1) + jnp.eye(c, dtype=self.lower[...].dtype)
        diag = self.sign_s[...] * jnp.exp(self.log_abs_s[...])
        return lower, jnp.triu(self.upper[...], k=1) + jnp.diag(diag)

    def weight(self) -> Array:
        """The ``C × C`` matrix ``W = P L U``."""
        lower, upper = self._factors()
        return self.permutation[...] @ lower @ upper

    def _log_det(self, batch: tuple[int, ...]) -> Array:
        h, w, _ = self.event_shape
        return jnp.broadcast_to(h * w * jnp.sum(self.log_abs_s[...]), batch)

    def _forward(self, x, context):
        return x @ self.weight().T, self._log_det(x.shape[:-3])

    def _inverse(self, z, context):
        lower, upper = self._factors()
        eye = jnp.eye(lower.shape[0], dtype=lower.dtype)
        inv_lower = solve_triangular(lower, eye, lower=True, unit_diagonal=True)
        inv_w = solve_triangular(upper, inv_lower @ self.permutation[...].T, lower=False)
        return z @ inv_w.T, -self._log_det(z.shape[:-3])
