"""Conditioner networks: the small "hypernetworks" that predict a layer's parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nflax._conv import patch_conv
from nflax.variables import Buffer

Activation = Callable[[jax.Array], jax.Array]

# Named activations, so a constructor can record its choice in a checkpoint's spec.
ACTIVATIONS: dict[str, Activation] = {
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "elu": jax.nn.elu,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
}


def get_activation(activation: str | Activation, who: str = "MLP") -> Activation:
    """``activation`` itself when callable, else the function named in :data:`ACTIVATIONS`.

    ``tanh`` saturates: beyond the training data a tanh conditioner's outputs stop changing.
    ``silu``, ``gelu``, ``elu``, ``relu`` and ``softplus`` continue linearly, which matters
    for a flow's tails (see ``benchmarks/README.md``).

    >>> get_activation("silu") is jax.nn.silu
    True
    """
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{who}: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[activation]


class MLP(nnx.Module):
    """Dense → activation → … → Dense, the tutorial's hypernetwork.

    With ``zero_init_output=True`` (the default) the last layer starts at zero, so a coupling
    layer built on it starts as the identity map. ``activation``: a function or a name from
    :data:`ACTIVATIONS` (default ``"tanh"``, the tutorial's).

    >>> from flax import nnx
    >>> net = MLP(2, 4, hidden=(8, 8), rngs=nnx.Rngs(0))
    >>> net(jnp.ones((3, 2))).tolist()  # the output layer starts at zero
    [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str | Activation = "tanh",
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        sizes = [int(in_features), *map(int, hidden)]
        if any(s < 1 for s in [*sizes, out_features]):
            raise ValueError(
                f"MLP: sizes must be positive, received in={in_features}, hidden={tuple(hidden)}, "
                f"out={out_features}"
            )
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        init = (
            nnx.initializers.zeros_init() if zero_init_output else nnx.initializers.lecun_normal()
        )
        self.out = nnx.Linear(sizes[-1], int(out_features), kernel_init=init, rngs=rngs)
        self.activation = get_activation(activation, "MLP")
        self.in_features = int(in_features)
        self.out_features = int(out_features)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = self.activation(layer(x))
        return self.out(x)


class MaskedLinear(nnx.Module):
    """A dense layer whose kernel is multiplied by a fixed 0/1 ``mask`` of shape ``(in, out)``.

    The mask is a :class:`~nflax.variables.Buffer` (saved with the model, never trained).
    Kernels start Lecun-normal, rescaled per output unit to its number of live inputs, or at
    zero with ``zero_init=True``; biases start at zero.
    """

    def __init__(self, mask: np.ndarray, *, zero_init: bool = False, rngs: nnx.Rngs):
        mask = np.asarray(mask, np.float32)
        if mask.ndim != 2:
            raise ValueError(f"MaskedLinear: mask must be 2D (in, out), received {mask.shape}")
        fan_in = np.maximum(mask.sum(axis=0), 1.0)
        if zero_init:
            kernel = jnp.zeros(mask.shape, jnp.float32)
        else:
            scale = jnp.asarray(1.0 / np.sqrt(fan_in), jnp.float32)
            kernel = jax.random.normal(rngs.params(), mask.shape, jnp.float32) * scale
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((mask.shape[1],), jnp.float32))
        self.mask = Buffer(jnp.asarray(mask))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ (self.kernel[...] * self.mask[...]) + self.bias[...]


def made_degrees(
    in_features: int,
    hidden: Sequence[int],
    *,
    order: Sequence[int] | None = None,
    context: bool = False,
) -> list[np.ndarray]:
    """Degrees of the inputs and of every hidden layer of a :class:`MADE`.

    Inputs get ``order`` (a permutation of ``1..d``; default ``1, …, d``). Hidden units cycle
    through ``lo, …, d − 1`` with ``lo = 1``, or ``lo = 0`` when there is a context or
    ``d = 1``: degree-0 units see no input, only the context, so every output can depend on it.

    >>> [a.tolist() for a in made_degrees(3, (4,))]
    [[1, 2, 3], [1, 2, 1, 2]]
    """
    d = int(in_features)
    if order is None:
        degrees = np.arange(1, d + 1)
    else:
        degrees = np.asarray(order, dtype=np.int64).reshape(-1)
        if sorted(degrees.tolist()) != list(range(1, d + 1)):
            raise ValueError(
                f"MADE: order must be a permutation of 1..{d}, received {degrees.tolist()}"
            )
    lo = 0 if (context or d == 1) else 1
    out = [degrees]
    for n in hidden:
        out.append(lo + np.arange(int(n)) % (d - lo))
    return out


class MADE(nnx.Module):
    r"""Masked autoencoder for distribution estimation (Germain et al. 2015).

    An MLP whose weights are masked so that the outputs for coordinate ``i`` depend only on the
    inputs ``j`` with ``degree(j) < degree(i)`` (degrees: ``order``, default ``1, …, d``), i.e.
    its Jacobian is strictly triangular in the degree order. A hidden unit of degree ``k`` sees
    the inputs (or units) of degree ``≤ k``; an output of degree ``i`` sees the last hidden
    units of degree ``< i``. The optional ``context`` feeds every unit of the first hidden layer
    through an unmasked dense layer (see :func:`made_degrees` for how every output can see it).

    ``__call__(x, context)`` maps ``(*batch, d)`` to ``(*batch, d, num_params)``. With
    ``zero_init_output=True`` (default) the output layer starts at zero, so a flow built on it
    starts as the identity.

    >>> from flax import nnx
    >>> import jax
    >>> net = MADE(3, 2, hidden=(8,), zero_init_output=False, rngs=nnx.Rngs(0))
    >>> net(jnp.ones((5, 3))).shape
    (5, 3, 2)
    >>> # ∂(first parameter of coordinate i)/∂x_j ≠ 0 only for j < i: strictly triangular
    >>> (jax.jacobian(lambda v: net(v)[:, 0])(jnp.ones(3)) != 0).astype(int).tolist()
    [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
    """

    def __init__(
        self,
        in_features: int,
        num_params: int,
        *,
        hidden: Sequence[int] = (64, 64),
        context_dim: int | None = None,
        order: Sequence[int] | None = None,
        activation: str | Activation = "tanh",
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        d, p = int(in_features), int(num_params)
        hidden = tuple(int(h) for h in hidden)
        if d < 1 or p < 1 or not hidden or any(h < 1 for h in hidden):
            raise ValueError(
                f"MADE: expected in_features ≥ 1, num_params ≥ 1 and at least one positive "
                f"hidden size, received in_features={in_features}, num_params={num_params}, "
                f"hidden={hidden}"
            )
        if context_dim is not None and int(context_dim) < 1:
            raise ValueError(f"MADE: context_dim must be ≥ 1 or None, received {context_dim}")
        degrees = made_degrees(d, hidden, order=order, context=context_dim is not None)
        layers = []
        for a, b in zip(degrees[:-1], degrees[1:], strict=True):
            layers.append(MaskedLinear(a[:, None] <= b[None, :], rngs=rngs))
        self.hidden = nnx.List(layers)
        out_degrees = np.repeat(degrees[0], p)  # output i * p + k belongs to coordinate i
        self.out = MaskedLinear(
            degrees[-1][:, None] < out_degrees[None, :], zero_init=zero_init_output, rngs=rngs
        )
        self.context_in = (
            None
            if context_dim is None
            else nnx.Linear(int(context_dim), hidden[0], use_bias=False, rngs=rngs)
        )
        self.degrees = Buffer(jnp.asarray(degrees[0], jnp.int32))
        self.activation = get_activation(activation, "MADE")
        self.in_features, self.num_params = d, p
        self.context_dim = None if context_dim is None else int(context_dim)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MADE: expected input of shape (*batch, {self.in_features}), received {x.shape}"
            )
        h = self.hidden[0](x)
        if self.context_in is not None:
            if context is None:
                raise ValueError(
                    f"MADE: this net is conditional and needs a context of shape "
                    f"(*batch, {self.context_dim}); received none"
                )
            h = h + self.context_in(context.astype(h.dtype))
        h = self.activation(h)
        for layer in self.hidden[1:]:
            h = self.activation(layer(h))
        out = self.out(h)
        return out.reshape(*out.shape[:-1], self.in_features, self.num_params)


def _check_conv_sizes(who: str, in_channels, out_channels, width, count_name: str, count):
    if min(int(in_channels), int(out_channels), int(width)) < 1 or int(count) < 0:
        raise ValueError(
            f"{who}: expected positive channels and width and {count_name} ≥ 0, received "
            f"in_channels={in_channels}, out_channels={out_channels}, width={width}, "
            f"{count_name}={count}"
        )


def _conv3x3(a: int, b: int, rngs: nnx.Rngs, **kw) -> nnx.Conv:
    """A 3×3 ``SAME`` convolution; ``patch_conv``: as fast inside the training engine's loop
    as outside (on CPU)."""
    return nnx.Conv(
        a, b, kernel_size=(3, 3), padding="SAME", conv_general_dilated=patch_conv,
        rngs=rngs, **kw,
    )  # fmt: skip


def _conv_out(width: int, out_channels: int, zero_init: bool, rngs: nnx.Rngs) -> nnx.Conv:
    """The output convolution, at zero when ``zero_init`` (the coupling starts as identity)."""
    init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    return _conv3x3(width, int(out_channels), rngs, kernel_init=init)


def _images(who: str, x: jax.Array, in_channels: int) -> tuple[tuple[int, ...], jax.Array]:
    """``x``'s batch shape and ``x`` as one batch of ``(H, W, in_channels)`` images."""
    if x.ndim < 3 or x.shape[-1] != in_channels:
        raise ValueError(
            f"{who}: expected input of shape (*batch, H, W, {in_channels}), received {x.shape}"
        )
    return x.shape[:-3], x.reshape(-1, *x.shape[-3:])


class ConvResNet(nnx.Module):
    r"""A small convolutional ResNet, the conditioner of image coupling layers.

    ``(*batch, H, W, in_channels)`` → ``(*batch, H, W, out_channels)``, all convolutions
    3×3 with ``SAME`` padding (the spatial size is kept):

        ``h₀ = conv_in(x)``,  ``h_{k+1} = h_k + conv_b(act(conv_a(act(h_k))))`` (``blocks``
        residual blocks of ``width`` channels),  ``y = conv_out(act(h_B))``.

    With ``zero_init_output=True`` (the default) ``conv_out`` starts at zero, so the output is
    zero and a coupling built on it starts as the identity map.

    >>> from flax import nnx
    >>> net = ConvResNet(2, 4, width=8, blocks=1, rngs=nnx.Rngs(0))
    >>> y = net(jnp.ones((3, 4, 4, 2)))
    >>> y.shape, float(jnp.abs(y).max())  # the output layer starts at zero
    ((3, 4, 4, 4), 0.0)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int = 64,
        blocks: int = 2,
        activation: str | Activation = "relu",
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        _check_conv_sizes("ConvResNet", in_channels, out_channels, width, "blocks", blocks)
        width = int(width)
        self.conv_in = _conv3x3(int(in_channels), width, rngs)
        self.blocks = nnx.List(
            [
                nnx.List([_conv3x3(width, width, rngs), _conv3x3(width, width, rngs)])
                for _ in range(int(blocks))
            ]
        )
        self.conv_out = _conv_out(width, out_channels, zero_init_output, rngs)
        self.activation = get_activation(activation, "ConvResNet")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, images = _images("ConvResNet", x, self.in_channels)
        h = self.conv_in(images)
        for conv_a, conv_b in self.blocks:
            h = h + conv_b(self.activation(conv_a(self.activation(h))))
        y = self.conv_out(self.activation(h))
        return y.reshape(*batch, *y.shape[1:])


class GlowConvNet(nnx.Module):
    r"""Glow's coupling conditioner (Kingma & Dhariwal 2018): a 3×3 convolution, 1×1 ones,
    a 3×3 convolution.

    ``(*batch, H, W, in_channels)`` → ``(*batch, H, W, out_channels)``, ``SAME`` padding:

        ``h₀ = act(conv3×3_in(x))``,  ``h_{k+1} = act(W_k h_k + b_k)`` (``layers`` 1×1
        convolutions of ``width`` channels: a dense layer at every pixel),
        ``y = conv3×3_out(h_L)``.

    Only the outer layers see neighbouring pixels, so it is far smaller than a
    :class:`ConvResNet` of the same width (on ``digits`` it also overfits less: see
    ``benchmarks/README.md``). With ``zero_init_output=True`` (the default) the last
    convolution starts at zero, so a coupling built on it starts as the identity map.

    >>> from flax import nnx
    >>> net = GlowConvNet(2, 4, width=8, rngs=nnx.Rngs(0))
    >>> y = net(jnp.ones((3, 4, 4, 2)))
    >>> y.shape, float(jnp.abs(y).max())  # the output layer starts at zero
    ((3, 4, 4, 4), 0.0)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int = 64,
        layers: int = 1,
        activation: str | Activation = "relu",
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        _check_conv_sizes("GlowConvNet", in_channels, out_channels, width, "layers", layers)
        width = int(width)
        self.conv_in = _conv3x3(int(in_channels), width, rngs)
        # a 1×1 convolution is a dense layer on the channel axis (no convolution to slow down)
        self.hidden = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(int(layers))])
        self.conv_out = _conv_out(width, out_channels, zero_init_output, rngs)
        self.activation = get_activation(activation, "GlowConvNet")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, images = _images("GlowConvNet", x, self.in_channels)
        h = self.activation(self.conv_in(images))
        for layer in self.hidden:
            h = self.activation(layer(h))
        y = self.conv_out(h)
        return y.reshape(*batch, *y.shape[1:])
