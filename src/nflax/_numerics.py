"""Small numerical helpers shared by several bijections."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def clamp(v: Array, low: float, high: float) -> Array:
    """``v`` clamped into ``[low, high]``, with derivative exactly 1 on the closed interval.

    ``jnp.clip`` splits the gradient at a tie (``d clip(v)/dv = 1/2`` at ``v = low`` or
    ``v = high``). In a bijection that clamps an input which may sit exactly on an end (a spline
    input on ``±B`` or on a knot, where ``ξ`` is exactly 0 or 1, also after rounding), autodiff's
    ``dy/dx`` would then be halved while the analytic log-det stays right: the two would disagree
    by exactly ``log 2``, and gradients through samples would be wrong at those points.
    """
    return jnp.where(v < low, low, jnp.where(v > high, high, v))
