"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def perturb(module: nnx.Module, key, scale: float = 0.3) -> None:
    """Add noise to every parameter so that no layer sits at its identity initialisation.

    The noise comes from numpy (seeded from ``key``): drawing it with jax.random would compile
    a random-number kernel for every distinct parameter shape, which dominates test time.
    """
    seed = int(np.asarray(jax.random.key_data(key)).ravel()[-1])
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    noisy = [
        jnp.asarray((np.asarray(v) + scale * rng.standard_normal(v.shape)).astype(v.dtype))
        for v in leaves
    ]
    nnx.update(module, jax.tree.unflatten(treedef, noisy))


def jacobian_log_det(fn, x, *args):
    """``log|det ∂fn/∂x|`` for each row of a batch of vectors ``x`` (shape (n, d)).

    ``args`` (e.g. a context, shape (n, c)) are batched alongside ``x``.
    """
    jac = jax.vmap(jax.jacfwd(fn))(x, *args)  # forward mode: cheap to compile for small d
    return jnp.linalg.slogdet(jac)[1]
