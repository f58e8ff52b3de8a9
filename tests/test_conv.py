"""patch_conv: the same convolution as lax.conv_general_dilated, gradients checked against
finite differences, no convolution op left in the compiled program (so no slow path inside
the training engine's loop), and lax itself for what it does not cover."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from nflax._conv import patch_conv

NHWC_HWIO = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _pair(kernel, padding, **kw):
    def make(**extra):
        return nnx.Conv(3, 5, kernel_size=kernel, padding=padding, rngs=nnx.Rngs(0), **kw, **extra)

    return make(), make(conv_general_dilated=patch_conv)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("padding", ["SAME", "VALID", [(2, 0), (1, 1)]])
def test_values_match_lax_and_gradients_match_finite_differences(kernel, padding):
    ref, ours = _pair(kernel, padding)
    x = jax.random.normal(jax.random.key(1), (2, 6, 5, 3))
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    w = ours.kernel[...]
    pads = padding if isinstance(padding, str) else tuple(map(tuple, padding))
    conv = lambda x, w: patch_conv(x, w, (1, 1), pads, None, None, NHWC_HWIO)  # noqa: E731
    # (not against lax's own gradient: on XLA:CPU it returns garbage (1e31) for the input
    # gradient with the asymmetric padding (2, 0) and a 2×2 kernel)
    check_grads(conv, (x, w), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kw", [dict(strides=(2, 2)), dict(kernel_dilation=(2, 2))])
def test_other_convolutions_are_lax_s(kw):
    ref, ours = _pair((3, 3), "SAME", **kw)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    np.testing.assert_array_equal(ours(x), ref(x))


def test_a_training_step_in_a_loop_has_no_convolution_op():
    # jax-ml/jax#12868: XLA:CPU runs a convolution and its gradient 40-60x slower inside a
    # loop than alone; patch_conv leaves none in the program (a matrix product instead)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16))
    w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1

    def step(w, _):
        loss = lambda w: jnp.sum(jnp.tanh(patch_conv(x, w, (1, 1), "SAME", None, None, NHWC_HWIO)))  # noqa: E501, E731
        return w - 1e-3 * jax.grad(loss)(w), None

    text = jax.jit(lambda w: jax.lax.scan(step, w, None, length=3)[0]).lower(w).as_text()
    assert "while" in text and "convolution" not in text
