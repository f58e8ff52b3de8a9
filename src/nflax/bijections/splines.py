r"""Monotonic rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows").

Pure functions, no modules: the layers in :mod:`~nflax.bijections.coupling` and
:mod:`~nflax.bijections.autoregressive` predict the unnormalised parameters and call these.

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

import jax
import jax.numpy as jnp

Array = jax.Array

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


def num_spline_params(bins: int) -> int:
    """Unnormalised parameters per scalar for a ``bins``-bin spline: ``3·bins − 1``."""
    return 3 * int(bins) - 1


def split_spline_params(params: Array, bins: int) -> tuple[Array, Array, Array]:
    """Split ``(..., 3K − 1)`` into widths ``(..., K)``, heights ``(..., K)``, derivatives
    ``(..., K − 1)`` (in that order)."""
    k = int(bins)
    if params.shape[-1] != num_spline_params(k):
        raise ValueError(
            f"split_spline_params: expected {num_spline_params(k)} parameters per scalar for "
            f"{k} bins, received {params.shape[-1]}"
        )
    return params[..., :k], params[..., k : 2 * k], params[..., 2 * k :]


# Softplus offset so that an unnormalised derivative of 0 gives a knot derivative of exactly 1.
_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _knots(unnormalised: Array, bound: float, min_size: float) -> tuple[Array, Array]:
    """Knot positions ``(..., K + 1)`` from ``-B`` to ``B`` and bin sizes ``(..., K)``."""
    k = unnormalised.shape[-1]
    if min_size * k >= 1.0:
        raise ValueError(
            f"rational-quadratic spline: {k} bins do not fit a minimum bin size of {min_size} "
            f"(need bins · min size < 1)"
        )
    frac = min_size + (1.0 - min_size * k) * jax.nn.softmax(unnormalised, axis=-1)
    cum = jnp.cumsum(frac, axis=-1)
    zero = jnp.zeros_like(cum[..., :1])
    knots = 2.0 * bound * jnp.concatenate([zero, cum], axis=-1) - bound
    # Pin the ends exactly at ±B so that every clamped input lands in a bin.
    knots = knots.at[..., 0].set(-bound).at[..., -1].set(bound)
    return knots, knots[..., 1:] - knots[..., :-1]


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


def _setup(v, widths, heights, derivatives, bound):
    _check(widths, heights, derivatives)
    if not float(bound) > 0:
        raise ValueError(f"rational-quadratic spline: bound must be > 0, received {bound}")
    batch = jnp.broadcast_shapes(
        jnp.shape(v), widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1]
    )
    v = jnp.broadcast_to(v, batch)
    widths = jnp.broadcast_to(widths, (*batch, widths.shape[-1]))
    heights = jnp.broadcast_to(heights, (*batch, heights.shape[-1]))
    derivatives = jnp.broadcast_to(derivatives, (*batch, derivatives.shape[-1]))
    kx, w = _knots(widths, bound, MIN_BIN_WIDTH)
    ky, h = _knots(heights, bound, MIN_BIN_HEIGHT)
    return v, kx, w, ky, h, _derivatives(derivatives)


def rq_spline_forward(
    x: Array, widths: Array, heights: Array, derivatives: Array, *, bound: float = 3.0
) -> tuple[Array, Array]:
    """Apply the spline elementwise: ``(y, log dy/dx)``, both of ``x``'s shape.

    ``widths``/``heights`` ``(..., K)`` and ``derivatives`` ``(..., K − 1)`` are unnormalised
    (any real numbers); their leading axes broadcast against ``x``'s shape. Outside
    ``[-B, B]``: ``y = x``, ``log dy/dx = 0``.

    >>> import jax.numpy as jnp
    >>> y, ld = rq_spline_forward(jnp.array([-5.0, 0.5]), jnp.zeros((2, 4)), jnp.zeros((2, 4)),
    ...                           jnp.zeros((2, 3)))
    >>> y.round(5).tolist(), ld.round(5).tolist()  # zero parameters: the identity
    ([-5.0, 0.5], [0.0, -0.0])
    """
    x, kx, w, ky, h, d = _setup(x, widths, heights, derivatives, bound)
    inside = (x >= -bound) & (x <= bound)
    xc = jnp.clip(x, -bound, bound)
    x0, y0, wk, hk, d0, d1 = _bin(xc, kx, w, h, d, ky)
    s = hk / wk
    xi = jnp.clip((xc - x0) / wk, 0.0, 1.0)
    t = xi * (1.0 - xi)
    y = y0 + hk * (s * xi**2 + d0 * t) / (s + (d1 + d0 - 2.0 * s) * t)
    log_det = _log_slope(xi, s, d0, d1)
    return jnp.where(inside, y, x), jnp.where(inside, log_det, 0.0)


def rq_spline_inverse(
    y: Array, widths: Array, heights: Array, derivatives: Array, *, bound: float = 3.0
) -> tuple[Array, Array]:
    """Invert the spline elementwise: ``(x, log dx/dy)`` with ``log dx/dy = −log dy/dx``.

    Same parameters as :func:`rq_spline_forward`; exact (closed-form root of a quadratic).
    """
    y, kx, w, ky, h, d = _setup(y, widths, heights, derivatives, bound)
    inside = (y >= -bound) & (y <= bound)
    yc = jnp.clip(y, -bound, bound)
    y0, x0, hk, wk, d0, d1 = _bin(yc, ky, h, w, d, kx)
    s = hk / wk
    dy = yc - y0
    delta = d1 + d0 - 2.0 * s
    a = hk * (s - d0) + dy * delta
    b = hk * d0 - dy * delta
    c = -s * dy
    disc = jnp.maximum(b**2 - 4.0 * a * c, 1e-12 * hk**2)
    # The numerically stable root 2c / (−b − √disc). Its denominator is < 0: a + b = h·s > 0, so
    # either b > 0, or b ≤ 0 < a and then c ≤ 0 gives √disc ≥ |b| (with equality only at c = 0,
    # where b = h·d_k > 0).
    xi = jnp.clip(2.0 * c / (-b - jnp.sqrt(disc)), 0.0, 1.0)
    x = x0 + xi * wk
    log_det = -_log_slope(xi, s, d0, d1)
    return jnp.where(inside, x, y), jnp.where(inside, log_det, 0.0)


def rq_spline_log_derivative(
    x: Array, widths: Array, heights: Array, derivatives: Array, *, bound: float = 3.0
) -> Array:
    """``log dy/dx`` of the spline at ``x`` (0 in the identity tails)."""
    return rq_spline_forward(x, widths, heights, derivatives, bound=bound)[1]
