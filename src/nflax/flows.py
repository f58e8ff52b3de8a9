"""Ready-made flows: thin constructors over one assembly helper, their specs recorded from
their own signatures.

Every constructor takes ``context_dim=`` (the size of the raw context; ``None``: an
unconditional flow) and ``embedding=``: the layer sizes of an MLP (tanh, last layer linear)
that maps the raw context to features once per call, e.g. ``(32, 8)`` gives
``context_dim → 32 → 8`` and the layers (and a conditional base) see 8 features.

A constructor only says which layer goes at depth ``i`` (a coupling with its mask, or an
autoregressive layer with its order, and its transformer); :func:`_assemble` builds the rest:
the optional :class:`~nflax.bijections.ActNorm`, the stack, the context embedding and the base.
Each call's arguments, defaults included, become the flow's ``spec`` (see :func:`_constructor`),
so :func:`nflax.load` rebuilds any flow, whatever arguments it was built with.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable, Sequence

import jax.numpy as jnp  # noqa: F401  (doctest namespace)
from flax import nnx

from nflax.bijections import AffineCoupling, Bijection, Chain, LeakyReLU, Stack, alternating_mask
from nflax.bijections.autoregressive import MaskedAutoregressive
from nflax.bijections.base import Invert
from nflax.bijections.continuous import ContinuousFlow
from nflax.bijections.coupling import AdditiveCoupling, SplineCoupling
from nflax.bijections.elementwise import Affine
from nflax.bijections.normalization import ActNorm
from nflax.bijections.planar import Planar
from nflax.bijections.transformers import SplineTransformer, Transformer
from nflax.distributions import ConditionalDiagNormal, Flow, StandardNormal
from nflax.nets import MLP, get_activation
from nflax.vector_fields import VectorField

# Flows over vectors, built with ``dim=``.
CONSTRUCTORS: dict[str, Callable[..., Flow]] = {}
# Flows over images, built with ``event_shape=(H, W, C)`` (:mod:`nflax.flows_image`).
IMAGE_CONSTRUCTORS: dict[str, Callable[..., Flow]] = {}

# Layer ``i`` of a stack, given the number of context features its conditioner sees (or None).
LayerFactory = Callable[[int, "int | None"], Bijection]


def register(
    fn: Callable[..., Flow], registry: dict[str, Callable[..., Flow]] | None = None
) -> Callable[..., Flow]:
    """Register a constructor under its function name (used by checkpoints and the CLI), in
    ``registry`` (default :data:`CONSTRUCTORS`, the vector flows)."""
    (CONSTRUCTORS if registry is None else registry)[fn.__name__] = fn
    return fn


def build(name: str, **kwargs) -> Flow:
    """Build a registered flow by name, e.g. ``build("realnvp", dim=2, rngs=nnx.Rngs(0))`` or
    ``build("glow", event_shape=(8, 8, 1), rngs=nnx.Rngs(0))``."""
    known = {**CONSTRUCTORS, **IMAGE_CONSTRUCTORS}
    if name not in known:
        raise ValueError(
            f"unknown flow {name!r}; known flows: {', '.join(sorted(CONSTRUCTORS))}; "
            f"image flows: {', '.join(sorted(IMAGE_CONSTRUCTORS))}"
        )
    return known[name](**kwargs)


# -- the spec, recorded from the signature -------------------------------------------------------


def _coerce(who: str, arg: str, value, hint):
    """``value`` as the type its annotation ``hint`` names: ``int``, ``float``, ``bool``, ``str``,
    ``Sequence[...]`` (a tuple, JSON's list) or ``X | None``; other hints pass it through."""
    options = typing.get_args(hint)
    if type(None) in options:
        if value is None:
            return None
        (hint,) = [h for h in options if h is not type(None)]
    try:
        if typing.get_origin(hint) is Sequence:
            if isinstance(value, str):
                raise TypeError
            return tuple(_coerce(who, arg, v, typing.get_args(hint)[0]) for v in value)
        if hint is str and not isinstance(value, str):
            raise TypeError
        return hint(value) if hint in (int, float, bool, str) else value
    except (TypeError, ValueError):
        kind = hint.__name__ if isinstance(hint, type) else str(hint)
        raise ValueError(f"{who}: {arg} must be {kind}, received {value!r}") from None


def _check_shared(name: str, values: dict) -> None:
    """The arguments that mean the same in every constructor, checked once, by name: ``dim``
    and ``num_layers`` (≥ 1), ``activation`` (a name in :data:`nflax.nets.ACTIVATIONS`),
    ``context_dim`` (≥ 1 or None) and ``embedding`` (positive sizes, with a context)."""
    if "activation" in values:
        get_activation(values["activation"], name)  # an unknown name fails, named by `name`
    for arg in ("dim", "num_layers", "context_dim"):
        value = values.get(arg)
        if value is not None and value < 1:
            none = " or None" if arg == "context_dim" else ""
            raise ValueError(f"{name}: {arg} must be ≥ 1{none}, received {value}")
    embedding = values.get("embedding")
    if embedding is not None and values.get("context_dim") is None:
        raise ValueError(f"{name}: an embedding network needs context_dim")
    if embedding is not None and (not embedding or min(embedding) < 1):
        raise ValueError(
            f"{name}: embedding must be a non-empty list of positive layer sizes, "
            f"received {list(embedding)}"
        )


def _constructor(
    fn: Callable[..., Flow], registry: dict[str, Callable[..., Flow]] | None = None
) -> Callable[..., Flow]:
    """Register ``fn`` (in ``registry``, see :func:`register`), recording each call's spec
    from its signature.

    The call is bound to ``fn``'s signature with the defaults filled in; every argument is
    coerced to the type its annotation names (:func:`_coerce`), the shared ones are checked
    (:func:`_check_shared`), and all are handed to ``fn`` and, but for ``rngs``, recorded as
    the flow's ``spec``. A new argument is therefore saved and reloaded by :func:`nflax.save`
    and :func:`nflax.load` with no further code.
    """
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)

    @functools.wraps(fn)
    def recorded(*args, **kwargs) -> Flow:
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        values = {
            k: v if k == "rngs" else _coerce(fn.__name__, k, v, hints.get(k))
            for k, v in call.arguments.items()
        }
        _check_shared(fn.__name__, values)
        flow = fn(**values)
        spec = {k: v for k, v in values.items() if k != "rngs"}
        flow.spec = json.dumps({"constructor": fn.__name__, "kwargs": spec}, sort_keys=True)
        return flow

    return register(recorded, registry)


