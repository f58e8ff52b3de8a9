"""Coupling mask helpers and the additive coupling (the contract itself: test_bijections)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturb

from nflax.bijections import AdditiveCoupling, alternating_mask, half_mask, random_mask
from nflax.nets import MLP


@pytest.mark.parametrize("dim", [1, 2, 5, 6])
def test_masks_are_binary_and_complementary(dim):
    for mask_fn in (alternating_mask, half_mask):
        m0, m1 = mask_fn(dim, 0), mask_fn(dim, 1)
        assert m0.shape == (dim,) and set(np.unique(m0)) <= {0.0, 1.0}
        np.testing.assert_array_equal(m0 + m1, 1.0)
    np.testing.assert_array_equal(half_mask(dim), np.arange(dim) < dim // 2)
    r = random_mask(dim, jax.random.key(dim))
    assert r.sum() == dim // 2 and set(np.unique(r)) <= {0.0, 1.0}
    np.testing.assert_array_equal(r, random_mask(dim, jax.random.key(dim)))  # deterministic


def test_random_masks_differ_between_keys():
    masks = {tuple(random_mask(8, jax.random.key(i))) for i in range(6)}
    assert len(masks) > 1


def test_additive_coupling_preserves_volume_and_passes_the_mask_through():
    mask = random_mask(4, jax.random.key(0))
    layer = AdditiveCoupling(mask, MLP(4, 4, hidden=(8,), rngs=nnx.Rngs(0)))
    perturb(layer, jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (5, 4))
    z, ld = layer.forward(x)
    np.testing.assert_array_equal(ld, 0.0)
    np.testing.assert_array_equal(z[:, mask == 1], x[:, mask == 1])
    assert not np.allclose(z[:, mask == 0], x[:, mask == 0])
    np.testing.assert_allclose(layer.inverse(z)[0], x, atol=1e-6)


def test_coupling_errors_name_the_layer():
    with pytest.raises(ValueError, match="AdditiveCoupling: mask must be a non-empty array of 0/1"):
        AdditiveCoupling([0.0, 2.0], MLP(2, 2, rngs=nnx.Rngs(0)))
    layer = AdditiveCoupling(half_mask(3), MLP(3, 6, hidden=(4,), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="AdditiveCoupling: conditioner must output dim = 3"):
        layer.forward(jnp.zeros((2, 3)))
