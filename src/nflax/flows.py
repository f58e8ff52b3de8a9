"""Ready-made flows. Each constructor records its own arguments so a checkpoint can rebuild it.

Every constructor takes ``context_dim=`` (the size of the raw context; ``None``: an
unconditional flow) and ``embedding=``: the layer sizes of an MLP (tanh, last layer linear)
that maps the raw context to features once per call, e.g. ``(32, 8)`` gives
``context_dim → 32 → 8`` and the layers (and a conditional base) see 8 features. Both are in
the spec, so :func:`nflax.load` rebuilds the embedding with the flow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import jax.numpy as jnp  # noqa: F401  (doctest namespace)
from flax import nnx

from nflax.bijections import AffineCoupling, Bijection, Chain, LeakyReLU, Stack, alternating_mask
from nflax.bijections.autoregressive import MaskedAutoregressive
from nflax.bijections.base import Invert
from nflax.bijections.coupling import AdditiveCoupling, SplineCoupling
from nflax.bijections.elementwise import Affine
from nflax.bijections.normalization import ActNorm
from nflax.bijections.planar import Planar
from nflax.bijections.splines import num_spline_params
from nflax.distributions import ConditionalDiagNormal, Flow, StandardNormal
from nflax.nets import MLP, get_activation

CONSTRUCTORS: dict[str, Callable[..., Flow]] = {}


def register(fn: Callable[..., Flow]) -> Callable[..., Flow]:
    """Register a constructor under its function name (used by checkpoints and the CLI)."""
    CONSTRUCTORS[fn.__name__] = fn
    return fn


def build(name: str, **kwargs) -> Flow:
    """Build a registered flow by name, e.g. ``build("realnvp", dim=2, rngs=nnx.Rngs(0))``."""
    if name not in CONSTRUCTORS:
        raise ValueError(f"unknown flow {name!r}; known flows: {', '.join(sorted(CONSTRUCTORS))}")
    return CONSTRUCTORS[name](**kwargs)


def _spec(name: str, **kwargs) -> str:
    return json.dumps({"constructor": name, "kwargs": kwargs}, sort_keys=True)


def _check_dim(name: str, dim: int, num_layers: int, activation: str = "tanh") -> None:
    get_activation(activation, name)  # an unknown name fails here, named by the constructor
    if int(dim) < 1:
        raise ValueError(f"{name}: dim must be ≥ 1, received {dim}")
    if int(num_layers) < 1:
        raise ValueError(f"{name}: num_layers must be ≥ 1, received {num_layers}")


@register
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
    ``benchmarks/README.md``). The identical blocks are stacked and scanned, so compile time
    does not grow with ``num_layers``.

    >>> flow = realnvp(2, num_layers=4, rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    _check_dim("realnvp", dim, num_layers, activation)
    dim, num_layers = int(dim), int(num_layers)
    hidden = tuple(int(h) for h in hidden)
    cond = _Conditioning("realnvp", context_dim, embedding, rngs)
    cin = dim + (cond.features or 0)

    def block(i: int) -> Bijection:
        net = MLP(cin, 2 * dim, hidden=hidden, activation=activation, rngs=rngs)
        layer = AffineCoupling(_coupling_mask(dim, i), net, context_dim=cond.features)
        return Chain([layer, LeakyReLU(dim)]) if leaky_relu else layer

    bijection = Stack([block(i) for i in range(num_layers)])
    if actnorm:
        bijection = Chain([ActNorm(dim), bijection])
    spec = _spec(
        "realnvp",
        dim=dim,
        num_layers=num_layers,
        hidden=list(hidden),
        leaky_relu=bool(leaky_relu),
        actnorm=bool(actnorm),
        activation=activation,
        **cond.spec(),
    )
    return Flow(StandardNormal(dim), bijection, embedding=cond.net, spec=spec)


@register
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
    Newton step, float precision). The identical layers are stacked and scanned. Planar
    layers have no conditioner: with ``context_dim`` the flow is conditional through its base,
    a :class:`~nflax.distributions.ConditionalDiagNormal`.

    >>> import jax
    >>> flow = planar(2, num_layers=4, rngs=nnx.Rngs(0))
    >>> x, log_p = flow.sample_and_log_prob(jax.random.key(0), 3)  # numerical inverse
    >>> bool(jnp.allclose(flow.log_prob(x), log_p, atol=1e-4))
    True
    """
    _check_dim("planar", dim, num_layers)
    dim, num_layers = int(dim), int(num_layers)
    cond = _Conditioning("planar", context_dim, embedding, rngs)
    bijection = Stack([Planar(dim, rngs=rngs) for _ in range(num_layers)])
    spec = _spec("planar", dim=dim, num_layers=num_layers, **cond.spec())
    base = (
        StandardNormal(dim)
        if cond.features is None
        else ConditionalDiagNormal(dim, cond.features, rngs=rngs)
    )
    return Flow(base, bijection, embedding=cond.net, spec=spec)


