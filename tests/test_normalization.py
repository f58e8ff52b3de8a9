"""ActNorm (data-dependent initialisation) and BatchNorm (training vs evaluation mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import jacobian_log_det, perturb

from nflax.bijections import ActNorm, BatchNorm, Chain, DataInit, Stack


def _data(n=256, dim=3, seed=0):
    scale = jnp.array([0.5, 2.0, 4.0, 1.0, 3.0])[:dim]
    return jnp.array([1.0, -3.0, 10.0, 0.0, 2.0])[:dim] + scale * jax.random.normal(
        jax.random.key(seed), (n, dim)
    )


# -- ActNorm ---------------------------------------------------------------------------------


def test_actnorm_init_normalises_the_first_batch_and_only_once():
    layer = ActNorm(3)
    assert layer.needs_data_init
    x = _data()
    z, ld = layer.forward(x)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
    assert bool(layer.initialized[...]) and not layer.needs_data_init
    np.testing.assert_allclose(ld, -jnp.sum(jnp.log(x.std(0))), rtol=1e-5)
    # a second call with other data keeps the first statistics
    state = nnx.state(layer, DataInit)
    z2, _ = layer.forward(3.0 * x + 5.0)
    np.testing.assert_allclose(z2, (3.0 * x + 5.0 - x.mean(0)) / x.std(0), rtol=1e-4, atol=1e-4)
    for a, b in zip(
        jax.tree.leaves(state), jax.tree.leaves(nnx.state(layer, DataInit)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # round trip and log-det after initialisation
    x2, ld_inv = layer.inverse(z)
    np.testing.assert_allclose(x2, x, atol=1e-4)
    np.testing.assert_allclose(ld_inv, -ld, atol=1e-5)


def test_actnorm_init_accounts_for_nonzero_parameters():
    layer = ActNorm(2)
    perturb(layer, jax.random.key(0), scale=1.0)
    z, _ = layer.forward(_data(dim=2))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)


def test_actnorm_inverse_before_init_is_identity_and_does_not_init():
    layer = ActNorm(2)
    z = _data(8, 2)
    x, ld = layer.inverse(z)
    np.testing.assert_allclose(x, z)
    np.testing.assert_allclose(ld, 0.0)
    assert layer.needs_data_init


def test_actnorm_init_under_jit_via_split_merge():
    x = _data()
    eager = ActNorm(3)
    z_eager, _ = eager.forward(x)

    layer = ActNorm(3)
    graphdef, state = nnx.split(layer)

    @jax.jit
    def step(state, x):
        module = nnx.merge(graphdef, state)
        z, ld = module.forward(x)
        return z, ld, nnx.state(module)

    z, _, new_state = step(state, x)
    np.testing.assert_allclose(z, z_eager, atol=1e-5)
    assert not bool(state["initialized"][...])  # the input state is untouched
    nnx.update(layer, new_state)
    assert bool(layer.initialized[...])
    np.testing.assert_allclose(layer.init_loc[...], eager.init_loc[...], atol=1e-5)
    np.testing.assert_allclose(layer.init_log_scale[...], eager.init_log_scale[...], atol=1e-5)
    # the initialised state, traced again, is not re-initialised by other data
    z_again, _, _ = step(new_state, 2.0 * x)
    np.testing.assert_allclose(z_again, eager.forward(2.0 * x)[0], atol=1e-4)


def test_actnorm_under_nnx_jit_and_in_a_stack():
    x = _data()
    layer = ActNorm(3)
    nnx.jit(lambda m, x: m.forward(x))(layer, x)
    assert bool(layer.initialized[...])
    np.testing.assert_allclose(layer.forward(x)[0].std(0), 1.0, atol=1e-4)

    stack = Stack([ActNorm(3) for _ in range(2)])
    assert stack.layer.needs_data_init  # stacked flags, shape (2,)
    z, _ = stack.forward(x)
    assert not stack.layer.needs_data_init
    assert np.all(np.asarray(stack.layer.initialized[...]))
    np.testing.assert_allclose(stack.forward(x)[0], z, atol=1e-5)
    np.testing.assert_allclose(stack.inverse(z)[0], x, atol=1e-4)
    # under nnx.jit the stacked layers' init is written back too (the flag is traced there),
    # so a later inverse, eager or not, undoes it
    traced = Stack([ActNorm(3) for _ in range(2)])
    z_traced, _ = nnx.jit(lambda m, x: m.forward(x))(traced, x)
    assert np.all(np.asarray(traced.layer.initialized[...]))
    np.testing.assert_allclose(z_traced, z, atol=1e-5)
    np.testing.assert_allclose(traced.inverse(z_traced)[0], x, atol=1e-4)
    # held outside a plain jax.jit, a fresh Stack says what to do (not a Flax trace error)
    fresh = Stack([ActNorm(3) for _ in range(2)])
    with pytest.raises(ValueError, match=r"Stack: .*eagerly"):
        jax.jit(lambda v: fresh.forward(v))(x)


def test_actnorm_state_travels_with_the_model():
    x = _data()
    trained = ActNorm(3)
    trained.forward(x)
    fresh = ActNorm(3)
    nnx.update(fresh, nnx.state(trained))  # what a checkpoint restore does
    assert not fresh.needs_data_init
    np.testing.assert_allclose(fresh.forward(5.0 * x)[0], trained.forward(5.0 * x)[0])


def test_actnorm_traced_input_on_a_fresh_outside_layer_is_a_clear_error():
    layer = ActNorm(2)
    with pytest.raises(ValueError, match=r"ActNorm\.forward: .*eagerly"):
        jax.jit(lambda v: layer.forward(v))(_data(8, 2))


def test_actnorm_image_event_is_per_channel():
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(1), (16, 4, 4, 2))
    layer = ActNorm((4, 4, 2))
    z, ld = layer.forward(x)
    assert layer.loc[...].shape == (2,) and ld.shape == (16,)
    np.testing.assert_allclose(z.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std((0, 1, 2)), 1.0, atol=1e-4)
    # log-det: every one of the 16 positions contributes each channel's log-scale
    np.testing.assert_allclose(ld, -16 * jnp.sum(jnp.log(x.std((0, 1, 2)))), rtol=1e-4)
    np.testing.assert_allclose(layer.inverse(z)[0], x, atol=1e-4)


def test_actnorm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ActNorm: eps"):
        ActNorm(2, eps=0.0)
    with pytest.raises(ValueError, match="ActNorm: event_shape"):
        ActNorm(0)


# -- BatchNorm -------------------------------------------------------------------------------


def test_batchnorm_training_mode_uses_batch_statistics_and_updates_running_averages():
    x = _data()
    layer = BatchNorm(3, momentum=0.75)
    assert not layer.use_running_average  # NNX's default: training mode
    z, ld = layer.forward(x)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(ld, -0.5 * jnp.sum(jnp.log(x.var(0) + 1e-5)), rtol=1e-5)
    np.testing.assert_allclose(layer.running_mean[...], 0.25 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(layer.running_var[...], 0.75 + 0.25 * x.var(0), rtol=1e-5)
    # the statistics are the batch's: a shifted batch gives the same output
    np.testing.assert_allclose(layer.forward(x + 7.0)[0], z, atol=1e-4)


def test_batchnorm_eval_mode_uses_running_averages_and_is_exact():
    x = _data()
    layer = BatchNorm(3, momentum=0.0)
    layer.forward(x)  # training step: running averages = this batch's statistics
    layer.eval()
    assert layer.use_running_average
    perturb(layer, jax.random.key(3))
    state = nnx.state(layer, nnx.BatchStat)
    z, ld = layer.forward(x[:5] + 7.0)  # eval: no dependence on the batch, no update
    mean, var = x.mean(0), x.var(0)
    gamma, beta = jnp.exp(layer.log_gamma[...]), layer.beta[...]
    np.testing.assert_allclose(
        z, (x[:5] + 7.0 - mean) / jnp.sqrt(var + 1e-5) * gamma + beta, rtol=1e-5, atol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(state), jax.tree.leaves(nnx.state(layer, nnx.BatchStat)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        ld, jacobian_log_det(lambda v: layer.forward(v)[0], x[:5]), atol=1e-4
    )
    np.testing.assert_allclose(layer.inverse(z)[0], x[:5] + 7.0, atol=1e-4)
    layer.train()
    assert not layer.use_running_average


def test_batchnorm_inverse_uses_running_averages_in_training_mode():
    x = _data()
    layer = BatchNorm(3, momentum=0.5)
    z, _ = layer.forward(x)
    x_back, ld_inv = layer.inverse(z)
    mean, var = layer.running_mean[...], layer.running_var[...]
    np.testing.assert_allclose(x_back, z * jnp.sqrt(var + 1e-5) + mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ld_inv, 0.5 * jnp.sum(jnp.log(var + 1e-5)), rtol=1e-5)


def test_batchnorm_train_eval_toggle_through_a_container_and_jit_state():
    layers = Chain([BatchNorm(3), BatchNorm(3)])
    layers.eval()
    assert all(b.use_running_average for b in layers.layers)
    layers.train()
    assert not any(b.use_running_average for b in layers.layers)

    x = _data()
    graphdef, params, stats = nnx.split(layers, nnx.Param, ...)

    @jax.jit
    def loss_and_stats(params, stats, x):
        module = nnx.merge(graphdef, params, stats)
        z, ld = module.forward(x)
        return jnp.mean(0.5 * jnp.sum(z**2, -1) - ld), nnx.state(module, nnx.BatchStat)

    (loss, new_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(params, stats, x)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    nnx.update(layers, new_stats)
    first = layers.layers[0]
    np.testing.assert_allclose(first.running_mean[...], 0.1 * x.mean(0), rtol=1e-4)


def test_batchnorm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="BatchNorm: momentum"):
        BatchNorm(2, momentum=1.0)
    with pytest.raises(ValueError, match="BatchNorm: eps"):
        BatchNorm(2, eps=-1.0)
