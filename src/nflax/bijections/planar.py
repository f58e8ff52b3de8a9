"""Planar and radial flows (Rezende & Mohamed 2015), with numerical / closed-form inverses.

Direction: the paper writes both maps in the generating direction, ``f(z)``. Here the map
``f`` is the **forward** pass (data → latent), so ``log_prob`` (training by maximum
likelihood) costs one closed-form pass, and the **inverse** (sampling) inverts ``f``:
numerically for :class:`Planar`, in closed form for :class:`Radial`. For the paper's use
(variational inference: cheap sampling with ``f`` in the generating direction) wrap the layer
in :class:`~nflax.bijections.Invert`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nflax.bijections.base import Bijection

Array = jax.Array

#: Bisection steps of the planar inverse: each halves a bracket of width ``2|wᵀû|``.
PLANAR_BISECTION_STEPS = 60


def _check_dim(name: str, dim: int) -> int:
    if isinstance(dim, bool) or int(dim) != dim or int(dim) < 1:
        raise ValueError(f"{name}: dim must be a positive integer, received {dim!r}")
    return int(dim)


def _safe_norm(v: Array) -> Array:
    """``‖v‖`` over the last axis with a finite (zero) gradient at ``v = 0``."""
    sq = jnp.sum(jnp.square(v), axis=-1)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


class Planar(Bijection):
    r"""Planar flow ``f(x) = x + û·tanh(wᵀx + b)``.

    ``û = u + (m(wᵀu) − wᵀu)·w/‖w‖²`` with ``m(a) = −1 + softplus(a)``, so ``wᵀû > −1`` and
    ``f`` is invertible for every ``(u, w, b)``. With ``a = wᵀx + b`` and ``h = tanh``:

    forward (data → latent):   ``z = x + û·h(a)``,
                               ``log|det J| = log(1 + h'(a)·wᵀû)``  (``h' = 1 − tanh²``,
                               positive because ``wᵀû > −1``; computed as
                               ``log(h² + softplus(wᵀu)·h')``, accurate as ``wᵀû → −1``)
    inverse (latent → data):   ``x = z − û·h(α + b)`` where ``α = wᵀx`` solves the scalar
                               equation ``g(α) = α + wᵀû·h(α + b) − wᵀz = 0``;
                               ``log|det J⁻¹| = −log(1 + h'(α + b)·wᵀû)``

    ``g`` is increasing and its root lies in ``[wᵀz − |wᵀû|, wᵀz + |wᵀû|]``. The inverse is
    **numerical**: :data:`PLANAR_BISECTION_STEPS` (60) bisection steps on that bracket, then one
    Newton step. The bisection is not differentiated (``stop_gradient``); the Newton step
    carries the exact implicit-function gradient ``∂α/∂z = w / g'(α)``. The result is exact to
    float precision (round trip ``|inverse(forward(x)) − x| ≲ 1e-6·(1 + |x|)`` in float32).

    Parameters: ``u``, ``w`` drawn from ``N(0, 0.1²)`` (from ``rngs.params()``), ``b = 0``.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        dim = _check_dim("Planar", dim)
        self.event_shape = (dim,)
        self.u = nnx.Param(0.1 * jax.random.normal(rngs.params(), (dim,)))
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (dim,)))
        self.b = nnx.Param(jnp.zeros((), jnp.float32))

    def _u_hat(self) -> tuple[Array, Array, Array]:
        """``(û, wᵀû, softplus(wᵀu))`` (``wᵀû = −1 + softplus(wᵀu)``)."""
        u, w = self.u[...], self.w[...]
        wu = jnp.dot(w, u)
        sp = jax.nn.softplus(wu)
        m = -1.0 + sp
        w_sq = jnp.maximum(jnp.dot(w, w), jnp.finfo(w.dtype).tiny)
        u_hat = u + (m - wu) * w / w_sq
        return u_hat, m, sp

    @staticmethod
    def _log_slope(h: Array, sp: Array) -> Array:
        """``log(1 + wᵀû·(1 − h²))`` written as ``log(h² + softplus(wᵀu)·(1 − h²))``.

        The two are equal (``wᵀû = −1 + softplus(wᵀu)``); the second stays accurate when
        ``wᵀû`` rounds to −1 (``wᵀu ≪ 0``), where the first would cancel to ``log 0``.
        """
        h_sq = jnp.square(h)
        return jnp.log(h_sq + sp * (1.0 - h_sq))

    def _forward(self, x, context):
        u_hat, _, sp = self._u_hat()
        h = jnp.tanh(x @ self.w[...] + self.b[...])
        z = x + h[..., None] * u_hat
        return z, self._log_slope(h, sp)

    def _inverse(self, z, context):
        u_hat, c, sp = self._u_hat()
        b = self.b[...]
        target = z @ self.w[...]  # wᵀz = α + c·tanh(α + b)

        def g(alpha):
            return alpha + c * jnp.tanh(alpha + b) - target

        def bisect(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            above = g(mid) > 0
            return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

        width = jnp.abs(c)
        lo, hi = jax.lax.fori_loop(
            0, PLANAR_BISECTION_STEPS, bisect, (target - width, target + width)
        )
        alpha = jax.lax.stop_gradient(0.5 * (lo + hi))
        # One Newton step: polishes the root and gives the exact implicit gradient.
        alpha = alpha - g(alpha) * jnp.exp(-self._log_slope(jnp.tanh(alpha + b), sp))
        h = jnp.tanh(alpha + b)
        x = z - h[..., None] * u_hat
        return x, -self._log_slope(h, sp)


class Radial(Bijection):
    r"""Radial flow ``f(x) = x + β·(x − x₀)/(α + r)``, ``r = ‖x − x₀‖``.

    ``α = softplus(α̃) > 0`` and ``β = −α + δ`` with ``δ = softplus(β̃) > 0`` (so ``β > −α``
    and ``f`` is invertible for every parameter value); ``x₀``, ``α̃``, ``β̃`` are free. With
    ``d`` the dimension and ``ρ = 1 + β/(α + r) = (r + δ)/(α + r)``:

    forward (data → latent):   ``z = x₀ + ρ·(x − x₀)``,
                               ``log|det J| = (d − 1)·log ρ + log(1 + αβ/(α + r)²)``
    inverse (latent → data):   ``x = x₀ + (z − x₀)/ρ``, where ``r`` is the positive root of
                               ``r² + (δ − s)·r − α·s = 0``, ``s = ‖z − x₀‖`` (closed form);
                               ``log|det J⁻¹| = −[(d − 1)·log ρ + log(1 + αβ/(α + r)²)]``

    Everything is computed in terms of ``δ`` rather than ``β``: ``1 + αβ/(α + r)²`` as
    ``(r(2α + r) + αδ)/(α + r)²``, and the root without cancellation, so the layer stays
    accurate in its most contracting regime (``β → −α``, points near ``x₀``). What remains
    there is float rounding of ``z − x₀`` itself: a strongly contracted ``z`` lies within
    ``~ulp(x₀)`` of ``x₀``, which then limits the inverse's relative accuracy.

    Parameters: ``x₀ ~ N(0, I)`` (from ``rngs.params()``), ``α̃ = 0`` and ``β̃ = log(e^{log 2}
    − 1)`` so ``δ = α`` and ``β = 0``: the layer starts as the identity.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        dim = _check_dim("Radial", dim)
        self.event_shape = (dim,)
        self.x0 = nnx.Param(jax.random.normal(rngs.params(), (dim,)))
        self.alpha_raw = nnx.Param(jnp.zeros((), jnp.float32))
        self.beta_raw = nnx.Param(jnp.zeros((), jnp.float32))

    def _alpha_beta(self) -> tuple[Array, Array]:
        """``(α, δ)`` with ``β = δ − α``."""
        return jax.nn.softplus(self.alpha_raw[...]), jax.nn.softplus(self.beta_raw[...])

    def _log_det(self, r: Array, alpha: Array, delta: Array) -> Array:
        d = self.event_shape[0]
        tiny = jnp.finfo(r.dtype).tiny
        log_a_r = jnp.log(alpha + r)
        log_rho = jnp.log(jnp.maximum(r + delta, tiny)) - log_a_r
        log_radial = jnp.log(jnp.maximum(r * (2 * alpha + r) + alpha * delta, tiny)) - 2 * log_a_r
        return (d - 1) * log_rho + log_radial

    def _forward(self, x, context):
        alpha, delta = self._alpha_beta()
        v = x - self.x0[...]
        r = _safe_norm(v)
        rho = (r + delta) / (alpha + r)
        return self.x0[...] + rho[..., None] * v, self._log_det(r, alpha, delta)

    def _inverse(self, z, context):
        alpha, delta = self._alpha_beta()
        y = z - self.x0[...]
        s = _safe_norm(y)
        q = delta - s
        tiny = jnp.finfo(q.dtype).tiny
        root = jnp.sqrt(jnp.square(q) + 4.0 * alpha * s)
        # r = (−q + root)/2, rewritten as 2αs/(q + root) when q ≥ 0 to avoid cancellation.
        stable_den = jnp.where(q < 0, 1.0, jnp.maximum(q + root, tiny))
        r = jnp.where(q < 0, 0.5 * (root - q), 2.0 * alpha * s / stable_den)
        inv_rho = (alpha + r) / jnp.maximum(r + delta, tiny)
        return self.x0[...] + inv_rho[..., None] * y, -self._log_det(r, alpha, delta)
