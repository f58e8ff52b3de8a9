"""nflax.testing: check_bijection and check_flow catch broken layers and densities, each
failure named (the registry test, test_bijections.py, shows they pass every layer)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nflax import Flow, StandardNormal
from nflax.bijections import ActNorm, Bijection, Chain, Permute
from nflax.distributions import Distribution
from nflax.testing import (
    TOLERANCES,
    BijectionReport,
    Check,
    CheckError,
    FlowReport,
    check_bijection,
    check_flow,
)

KEY = jax.random.key(0)


class ShiftScale(Bijection):
    """``z = x·exp(s) + b`` (elementwise; ``b = W c`` added with a context), log-det ``Σ s``.

    The faults are arrays (``Buffer``), so a broken layer compiles like a correct one:
    ``offset`` is added to both log-dets' magnitude (forward ``Σ s + offset``, inverse
    ``−(Σ s + offset)``), ``sign`` multiplies ``Σ s``, ``inverse_shift`` is added to the
    inverse's output.
    """

    def __init__(self, dim, *, offset=0.0, sign=1.0, inverse_shift=0.0, context_dim=None):
        self.event_shape, self.context_dim = (dim,), context_dim
        self.s = nnx.Param(jnp.linspace(-0.4, 0.3, dim))
        self.b = nnx.Param(jnp.full((dim,), 0.5))
        if context_dim is not None:
            self.w = nnx.Param(jnp.full((context_dim, dim), 0.7))
        self.offset = nnx.Variable(jnp.asarray(offset, jnp.float32))
        self.sign = nnx.Variable(jnp.asarray(sign, jnp.float32))
        self.inverse_shift = nnx.Variable(jnp.asarray(inverse_shift, jnp.float32))

    def _shift(self, c):
        return self.b[...] if c is None else self.b[...] + c @ self.w[...]

    def _log_det(self, x):
        ld = self.sign[...] * jnp.sum(self.s[...]) + self.offset[...]
        return jnp.broadcast_to(ld, x.shape[:-1])

    def _forward(self, x, c):
        return x * jnp.exp(self.s[...]) + self._shift(c), self._log_det(x)

    def _inverse(self, z, c):
        x = (z - self._shift(c)) * jnp.exp(-self.s[...]) + self.inverse_shift[...]
        return x, -self._log_det(z)


class Unused(ShiftScale):
    """A parameter that reaches no output: it can never get a gradient."""

    def __init__(self, dim):
        super().__init__(dim)
        self.unused = nnx.Param(jnp.ones((dim,)))


class NaiveSquash(Bijection):
    """``z = sigmoid(a·x)``, its log-det written as ``Σ log a + log z + log(1 − z)``: beyond
    ``a·x ≈ 17`` the sigmoid rounds to 1 in float32 and ``log(1 − z) = log 0 = −inf`` (the
    stable form is ``log σ(ax) + log σ(−ax)``)."""

    def __init__(self, dim):
        self.event_shape = (dim,)
        self.a = nnx.Param(jnp.full((dim,), 2.0))

    def _log_det(self, z):
        return jnp.sum(jnp.log(self.a[...]) + jnp.log(z) + jnp.log(1 - z), axis=-1)

    def _forward(self, x, c):
        z = jax.nn.sigmoid(self.a[...] * x)
        return z, self._log_det(z)

    def _inverse(self, z, c):
        return (jnp.log(z) - jnp.log1p(-z)) / self.a[...], -self._log_det(z)


class IgnoresContext(ShiftScale):
    """Declares a context and never uses it."""

    def _shift(self, c):
        return self.b[...]


def _failure(bijection, **kw) -> CheckError:
    with pytest.raises(CheckError) as info:
        check_bijection(bijection, key=KEY, **kw)
    return info.value


def test_a_correct_layer_passes_and_the_report_holds_every_property():
    report = check_bijection(ShiftScale(3), key=KEY)
    assert isinstance(report, BijectionReport) and report.passed and not report.failures
    names = [c.name for c in report.checks]
    assert names == [
        "round_trip",
        "inverse_log_det",
        "log_det",
        "batch_dims",
        "jit",
        "gradients",
        "finite",
        "layers_move",
    ]
    assert all(isinstance(c, Check) and c.passed for c in report.checks)
    assert report["log_det"].error < 1e-5 and report["round_trip"].error < 1e-5
    assert report["log_det"].tolerance == pytest.approx(TOLERANCES["log_det"][0], rel=0.1)
    assert (report.num_inputs, report.num_far_points, report.num_parameters) == (7, 9, 2)
    assert report.layer_movement[0][0] == "ShiftScale" and report.layer_movement[0][1] > 0.4
    text = repr(report)
    assert "ShiftScale passed" in text and all(name in text for name in names)
    with pytest.raises(KeyError, match="context_used"):
        report["context_used"]


@pytest.mark.parametrize(
    "fault, property_",
    [
        (dict(offset=0.5), "log_det"),  # off by a constant (in both directions, consistently)
        (dict(sign=-1.0), "log_det"),  # the wrong sign
        (dict(inverse_shift=0.1), "round_trip"),  # an inverse that is not the inverse
    ],
    ids=["log-det off by a constant", "wrong sign", "not the inverse"],
)
def test_each_fault_is_caught_and_named_with_its_worst_point_and_error(fault, property_):
    error = _failure(ShiftScale(2, **fault))
    assert error.failed == (property_,)
    first = str(error).splitlines()[0]
    assert first.startswith(f"check_bijection: ShiftScale fails {property_}: ")
    # the worst point by index and value, and the error against the tolerance
    assert re.search(r"= [0-9.e+-]+ > [0-9.e+-]+ at input \d, x = \[", first), first
    check = error.report[property_]
    assert not check.passed and check.error > 10 * check.tolerance
    # Σ s = −0.1 with s = (−0.4, 0.3): the wrong sign is off by 0.2
    (fault_name,) = fault
    expected = {"offset": 0.5, "sign": 0.2, "inverse_shift": 0.1}[fault_name]
    assert check.error == pytest.approx(expected, rel=1e-4)


def test_a_log_det_off_in_one_direction_only_fails_both_log_det_checks():
    class OffForward(ShiftScale):
        def _forward(self, x, c):
            z, ld = super()._forward(x, c)
            return z, ld + 0.25

    assert set(_failure(OffForward(2)).failed) == {"log_det", "inverse_log_det"}


def test_a_parameter_without_a_gradient_is_named_unless_declared():
    error = _failure(Unused(2))
    assert error.failed == ("gradients",)
    assert "gradients: parameters without a gradient: 1 (parameter unused)" in str(error)
    assert check_bijection(Unused(2), key=KEY, no_gradient=["unused"]).passed


def test_non_finite_values_far_out_are_caught_and_the_point_named():
    error = _failure(NaiveSquash(2), scale=0.5)
    assert error.failed == ("finite",)
    # the far-out points at 9 and 12 (a·x = 18, 24; at −24 the sigmoid is still > 0), and the
    # parameter whose gradient they make NaN
    assert (
        "finite: points or parameters with a non-finite output or gradient: 3 (far-out point 7, "
        "x = [9. 9.]; far-out point 8, x = [12. 12.]; gradient of parameter a)"
    ) in str(error)
    # the inputs alone are fine: without far-out points the same layer passes
    assert check_bijection(NaiveSquash(2), key=KEY, scale=0.5, far_points=None).passed


def test_a_nan_gradient_from_the_discarded_branch_of_where_is_caught_far_out():
    class ClampedBadly(ShiftScale):
        """``where`` selects 0 beyond |x| = 10, but the gradient of the discarded ``sqrt``
        branch is NaN there (flowjax#239): clamp before the math, then select."""

        def _forward(self, x, c):
            z, ld = super()._forward(x, c)
            u = 10.0 - jnp.abs(x)
            bump = jnp.where(u > 0, jnp.sqrt(u) - jnp.sqrt(u), 0.0)
            return z + bump, ld

    error = _failure(ClampedBadly(2))
    assert error.failed == ("finite",)
    assert "far-out point 0, x = [-12. -12.]" in str(error)


def test_a_log_det_of_the_wrong_shape_ends_the_check_with_the_shapes_named():
    class NotSummed(ShiftScale):
        def _forward(self, x, c):
            return super()._forward(x, c)[0], jnp.broadcast_to(self.s[...], x.shape)

    error = _failure(NotSummed(2))
    assert error.failed == ("shapes",) and len(error.report.checks) == 1
    assert "forward's log-det on (1, N, …) inputs has shape (1, 16, 2), expected (1, 16)" in str(
        error
    )


def test_a_conditional_layer_checks_the_context_and_one_that_ignores_it_fails():
    report = check_bijection(ShiftScale(2, context_dim=3), key=KEY)
    assert report["context_used"].passed and report["context_broadcast"].passed
    error = _failure(IgnoresContext(2, context_dim=3))
    assert error.failed == ("gradients", "context_used")  # w is never used either
    assert "outputs move by up to 0 with another context" in str(error)


def test_identity_layers_and_composites():
    chain = Chain([ShiftScale(1), Permute(1, permutation=[0]), ShiftScale(1)])
    error = _failure(chain)
    assert error.failed == ("layers_move",)
    assert "layer 1 (Permute) moves its input by at most 0" in str(error)
    report = check_bijection(chain, key=KEY, identity_layers=["Permute"])
    assert report["trajectory"].passed
    assert [name for name, _ in report.layer_movement] == ["ShiftScale", "Permute", "ShiftScale"]
    assert report.layer_movement[1][1] == 0.0


def test_options_inputs_event_shape_tolerances_and_copies():
    x = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    report = check_bijection(ShiftScale(2), key=KEY, event_shape=2, inputs=x, far_points=3.0)
    assert (report.num_inputs, report.num_far_points) == (3, 9)
    loose = check_bijection(ShiftScale(2, offset=0.5), key=KEY, tolerances={"log_det": 0.6})
    assert loose["log_det"].tolerance == pytest.approx(0.6, rel=1e-4)
    # data-dependent initialisation and perturb work on a copy: the layer is not changed
    layer = ActNorm(2)
    report = check_bijection(layer, key=KEY, perturb=0.1)
    assert report.passed and layer.needs_data_init
    np.testing.assert_array_equal(layer.log_scale[...], 0.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_bijection(ShiftScale(2), key=KEY, event_shape=3), r"event_shape \(3,\)"),
        (lambda: check_bijection(ShiftScale(2), key=KEY, tolerances={"mass2": 1}), "no tolerance"),
        (lambda: check_bijection(ShiftScale(2), key=KEY, inputs=jnp.zeros((4, 3))), r"\(n, 2\)"),
        (lambda: check_bijection(ShiftScale(2), key=KEY, context=jnp.zeros(3)), "unconditional"),
        (lambda: check_bijection("f", key=KEY), "expected a Bijection, received str"),
        (lambda: check_flow(ShiftScale(2), key=KEY), "expected a Flow, received ShiftScale"),
    ],
    ids=["event shape", "tolerance", "inputs", "context", "not a bijection", "not a flow"],
)
def test_bad_arguments_are_value_errors_that_say_what_was_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