# -- the assembly helper -------------------------------------------------------------------------


def _embedding(context_dim, embedding, rngs: nnx.Rngs) -> tuple[MLP | None, int | None]:
    """The embedding MLP, if any (``embedding``: its layer sizes, the last one the number of
    features), and the number of context features the layers and the base see."""
    if embedding is None:
        return None, context_dim
    # Not zero-initialised: the features must carry the context from the first step.
    net = MLP(context_dim, embedding[-1], hidden=embedding[:-1], zero_init_output=False, rngs=rngs)
    return net, embedding[-1]


def _coupling_mask(dim: int, i: int):
    """Layer ``i``'s coupling mask: alternating parities; for ``dim = 1`` always ``[0]`` (the
    one coordinate is transformed, by a function of the context only), never the identity."""
    return alternating_mask(dim, 1) if dim == 1 else alternating_mask(dim, i % 2)


def _order(dim: int, i: int) -> list[int]:
    """Autoregressive order of layer ``i``: ``1..dim``, reversed on odd layers (the flip that
    mixes the coordinates between layers; for ``dim = 1`` nothing to reverse)."""
    order = list(range(1, dim + 1))
    return order[::-1] if i % 2 else order


def _couplings(coupling, num_params, dim, hidden, activation, rngs, **options) -> LayerFactory:
    """Layer ``i``: ``coupling(mask_i, MLP, **options)``, the MLP mapping the masked input (and
    the context features) to ``dim · num_params`` transformer parameters."""

    def layer(i: int, features: int | None) -> Bijection:
        net = MLP(
            dim + (features or 0), dim * num_params, hidden=hidden, activation=activation, rngs=rngs
        )
        return coupling(_coupling_mask(dim, i), net, context_dim=features, **options)

    return layer


