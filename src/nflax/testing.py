"""Check a bijection against the contract, and a flow's density against ∫p = 1: for nflax's
own layers (its registry test runs these on every layer) and for yours.

:func:`check_bijection` draws a few inputs and a ramp of far-out points and checks, in one
compiled program:

| property | what is measured | default tolerance (atol, rtol) |
| --- | --- | --- |
| ``round_trip`` | ``|inverse(forward(x)) − x|`` | ``(1e-5, 1e-5)`` |
| ``inverse_log_det`` | ``|log-det of the inverse + log-det of the forward|`` | ``(1e-4, 1e-5)`` |
| ``log_det`` | ``|log-det − log|det J||``, ``J`` by ``jax.jacfwd`` (flattened) | ``(1e-4, 1e-6)`` |
| ``batch_dims`` | ``|forward on (1, n, …) − forward on one event|`` | ``(1e-5, 1e-6)`` |
| ``jit`` | ``|jit(forward) − forward|`` (eager) | ``(1e-5, 2e-6)`` |
| ``gradients`` | parameters (each layer of a ``Stack``) whose gradient is zero | none may be |
| ``finite`` | NaN/inf outputs or gradients, at the inputs and far out | none may be |
| ``trajectory`` | ``|trajectory(x)[-1] − forward(x)|`` (composite layers) | ``(1e-5, 1e-5)`` |
| ``layers_move`` | elementary layers that move no input by more than ``1e-3`` | none may |
| ``context_broadcast`` | ``|forward(x, c[:1]) − forward(x, c)|`` on row 0 | ``(1e-5, 1e-6)`` |
| ``context_used`` | whether another context changes any output by more than ``1e-6`` | it must |

The inverse's log-det needs no Jacobian of its own: with an exact round trip,
``J_inverse(z) = J_forward(x)⁻¹``, so ``log_det`` and ``inverse_log_det`` together cover it.
The gradients are those of the standard-normal NLL ``Σ ½‖z‖² − log|det J|`` over all points.
The last two run for conditional bijections only. :func:`check_flow` adds ``mass``, the
density's integral (``|∫p − 1|``, ``atol`` 0.01 plus the estimate's own uncertainty).

Either function returns a report (:class:`BijectionReport`, :class:`FlowReport`) when every
property holds and raises :class:`CheckError` (an ``AssertionError``) naming each failed
property, its worst point and its error against the tolerance when one does not.

>>> import jax
>>> from nflax.bijections import Affine
>>> report = check_bijection(Affine(2, loc=1.0, log_scale=0.5), key=jax.random.key(0))
>>> report.passed, report["log_det"].error < 1e-5
(True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from nflax import _check_inputs as setup
from nflax import _checks, _density
from nflax._contract import contract_arrays
from nflax.bijections.base import Bijection, Stack
from nflax.distributions import Flow

Array = jax.Array

#: Default tolerances: ``(atol, rtol)`` of each compared property (allowed ``atol + rtol·|ref|``)
#: and the thresholds of ``layers_move``, ``context_used`` and ``mass`` (``rtol`` unused).
TOLERANCES: dict[str, tuple[float, float]] = {
    "round_trip": (1e-5, 1e-5),
    "inverse_log_det": (1e-4, 1e-5),
    "log_det": (1e-4, 1e-6),
    "batch_dims": (1e-5, 1e-6),
    "jit": (1e-5, 2e-6),
    "trajectory": (1e-5, 1e-5),
    "layers_move": (1e-3, 0.0),
    "context_broadcast": (1e-5, 1e-6),
    "context_used": (1e-6, 0.0),
    "mass": (0.01, 0.0),
}

MAX_UNCERTAINTY = 0.1  # the most an estimate's uncertainty may add to the mass tolerance

_MEASURED = {
    "round_trip": "|inverse(forward(x)) − x|",
    "inverse_log_det": "|log-det of the inverse + log-det of the forward|",
    "log_det": "|log-det − log|det jax.jacobian||",
    "batch_dims": "|forward on (1, n, …) − forward on one event|",
    "jit": "|jit(forward) − eager forward|",
    "gradients": "parameters without a gradient",
    "finite": "points or parameters with a non-finite output or gradient",
    "trajectory": "|trajectory(x)[-1] − forward(x)|",
    "layers_move": "layers that leave every input unchanged",
    "context_broadcast": "|forward(x, c[:1]) − forward(x, c)| on row 0",
    "context_used": "the context changes no output",
    "mass": "|∫ p(x) dx − 1|",
}


@dataclasses.dataclass(frozen=True)
class Check:
    """One property: the worst ``error`` measured, the ``tolerance`` it had there, and
    ``where`` (the point, by index and value, or the parameter or layer)."""

    name: str
    measured: str
    error: float
    tolerance: float
    where: str

    @property
    def passed(self) -> bool:
        """``error ≤ tolerance`` (a NaN error fails)."""
        return bool(self.error <= self.tolerance)

    def __str__(self) -> str:
        if self.tolerance == 0 and float(self.error).is_integer():  # a count
            where = f" ({self.where})" if self.where else ""
            return f"{self.name}: {self.measured}: {int(self.error)}{where}"
        relation = "≤" if self.passed else ">"
        value = f"{self.error:.3g} {relation} {self.tolerance:.3g}"
        return f"{self.name}: {self.measured} = {value} at {self.where}"


class _Report:
    """What both reports share: the failed checks, lookup by name, a readable table."""

    def __getitem__(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"{type(self).__name__}: no check named {name!r}")

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        """The checks that failed, in the order they were run."""
        return tuple(c for c in self.checks if not c.passed)

    def __repr__(self) -> str:
        rows = [f"  {'ok  ' if c.passed else 'FAIL'}  {c}" for c in self.checks]
        return "\n".join([f"{type(self).__name__}({self.title}", *rows, ")"])


@dataclasses.dataclass(frozen=True, repr=False)
class BijectionReport(_Report):
    """What :func:`check_bijection` measured: one :class:`Check` per property (``report[
    "log_det"]``), each elementary layer's largest move, ``(name, max |Δ|)`` (``None`` for a
    shape-changing layer), and the number of parameter arrays (``nnx.Param``)."""

    bijection: str
    event_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]
    num_inputs: int
    num_far_points: int
    checks: tuple[Check, ...]
    layer_movement: tuple[tuple[str, float | None], ...] = ()
    num_parameters: int = 0

    @property
    def title(self) -> str:
        """One line: the bijection, its shapes, the points."""
        state = "passed" if self.passed else "FAILED"
        return (
            f"{self.bijection} {state}: event {self.event_shape} → latent {self.latent_shape}, "
            f"{self.num_inputs} inputs + {self.num_far_points} far-out points"
        )


@dataclasses.dataclass(frozen=True, repr=False)
class FlowReport(_Report):
    """What :func:`check_flow` measured: its bijection's report, the ``mass`` check and the
    estimate ``(∫p, uncertainty)`` for each context row (one row without a context)."""

    bijection: BijectionReport
    mass: Check
    estimates: tuple[tuple[float, float], ...]
    method: str

    @property
    def checks(self) -> tuple[Check, ...]:
        """The bijection's checks, then ``mass``."""
        return (*self.bijection.checks, self.mass)

    @property
    def title(self) -> str:
        """One line: the bijection's title and how the mass was estimated."""
        state = "passed" if self.passed else "FAILED"
        return f"{self.bijection.bijection} flow {state}: ∫p by {self.method}"