class OffsetBase(Distribution):
    """A standard normal whose log-density is off by ``offset``: ∫p = e^offset."""

    def __init__(self, dim, offset):
        self.event_shape, self.normal, self.offset = (dim,), StandardNormal(dim), offset

    def log_prob(self, x, context=None):
        return self.normal.log_prob(x) + self.offset

    def sample(self, key, shape=(), context=None):
        return self.normal.sample(key, shape)


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_check_flow_passes_a_correct_flow_and_catches_a_density_off_by_a_constant(dim):
    report = check_flow(Flow(StandardNormal(dim), ShiftScale(dim)), key=KEY)
    assert isinstance(report, FlowReport) and report.passed
    ((mass, uncertainty),) = report.estimates
    assert abs(mass - 1) < 0.01 and report["mass"].passed
    assert ("trapezoid" if dim <= 2 else "importance sampling") in report.method
    # a log-det off by 0.2, past a loose log-det tolerance: the mass check finds ∫p = e^0.2
    broken = Flow(StandardNormal(dim), ShiftScale(dim, offset=0.2))
    loose = {"log_det": 0.5}
    with pytest.raises(CheckError) as info:
        check_flow(broken, key=KEY, tolerances=loose)
    assert info.value.failed == ("mass",)
    assert str(info.value).startswith("check_flow: ShiftScale fails mass: |∫ p(x) dx − 1| = ")
    ((mass, uncertainty),) = info.value.report.estimates
    assert mass == pytest.approx(math.exp(0.2), abs=0.01 + uncertainty)


def test_check_flow_catches_a_base_off_by_a_constant_and_checks_each_context_row():
    with pytest.raises(CheckError, match=r"fails mass: .* at ∫p = 0\.9") as info:
        check_flow(Flow(OffsetBase(2, -0.1), ShiftScale(2)), key=KEY)
    assert info.value.report.bijection.passed  # the bijection is fine: the base is not
    flow = Flow(StandardNormal(2), ShiftScale(2, context_dim=3))
    rows = jnp.arange(9.0).reshape(3, 3) / 9
    report = check_flow(flow, key=KEY, context=rows, num_samples=2000)
    assert len(report.estimates) == 3 and report["context_used"] is not None