def _autoregressive(
    transformer: str | Transformer, dim, hidden, activation, rngs, *, invert: bool = False
) -> LayerFactory:
    """Layer ``i``: a :class:`MaskedAutoregressive` in the order :func:`_order` gives it, or
    (``invert=True``) its inverse, an IAF layer."""

    def layer(i: int, features: int | None) -> Bijection:
        made = MaskedAutoregressive(
            dim,
            transformer=transformer,
            hidden=hidden,
            context_dim=features,
            order=_order(dim, i),
            activation=activation,
            rngs=rngs,
        )
        return Invert(made) if invert else made

    return layer


def _assemble(
    dim: int,
    num_layers: int,
    layer: LayerFactory,
    rngs: nnx.Rngs,
    context_dim: int | None,
    embedding: Sequence[int] | None,
    *,
    actnorm: bool = False,
    tail: Bijection | None = None,
    conditional_base: bool = False,
    stack: bool = True,
) -> Flow:
    """The flow ``[ActNorm →] Stack(layer(0), …, layer(num_layers − 1)) [→ tail]``
    (``stack=False``: the one layer ``layer(0)`` itself in place of the stack).

    The context (``context_dim``, an optional ``embedding`` MLP) decides the number of features
    each layer's conditioner sees; ``conditional_base=True`` makes the base a
    :class:`~nflax.distributions.ConditionalDiagNormal` when there is a context (else the base
    is a standard normal). Random draws come in a fixed order: the embedding, the layers in
    turn, the base.
    """
    net, features = _embedding(context_dim, embedding, rngs)
    parts = [ActNorm(dim)] if actnorm else []
    if stack:
        parts.append(Stack([layer(i, features) for i in range(num_layers)]))
    else:
        parts.append(layer(0, features))
    parts += [tail] if tail is not None else []
    bijection = parts[0] if len(parts) == 1 else Chain(parts)
    if conditional_base and features is not None:
        base = ConditionalDiagNormal(dim, features, rngs=rngs)
    else:
        base = StandardNormal(dim)
    return Flow(base, bijection, embedding=net)


# -- the constructors ----------------------------------------------------------------------------