def _context_dim(name: str, context_dim: int | None) -> int | None:
    if context_dim is None:
        return None
    if int(context_dim) < 1:
        raise ValueError(f"{name}: context_dim must be ≥ 1 or None, received {context_dim}")
    return int(context_dim)


class _Conditioning:
    """A constructor's context handling: the raw ``context_dim``, an optional embedding MLP
    (``embedding`` = its layer sizes, the last one the number of features) and the feature
    size the layers and the base see."""

    def __init__(self, name: str, context_dim, embedding, rngs: nnx.Rngs):
        self.context_dim = _context_dim(name, context_dim)
        self.sizes = None if embedding is None else [int(s) for s in embedding]
        self.net = None
        self.features = self.context_dim
        if self.sizes is None:
            return
        if self.context_dim is None:
            raise ValueError(f"{name}: an embedding network needs context_dim")
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(
                f"{name}: embedding must be a non-empty list of positive layer sizes, "
                f"received {list(embedding)}"
            )
        # Not zero-initialised: the features must carry the context from the first step.
        self.net = MLP(
            self.context_dim,
            self.sizes[-1],
            hidden=self.sizes[:-1],
            zero_init_output=False,
            rngs=rngs,
        )
        self.features = self.sizes[-1]

    def spec(self) -> dict:
        """The spec entries: ``context_dim``, and ``embedding`` when there is one."""
        out = {"context_dim": self.context_dim}
        if self.sizes is not None:
            out["embedding"] = self.sizes
        return out


def _coupling_mask(dim: int, i: int):
    """Layer ``i``'s coupling mask: alternating parities; for ``dim = 1`` always ``[0]`` (the
    one coordinate is transformed, by a function of the context only), never the identity."""
    return alternating_mask(dim, 1) if dim == 1 else alternating_mask(dim, i % 2)


def _order(dim: int, i: int) -> list[int]:
    """Autoregressive order of layer ``i``: ``1..dim``, reversed on odd layers (the flip that
    mixes the coordinates between layers; for ``dim = 1`` nothing to reverse)."""
    order = list(range(1, dim + 1))
    return order[::-1] if i % 2 else order