class CheckError(AssertionError):
    """A property failed. The message names each failed property, its worst point (index
    and value) or parameter, and the error against the tolerance; ``report`` holds every
    measurement."""

    def __init__(self, report: BijectionReport | FlowReport):
        self.report = report
        first, *rest = report.failures
        fn = "check_flow" if isinstance(report, FlowReport) else "check_bijection"
        lines = [f"{fn}: {report.title.split(' ')[0]} fails {first}"]
        lines += [f"  and {c}" for c in rest]
        if {c.name for c in report.failures} <= {"gradients", "layers_move"}:
            lines.append("  (a layer at its identity initialisation? check with perturb=0.1)")
        super().__init__("\n".join([*lines, repr(report)]))

    @property
    def failed(self) -> tuple[str, ...]:
        """The names of the failed properties."""
        return tuple(c.name for c in self.report.failures)


def check_bijection(
    bijection: Bijection,
    *,
    key: Array,
    event_shape: int | Sequence[int] | None = None,
    context: Array | None = None,
    inputs: Array | None = None,
    num_inputs: int = 7,
    scale: float = 2.0,
    far_points: float | Array | None = 12.0,
    no_gradient: Iterable[str | Sequence[str | int]] = (),
    identity_layers: Iterable[str] = (),
    tolerances: Mapping[str, float | tuple[float, float]] | None = None,
    perturb: float = 0.0,
) -> BijectionReport:
    """Check ``bijection`` against the contract (see the module's table); return the
    :class:`BijectionReport`, or raise :class:`CheckError` naming what failed.

    * ``event_shape``: the data-side event shape (an int ``d`` means ``(d,)``); by default
      ``bijection.event_shape``, which it must then equal.
    * ``inputs`` (shape ``(n, *event_shape)``): the points to check at; by default
      ``num_inputs`` draws of ``scale · N(0, I)`` from ``key``.
    * ``far_points``: the far-out points where outputs and gradients must stay finite: a
      number ``r`` is the ramp of 9 points ``t·(1, …, 1)``, ``t`` from ``−r`` to ``r``; an array
      gives them; ``None`` checks none (a layer defined on a bounded domain).
    * ``context`` (conditional bijections only): rows of shape ``(k, context_dim)`` given to
      the points in turn (or one row, ``(context_dim,)``, for all); by default one ``N(0, I)``
      row per point, drawn from ``key``.
    * ``no_gradient``: parameters that get no gradient by construction, as paths or their
      last parts (``"conditioner/hidden/0/kernel"`` or ``("lower",)``); they must still be
      finite.
    * ``identity_layers``: names of elementary layers (``bijection.layer_names()``) that may
      leave their input unchanged (``"Permute"`` of one coordinate).
    * ``tolerances``: property → ``atol`` or ``(atol, rtol)``, over :data:`TOLERANCES`.
    * ``perturb``: add ``perturb · N(0, 1)`` noise (from ``key``) to every parameter of a
      copy first. nflax's couplings start at the identity, where the layers before a
      zero-initialised output layer get no gradient and the layer moves nothing: check a
      fresh flow with ``perturb=0.1``, a trained one as it is.

    A bijection awaiting its data-dependent initialisation (ActNorm) is initialised on a copy
    with the inputs; the bijection passed in is never changed. One in training mode (a
    BatchNorm using batch statistics, so each output depends on the whole batch) is refused.
    The check runs one compiled program (compiled with few optimisations: it runs once) and
    one eager forward call.

    >>> from flax import nnx
    >>> from nflax.bijections import AffineCoupling, alternating_mask
    >>> from nflax.nets import MLP
    >>> layer = AffineCoupling(alternating_mask(2), MLP(2, 4, hidden=(8,), rngs=nnx.Rngs(0)))
    >>> check_bijection(layer, key=jax.random.key(0))  # a fresh coupling is the identity
    Traceback (most recent call last):
    ...
    nflax.testing.CheckError: check_bijection: AffineCoupling fails gradients: ...
    >>> check_bijection(layer, key=jax.random.key(0), perturb=0.1)["round_trip"].passed
    True
    """
    b = setup.require_bijection("check_bijection", bijection)
    event = setup.event_shape(b, event_shape)
    tol = setup.tolerances(TOLERANCES, tolerances)
    dead_ok = setup.no_gradient_suffixes(no_gradient)
    key_x, key_c, key_p = jax.random.split(key, 3)
    x = setup.inputs(inputs, key_x, event, num_inputs, scale)
    far = setup.far_points(far_points, event)
    c, c_far = setup.contexts(b, context, key_c, len(x), len(far))
    b = setup.ready(b, x, c, perturb, key_p)
    names = b.layer_names()
    out = contract_arrays(b, x, c, far, c_far, trajectory=len(names) > 1)
    head = (type(b).__name__, event, setup.latent_shape(b, event), len(x), len(far))
    wrong = _checks.wrong_shapes(out, *head[1:])
    if wrong:  # nothing else can be compared
        check = Check("shapes", "outputs of the wrong shape", len(wrong), 0.0, "; ".join(wrong))
        raise CheckError(BijectionReport(*head, (check,)))
    out["z_eager"], out["ld_eager"] = map(np.asarray, b.forward(x, c))
    out["x"], out["points"] = np.asarray(x), np.concatenate([np.asarray(x), np.asarray(far)])
    out["context"] = None if c is None else np.asarray(c)
    stacked = [tuple(p) + ("layer",) for p, m in nnx.iter_graph(b) if isinstance(m, Stack)]
    measured, movement = _checks.measure(out, names, tol, stacked, dead_ok, set(identity_layers))
    checks = tuple(Check(name, _MEASURED[name], *m) for name, m in measured)
    report = BijectionReport(*head, checks, tuple(movement), len(out["grads"]))
    if not report.passed:
        raise CheckError(report)
    return report


