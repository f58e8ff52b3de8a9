"""Convolutions as patches times a matrix, for XLA's CPU backend inside loops.

XLA:CPU runs a convolution (and the convolutions of its gradient) 40-60× slower inside a
``while`` loop than in a program of its own (jax-ml/jax#12868), and the training engine runs
its steps in such a loop. :func:`patch_conv` computes a stride-1, undilated NHWC/HWIO
convolution as one matrix product of the input's ``kh·kw`` shifted copies (im2col) with the
kernel: inside the loop it is as fast as outside. It is a drop-in ``conv_general_dilated``
for :class:`flax.nnx.Conv`; on other backends, and for any other convolution, it calls
:func:`jax.lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Flax's dimension numbers for (N, H, W, C) inputs and (kh, kw, in, out) kernels
_NHWC_HWIO = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)


def _padding(padding, kernel: Sequence[int]) -> list[tuple[int, int]] | None:
    """Explicit (low, high) padding per spatial axis, or ``None`` for a mode we leave to lax."""
    if padding == "VALID":
        return [(0, 0) for _ in kernel]
    if padding == "SAME":  # stride 1: k − 1 in all, the extra one at the end
        return [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
    if isinstance(padding, str):
        return None
    return [(int(lo), int(hi)) for lo, hi in padding]


def _ones(values) -> bool:
    return values is None or all(int(v) == 1 for v in values)


def _is_patchable(lhs, rhs, strides, pads, lhs_dilation, rhs_dilation, numbers, groups, kw):
    return (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and rhs.ndim == 4
        and pads is not None
        and _ones(strides)
        and _ones(lhs_dilation)
        and _ones(rhs_dilation)
        and numbers == _NHWC_HWIO
        and groups == 1
        and kw.get("preferred_element_type") is None
        and kw.get("out_sharding") is None
    )


def patch_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
) -> jax.Array:
    """``lax.conv_general_dilated``, as patches @ kernel where that is the same convolution.

    ``y[n, i, j, o] = Σ_{a, b, c} x_pad[n, i + a, j + b, c] · w[a, b, c, o]``: the ``kh·kw``
    shifted windows of the padded input are concatenated along the channels, in the kernel's
    (a, b, c) order, and multiplied by the kernel reshaped to ``(kh·kw·in, out)``.
    """
    pads = _padding(padding, rhs.shape[:2]) if rhs.ndim == 4 else None
    if not _is_patchable(
        lhs, rhs, window_strides, pads, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, kwargs,
    ):  # fmt: skip
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, precision=precision, **kwargs,
        )  # fmt: skip
    kh, kw = rhs.shape[:2]
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    windows = [x[:, a : a + h, b : b + w, :] for a in range(kh) for b in range(kw)]
    patches = jnp.concatenate(windows, axis=-1) if len(windows) > 1 else windows[0]
    return jnp.dot(patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision)