@_constructor
def realnvp(
    dim: int,
    *,
    num_layers: int = 8,
    hidden: Sequence[int] = (64, 64),
    leaky_relu: bool = False,
    actnorm: bool = False,
    activation: str = "tanh",
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """RealNVP (Dinh et al. 2017): affine couplings with alternating masks, as in the tutorial.

    ``num_layers`` coupling layers, masks ``[1,0,…]`` and ``[0,1,…]`` alternating, each with an
    MLP conditioner (tanh, ``hidden`` sizes). For ``dim = 1`` every mask is ``[0]``, so no layer
    is the identity; each coupling is then an affine map whose scale and shift depend on the
    context only (unconditional: a Gaussian flow unless ``leaky_relu=True`` adds the
    nonlinearity). ``leaky_relu=True`` follows every coupling with the tutorial's learnable
    :class:`~nflax.bijections.LeakyReLU`. ``actnorm=True`` puts an
    :class:`~nflax.bijections.ActNorm` first, which standardises the data from the first
    training batch (the conditioners then see inputs of unit scale; ``nflax train`` uses it).
    ``activation`` names the conditioners' activation (:data:`nflax.nets.ACTIVATIONS`):
    ``"tanh"`` is the tutorial's; ``"silu"`` keeps growing beyond the training data, so the
    flow's tails extrapolate instead of saturating (``nflax train`` uses it; measured in
    ``benchmarks/README.md``). The identical blocks form one :class:`~nflax.bijections.Stack`:
    unrolled up to 8 layers (faster steps), scanned beyond (compile time flat in depth).

    >>> flow = realnvp(2, num_layers=4, rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    coupling = _couplings(AffineCoupling, 2, dim, hidden, activation, rngs)

    def layer(i: int, features: int | None) -> Bijection:
        block = coupling(i, features)
        return Chain([block, LeakyReLU(dim)]) if leaky_relu else block

    return _assemble(dim, num_layers, layer, rngs, context_dim, embedding, actnorm=actnorm)


@_constructor
def planar(
    dim: int,
    *,
    num_layers: int = 16,
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """Planar flow (Rezende & Mohamed 2015): ``num_layers`` :class:`~nflax.bijections.Planar`.

    Each layer is ``z = x + û·tanh(wᵀx + b)`` in the forward (data → latent) direction, so
    ``log_prob`` is closed-form and sampling inverts each layer numerically (bisection + one
    Newton step, float precision). The identical layers form one ``Stack`` (see
    :func:`realnvp`). Planar layers have no conditioner: with ``context_dim`` the flow is
    conditional through its base, a :class:`~nflax.distributions.ConditionalDiagNormal`.

    >>> import jax
    >>> flow = planar(2, num_layers=4, rngs=nnx.Rngs(0))
    >>> x, log_p = flow.sample_and_log_prob(jax.random.key(0), 3)  # numerical inverse
    >>> bool(jnp.allclose(flow.log_prob(x), log_p, atol=1e-4))
    True
    """

    def layer(i: int, features: int | None) -> Bijection:
        return Planar(dim, rngs=rngs)

    return _assemble(dim, num_layers, layer, rngs, context_dim, embedding, conditional_base=True)


@_constructor
def nice(
    dim: int,
    *,
    num_layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """NICE (Dinh et al. 2015): additive couplings with alternating masks, then a diagonal scale.

    ``num_layers`` :class:`~nflax.bijections.coupling.AdditiveCoupling` layers (volume
    preserving, MLP conditioners, masks ``[1,0,…]`` / ``[0,1,…]`` alternating), in one
    ``Stack`` (see :func:`realnvp`), followed by one elementwise
    :class:`~nflax.bijections.Affine` — the paper's diagonal scaling, the only layer that
    changes volume.

    >>> flow = nice(2, num_layers=4, hidden=(8,), rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    layer = _couplings(AdditiveCoupling, 1, dim, hidden, activation, rngs)
    return _assemble(dim, num_layers, layer, rngs, context_dim, embedding, tail=Affine(dim))


@_constructor
def maf(
    dim: int,
    *,
    num_layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """Masked autoregressive flow (Papamakarios et al. 2017) with affine transformers.

    ``num_layers`` :class:`~nflax.bijections.autoregressive.MaskedAutoregressive` layers whose
    autoregressive order is reversed from one layer to the next (dim 1: one order; dim 2: a
    flip), in one ``Stack`` (see :func:`realnvp`). Density (``log_prob``, forward) costs one
    pass per layer; sampling (inverse) costs ``dim`` passes per layer.

    >>> flow = maf(2, num_layers=3, hidden=(8,), rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    layer = _autoregressive("affine", dim, hidden, activation, rngs)
    return _assemble(dim, num_layers, layer, rngs, context_dim, embedding)


@_constructor
def iaf(
    dim: int,
    *,
    num_layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    activation: str = "tanh",
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """Inverse autoregressive flow (Kingma et al. 2016): :func:`maf`'s layers, each inverted.

    Every layer is ``Invert(MaskedAutoregressive(...))``: sampling (inverse) is one pass per
    layer, ``log_prob`` of arbitrary data (forward) costs ``dim`` passes per layer. Suited to
    variational inference (``fit_vi``), where only samples and their densities are needed.

    >>> import jax
    >>> flow = iaf(2, num_layers=3, hidden=(8,), rngs=nnx.Rngs(0))
    >>> x, log_p = flow.sample_and_log_prob(jax.random.key(0), 4)  # one pass per layer
    >>> x.shape, bool(jnp.allclose(flow.log_prob(x), log_p, atol=1e-5))  # dim passes per layer
    ((4, 2), True)
    """
    layer = _autoregressive("affine", dim, hidden, activation, rngs, invert=True)
    return _assemble(dim, num_layers, layer, rngs, context_dim, embedding)


@_constructor
def nsf(
    dim: int,
    *,
    variant: str = "coupling",
    num_layers: int = 5,
    hidden: Sequence[int] = (64, 64),
    bins: int = 8,
    bound: float = 3.0,
    actnorm: bool = False,
    activation: str = "tanh",
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """Neural spline flow (Durkan et al. 2019): rational-quadratic splines on ``[-bound, bound]``
    with ``bins`` bins, identity outside.

    ``variant="coupling"``: :class:`~nflax.bijections.coupling.SplineCoupling` layers with MLP
    conditioners and alternating masks (one pass both ways). ``variant="autoregressive"``:
    :class:`~nflax.bijections.autoregressive.MaskedAutoregressive` spline layers with the order
    reversed between layers (one pass for density, ``dim`` for sampling). Either way the
    layers form one ``Stack`` (see :func:`realnvp`). The splines only act inside
    ``[-bound, bound]``: ``actnorm=True`` puts an :class:`~nflax.bijections.ActNorm` first so
    that standardised data fall inside it (``nflax train`` uses it).

    >>> flow = nsf(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    if variant not in ("coupling", "autoregressive"):
        raise ValueError(
            f"nsf: variant must be 'coupling' or 'autoregressive', received {variant!r}"
        )
    spline = SplineTransformer(bins, bound, who="nsf")
    if variant == "autoregressive":
        layer = _autoregressive(spline, dim, hidden, activation, rngs)
    else:
        options = {"bins": bins, "bound": bound}
        layer = _couplings(
            SplineCoupling, spline.num_params, dim, hidden, activation, rngs, **options
        )
    return _assemble(dim, num_layers, layer, rngs, context_dim, embedding, actnorm=actnorm)


@_constructor
def cnf(
    dim: int,
    *,
    hidden: Sequence[int] = (128, 128, 128),
    activation: str = "silu",
    time_frequencies: int = 4,
    actnorm: bool = False,
    trace: str = "auto",
    rtol: float = 1e-7,
    atol: float = 1e-7,
    context_dim: int | None = None,
    embedding: Sequence[int] | None = None,
    rngs: nnx.Rngs,
) -> Flow:
    """Continuous normalizing flow: one :class:`~nflax.bijections.ContinuousFlow` on a
    :class:`~nflax.vector_fields.VectorField` (an MLP of ``hidden`` sizes and ``activation``
    over ``[x, φ(t), context features]``, ``φ`` with ``time_frequencies`` frequencies).

    Time runs from the base (``t = 0``) to the data (``t = 1``); ``log_prob`` solves the ODE
    from the data to the latent with its log-determinant, exact for ``dim ≤ 16`` (``trace``:
    ``"auto"``, ``"exact"`` or ``"hutchinson"``, see the layer), at tolerances ``rtol``,
    ``atol``. Train it by flow matching (:func:`nflax.fit_flow_matching`, no ODE solve per
    step) or by maximum likelihood through the solver (:func:`nflax.fit`, FFJORD).
    ``actnorm=True`` puts an :class:`~nflax.bijections.ActNorm` first, so the field sees
    standardised data (``nflax train`` uses it). The field starts at zero: a fresh flow is
    the identity.

    >>> flow = cnf(2, hidden=(8,), rngs=nnx.Rngs(0))
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """

    def layer(i: int, features: int | None) -> Bijection:
        field = VectorField(
            dim,
            hidden=hidden,
            context_dim=features,
            time_frequencies=time_frequencies,
            activation=activation,
            rngs=rngs,
        )
        return ContinuousFlow(field, trace=trace, rtol=rtol, atol=atol)

    return _assemble(dim, 1, layer, rngs, context_dim, embedding, actnorm=actnorm, stack=False)


# The image flows register themselves in IMAGE_CONSTRUCTORS; re-exported here.
from nflax.flows_image import glow, realnvp_image  # noqa: E402, F401

__all__ = [
    "build",
    "cnf",
    "glow",
    "iaf",
    "maf",
    "nice",
    "nsf",
    "planar",
    "realnvp",
    "realnvp_image",
    "register",
]
