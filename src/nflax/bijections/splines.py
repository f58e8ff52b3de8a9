r"""Monotonic rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows").

Pure functions, no modules: :class:`~nflax.bijections.transformers.SplineTransformer` calls
these with the unnormalised parameters that a coupling or autoregressive layer predicts.

The spline maps ``[-B, B]`` onto itself with ``K`` bins and is the identity outside (linear
tails); the derivative at ``±B`` is fixed to 1, so the map is C¹ across the boundary. Inside
bin ``k``, with knots ``(x_k, y_k)``, bin width ``w_k``, height ``h_k``, slope ``s_k = h_k/w_k``,
knot derivatives ``d_k, d_{k+1}`` and ``ξ = (x − x_k)/w_k ∈ [0, 1]``:

    ``y = y_k + h_k [s_k ξ² + d_k ξ(1−ξ)] / D(ξ)``

    ``dy/dx = s_k² [d_{k+1} ξ² + 2 s_k ξ(1−ξ) + d_k (1−ξ)²] / D(ξ)²``

    ``D(ξ) = s_k + (d_{k+1} + d_k − 2 s_k) ξ(1−ξ)``

and the inverse solves a quadratic in ``ξ`` (the root that lies in ``[0, 1]``).

Parameters per scalar: ``K`` unnormalised widths, ``K`` unnormalised heights and ``K − 1``
unnormalised interior derivatives, ``3K − 1`` in all (:func:`num_spline_params`). All zeros give
equal bins and unit derivatives: the identity map, so a layer with a zero-initialised
conditioner starts as the identity.

Numerical care: inputs are clamped into ``[-B, B]`` *before* the spline math and the result is
selected with ``jnp.where`` afterwards, so the discarded branch is always evaluated at a finite
point and never yields NaN gradients.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from nflax._numerics import clamp

Array = jax.Array

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def num_spline_params(bins: int) -> int:
    """Unnormalised parameters per scalar for a ``bins``-bin spline: ``3·bins − 1``."""
    return 3 * int(bins) - 1


# Softplus offset so that an unnormalised derivative of 0 gives a knot derivative of exactly 1.
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _knots(unnormalised: Array, bound: float, min_size: float) -> tuple[Array, Array]:
    """Knot positions ``(..., K + 1)`` from ``-B`` to ``B`` and bin sizes ``(..., K)``.

    Sizes are ``2B · (m + (1 − K·m) · softmax(u))`` with ``m`` the minimum size; they are
    computed from the softmax directly, not as differences of knots, so that narrow bins keep
    their relative precision.
    """
    k = unnormalised.shape[-1]
    if min_size * k >= 1.0:
        raise ValueError(
            f"rational-quadratic spline: {k} bins do not fit a minimum bin size of {min_size} "
            f"(need bins · min size < 1)"
        )
    e = jnp.exp(unnormalised - jax.lax.stop_gradient(unnormalised.max(axis=-1, keepdims=True)))
    cum = jnp.cumsum(e, axis=-1)
    total = cum[..., -1:]
    free = 1.0 - min_size * k
    steps = min_size * jnp.arange(1, k + 1, dtype=cum.dtype)
    pos = jnp.concatenate([jnp.zeros_like(total), steps + free * (cum / total)], axis=-1)
    # Pin the ends exactly at ±B so that every clamped input lands in a bin.
    knots = (bound * (2.0 * pos - 1.0)).at[..., 0].set(-bound).at[..., -1].set(bound)
    sizes = 2.0 * bound * (min_size + free * (e / total))
    return knots, sizes


def _derivatives(unnormalised: Array) -> Array:
    """Knot derivatives ``(..., K + 1)``: 1 at both boundaries, positive in between."""
    inner = MIN_DERIVATIVE + jax.nn.softplus(unnormalised + _DERIVATIVE_SHIFT)
    one = jnp.ones_like(inner[..., :1])
    return jnp.concatenate([one, inner, one], axis=-1)


def _check(widths: Array, heights: Array, derivatives: Array) -> None:
    k = widths.shape[-1]
    if heights.shape[-1] != k or derivatives.shape[-1] != k - 1:
        raise ValueError(
            "rational-quadratic spline: expected widths (..., K), heights (..., K) and "
            f"derivatives (..., K - 1), received last sizes {widths.shape[-1]}, "
            f"{heights.shape[-1]}, {derivatives.shape[-1]}"
        )


def _into_unit(xi: Array) -> Array:
    """Round-off guard for the relative position ``ξ``: the value is clamped into ``[0, 1]``
    but the derivative is that of the unclamped ``ξ``.

    ``ξ`` can leave ``[0, 1]`` only by rounding (at ``±B`` or on a knot it may come out as
    ``1 + ulp``); a plain clamp there would give autodiff a zero (or, for ``jnp.clip`` at a
    tie, halved) ``dy/dx`` while the analytic log-det is right.
    """
    return xi + jax.lax.stop_gradient(jnp.clip(xi, 0.0, 1.0) - xi)


def _gather(a: Array, idx: Array) -> Array:
    return jnp.take_along_axis(a, idx[..., None], axis=-1)[..., 0]


def _bin(
    v: Array, knots: Array, widths: Array, heights: Array, derivs: Array, knots_other: Array
) -> tuple[Array, ...]:
    """The bin of each (already clamped) ``v`` and that bin's quantities."""
    idx = jnp.sum(v[..., None] >= knots[..., 1:-1], axis=-1)
    return (
        _gather(knots, idx),
        _gather(knots_other, idx),
        _gather(widths, idx),
        _gather(heights, idx),
        _gather(derivs, idx),
        _gather(derivs[..., 1:], idx),
    )