@register
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
    preserving, MLP conditioners, masks ``[1,0,…]`` / ``[0,1,…]`` alternating), stacked and
    scanned, followed by one elementwise :class:`~nflax.bijections.Affine` — the paper's
    diagonal scaling, the only layer that changes volume.

    >>> flow = nice(2, num_layers=4, hidden=(8,), rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    _check_dim("nice", dim, num_layers, activation)
    dim, num_layers = int(dim), int(num_layers)
    hidden = tuple(int(h) for h in hidden)
    cond = _Conditioning("nice", context_dim, embedding, rngs)
    cin = dim + (cond.features or 0)
    couplings = [
        AdditiveCoupling(
            _coupling_mask(dim, i),
            MLP(cin, dim, hidden=hidden, activation=activation, rngs=rngs),
            context_dim=cond.features,
        )
        for i in range(num_layers)
    ]
    bijection = Chain([Stack(couplings), Affine(dim)])
    spec = _spec(
        "nice",
        dim=dim,
        num_layers=num_layers,
        hidden=list(hidden),
        activation=activation,
        **cond.spec(),
    )
    return Flow(StandardNormal(dim), bijection, embedding=cond.net, spec=spec)


def _autoregressive_layers(
    dim: int,
    num_layers: int,
    hidden: Sequence[int],
    context_dim: int | None,
    rngs: nnx.Rngs,
    **transformer,
) -> list[MaskedAutoregressive]:
    return [
        MaskedAutoregressive(
            int(dim),
            hidden=tuple(int(h) for h in hidden),
            context_dim=context_dim,
            order=_order(int(dim), i),
            rngs=rngs,
            **transformer,
        )
        for i in range(int(num_layers))
    ]


def _autoregressive_flow(
    name, dim, num_layers, hidden, activation, context_dim, embedding, rngs, *, invert
):
    """maf (``invert=False``) or iaf (every layer inverted), with its spec."""
    _check_dim(name, dim, num_layers, activation)
    cond = _Conditioning(name, context_dim, embedding, rngs)
    layers = _autoregressive_layers(
        dim, num_layers, hidden, cond.features, rngs, activation=activation
    )
    spec = _spec(
        name,
        dim=int(dim),
        num_layers=int(num_layers),
        hidden=[int(h) for h in hidden],
        activation=activation,
        **cond.spec(),
    )
    bijection = Stack([Invert(b) for b in layers] if invert else layers)
    return Flow(StandardNormal(int(dim)), bijection, embedding=cond.net, spec=spec)


@register
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
    flip), stacked and scanned. Density (``log_prob``, forward) costs one pass per layer;
    sampling (inverse) costs ``dim`` passes per layer.

    >>> flow = maf(2, num_layers=3, hidden=(8,), rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    return _autoregressive_flow(
        "maf", dim, num_layers, hidden, activation, context_dim, embedding, rngs, invert=False
    )


@register
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
    return _autoregressive_flow(
        "iaf", dim, num_layers, hidden, activation, context_dim, embedding, rngs, invert=True
    )


@register
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
    layers are stacked and scanned. The splines only act inside ``[-bound, bound]``:
    ``actnorm=True`` puts an :class:`~nflax.bijections.ActNorm` first so that standardised
    data fall inside it (``nflax train`` uses it).

    >>> flow = nsf(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))  # a fresh flow is the identity
    >>> [round(float(v), 4) for v in flow.log_prob(jnp.zeros((3, 2)))]  # −log 2π
    [-1.8379, -1.8379, -1.8379]
    """
    if variant not in ("coupling", "autoregressive"):
        raise ValueError(
            f"nsf: variant must be 'coupling' or 'autoregressive', received {variant!r}"
        )
    if int(bins) < 2 or not float(bound) > 0:
        raise ValueError(f"nsf: expected bins ≥ 2 and bound > 0, received {bins} and {bound}")
    dim, num_layers, bins, bound = int(dim), int(num_layers), int(bins), float(bound)
    hidden = tuple(int(h) for h in hidden)
    _check_dim("nsf", dim, num_layers, activation)
    cond = _Conditioning("nsf", context_dim, embedding, rngs)
    if variant == "autoregressive":
        spline = {"transformer": "spline", "bins": bins, "bound": bound, "activation": activation}
        layers = _autoregressive_layers(dim, num_layers, hidden, cond.features, rngs, **spline)
    else:
        cout = dim * num_spline_params(bins)
        layers = [
            SplineCoupling(
                _coupling_mask(dim, i),
                MLP(
                    dim + (cond.features or 0),
                    cout,
                    hidden=hidden,
                    activation=activation,
                    rngs=rngs,
                ),
                bins=bins,
                bound=bound,
                context_dim=cond.features,
            )
            for i in range(num_layers)
        ]
    spec = _spec(
        "nsf",
        dim=dim,
        variant=variant,
        num_layers=num_layers,
        hidden=list(hidden),
        bins=bins,
        bound=bound,
        actnorm=bool(actnorm),
        activation=activation,
        **cond.spec(),
    )
    bijection = Stack(layers)
    if actnorm:
        bijection = Chain([ActNorm(dim), bijection])
    return Flow(StandardNormal(dim), bijection, embedding=cond.net, spec=spec)
