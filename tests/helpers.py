"""Shared test helpers."""

import jax
import jax.numpy as jnp
from flax import nnx


def perturb(module: nnx.Module, key, scale: float = 0.3) -> None:
    """Add noise to every parameter so that no layer sits at its identity initialisation."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [
        v + scale * jax.random.normal(k, v.shape, v.dtype)
        for v, k in zip(leaves, keys, strict=False)
    ]
    nnx.update(module, jax.tree.unflatten(treedef, noisy))


def jacobian_log_det(fn, x, *args):
    """``log|det ∂fn/∂x|`` for each row of a batch of vectors ``x`` (shape (n, d)).

    ``args`` (e.g. a context, shape (n, c)) are batched alongside ``x``.
    """
    jac = jax.vmap(jax.jacobian(fn))(x, *args)
    return jnp.linalg.slogdet(jac)[1]