def _log_slope(xi: Array, s: Array, d0: Array, d1: Array) -> Array:
    """``log dy/dx`` inside a bin, at relative position ``xi``."""
    t = xi * (1.0 - xi)
    num = d1 * xi**2 + 2.0 * s * t + d0 * (1.0 - xi) ** 2
    den = s + (d1 + d0 - 2.0 * s) * t
    return 2.0 * jnp.log(s) + jnp.log(num) - 2.0 * jnp.log(den)


def _validated(name, v, widths, heights, derivatives, bound) -> tuple[Array, ...]:
    """Check shapes and bound, broadcast everything to a common batch shape."""
    _check(widths, heights, derivatives)
    if not float(bound) > 0:
        raise ValueError(f"{name}: bound must be > 0, received {bound}")
    v, widths, heights, derivatives = map(jnp.asarray, (v, widths, heights, derivatives))
    batch = jnp.broadcast_shapes(
        v.shape, widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1]
    )
    return (
        jnp.broadcast_to(v, batch),
        jnp.broadcast_to(widths, (*batch, widths.shape[-1])),
        jnp.broadcast_to(heights, (*batch, heights.shape[-1])),
        jnp.broadcast_to(derivatives, (*batch, derivatives.shape[-1])),
    )


def _knots_and_derivatives(widths, heights, derivatives, bound):
    kx, w = _knots(widths, bound, MIN_BIN_WIDTH)
    ky, h = _knots(heights, bound, MIN_BIN_HEIGHT)
    return kx, w, ky, h, _derivatives(derivatives)


# The math runs as one compiled program even when called eagerly (inside a caller's jit it is
# simply inlined): an eager spline would otherwise dispatch, and compile, ~100 small ops.
@partial(jax.jit, static_argnames="bound")
def _forward(x, widths, heights, derivatives, bound):
    kx, w, ky, h, d = _knots_and_derivatives(widths, heights, derivatives, bound)
    inside = (x >= -bound) & (x <= bound)
    xc = clamp(x, -bound, bound)  # clamp first: the tail branch never sees NaN gradients
    x0, y0, wk, hk, d0, d1 = _bin(xc, kx, w, h, d, ky)
    s = hk / wk
    xi = _into_unit((xc - x0) / wk)
    t = xi * (1.0 - xi)
    y = y0 + hk * (s * xi**2 + d0 * t) / (s + (d1 + d0 - 2.0 * s) * t)
    log_det = _log_slope(xi, s, d0, d1)
    return jnp.where(inside, y, x), jnp.where(inside, log_det, 0.0)