def check_flow(
    flow: Flow,
    *,
    key: Array,
    context: Array | None = None,
    num_samples: int = 10_000,
    grid_size: int | None = None,
    tolerances: Mapping[str, float | tuple[float, float]] | None = None,
    **check_options: Any,
) -> FlowReport:
    """:func:`check_bijection` on ``flow.bijection`` (``check_options`` go to it), then the
    density's integral, which must be 1: return the :class:`FlowReport`, or raise
    :class:`CheckError` naming what failed.

    * 1-D and 2-D: the trapezoid rule on a grid of ``grid_size`` points per axis (default
      4001 in 1-D, 301 in 2-D) spanning ``num_samples`` samples of the flow; the mass beyond
      their extremes, about ``2d/(num_samples + 1)``, is left out. Uncertainty: the
      difference from the rule on every other grid point.
    * More dimensions: importance sampling, ``num_samples`` draws from a multivariate
      Student-t (5 degrees of freedom) centred on the flow's samples, its scale 1.5 times
      their covariance's. Uncertainty: 4 standard errors. It needs a proposal close to the
      flow: fine in a few dimensions, hopeless for images.

    ``|∫p − 1|`` may be ``tolerances["mass"]`` (0.01) plus the uncertainty (at most 0.1).
    (With ``perturb``, only the bijection's check sees the noise; the mass is the flow's.)
    Log-densities that are NaN or ``+inf`` count as zero density and are reported. A
    conditional flow is checked at each row of ``context`` (default: two ``N(0, I)`` rows).

    >>> import jax
    >>> from nflax import Flow, StandardNormal
    >>> from nflax.bijections import Affine
    >>> flow = Flow(StandardNormal(1), Affine(1, loc=0.5, log_scale=-0.3))
    >>> report = check_flow(flow, key=jax.random.key(0))
    >>> report.passed, abs(report.estimates[0][0] - 1) < 0.001
    (True, True)
    """
    if not isinstance(flow, Flow):
        raise ValueError(f"check_flow: expected a Flow, received {type(flow).__name__}")
    k_bij, k_ctx, k_init, k_mass = jax.random.split(key, 4)
    rows = setup.flow_contexts(flow, context, k_ctx)
    flow = setup.ready_flow(flow, rows, k_init)
    features = None if rows is None or flow.bijection.context_dim is None else flow._features(rows)
    tol = setup.tolerances(TOLERANCES, tolerances)
    bijection = check_bijection(
        flow.bijection, key=k_bij, context=features, tolerances=tolerances, **check_options
    )
    method, estimates, bad = _density.flow_mass(flow, rows, k_mass, num_samples, grid_size)
    report = FlowReport(bijection, _mass_check(estimates, bad, tol["mass"][0]), estimates, method)
    if not report.passed:
        raise CheckError(report)
    return report


def _mass_check(estimates, bad: list[int], atol: float) -> Check:
    """The context row whose ``∫p`` is furthest from 1, against ``atol`` plus the estimate's
    uncertainty (at most ``MAX_UNCERTAINTY``)."""
    ratios = [abs(m - 1) / (atol + min(u, MAX_UNCERTAINTY)) for m, u in estimates]
    i = int(np.argmax(np.nan_to_num(ratios, nan=np.inf)))
    mass, uncertainty = estimates[i]
    where = f"context row {i}, " if len(estimates) > 1 else ""
    where += f"∫p = {mass:.5g} ± {uncertainty:.2g}"
    if bad[i]:
        where += f" ({bad[i]} points with a NaN or +inf log p, counted as 0)"
    tolerance = atol + min(uncertainty, MAX_UNCERTAINTY)
    return Check("mass", _MEASURED["mass"], abs(mass - 1), tolerance, where)