@partial(jax.jit, static_argnames="bound")
def _inverse(y, widths, heights, derivatives, bound):
    kx, w, ky, h, d = _knots_and_derivatives(widths, heights, derivatives, bound)
    inside = (y >= -bound) & (y <= bound)
    yc = clamp(y, -bound, bound)
    y0, x0, hk, wk, d0, d1 = _bin(yc, ky, h, w, d, kx)
    s = hk / wk
    dy = yc - y0
    delta = d1 + d0 - 2.0 * s
    a = hk * (s - d0) + dy * delta
    b = hk * d0 - dy * delta
    c = -s * dy
    disc = jnp.maximum(b**2 - 4.0 * a * c, 1e-12 * hk**2)
    sqrt_disc = jnp.sqrt(disc)
    # The root in [0, 1], in the form without cancellation: since a + b = h·s > 0 and c ≤ 0,
    # either b ≥ 0 and the root is 2c / (−b − √disc) (denominator ≤ −√disc < 0), or b < 0, then
    # a > 0 and the root is (−b + √disc) / 2a. The unused branch gets a safe denominator so that
    # it never produces NaN gradients.
    pos = b >= 0
    den_pos = jnp.where(pos, -b - sqrt_disc, -1.0)
    den_neg = jnp.where(pos, 1.0, 2.0 * a)
    xi = jnp.where(pos, 2.0 * c / den_pos, (sqrt_disc - b) / den_neg)
    xi = _into_unit(xi)
    x = x0 + xi * wk
    log_det = -_log_slope(xi, s, d0, d1)
    return jnp.where(inside, x, y), jnp.where(inside, log_det, 0.0)


def rq_spline_forward(
    x: Array, widths: Array, heights: Array, derivatives: Array, *, bound: float = 3.0
) -> tuple[Array, Array]:
    """Apply the spline elementwise: ``(y, log dy/dx)``, both of the broadcast shape.

    ``widths``/``heights`` ``(..., K)`` and ``derivatives`` ``(..., K − 1)`` are unnormalised
    (any real numbers); their leading axes broadcast against ``x``'s shape. Outside
    ``[-B, B]``: ``y = x``, ``log dy/dx = 0``.

    >>> import jax.numpy as jnp
    >>> y, ld = rq_spline_forward(jnp.array([-5.0, 0.5]), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
    ...                           jnp.zeros((2, 3)))
    >>> y.round(5).tolist(), ld.round(5).tolist()  # zero parameters: the identity
    ([-5.0, 0.5], [0.0, -0.0])
    """
    args = _validated("rq_spline_forward", x, widths, heights, derivatives, bound)
    return _forward(*args, bound=float(bound))


def rq_spline_inverse(
    y: Array, widths: Array, heights: Array, derivatives: Array, *, bound: float = 3.0
) -> tuple[Array, Array]:
    """Invert the spline elementwise: ``(x, log dx/dy)`` with ``log dx/dy = −log dy/dx``.

    Same parameters as :func:`rq_spline_forward`; exact (closed-form root of a quadratic).
    """
    args = _validated("rq_spline_inverse", y, widths, heights, derivatives, bound)
    return _inverse(*args, bound=float(bound))


def rq_spline_log_derivative(
    x: Array, widths: Array, heights: Array, derivatives: Array, *, bound: float = 3.0
) -> Array:
    """``log dy/dx`` of the spline at ``x`` (0 in the identity tails)."""
    return rq_spline_forward(x, widths, heights, derivatives, bound=bound)[1]
