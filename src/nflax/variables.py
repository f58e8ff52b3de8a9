"""Every kind of state a flow holds, and the flags that say which state a call may change.

A leaf module: it imports nothing of nflax, so layers, networks and the training code all
import their state kinds from here (as NNX keeps every ``Variable`` kind in ``variablelib``).

| kind | what | trained | changes during a call |
| --- | --- | --- | --- |
| ``nnx.Param`` | weights, biases, scales | yes | no |
| :class:`Buffer` | masks, permutations, MADE degrees | no | no |
| :class:`DataInit` | data-dependent initialisation (ActNorm) | no | once, on the first batch |
| ``nnx.BatchStat`` | running averages (BatchNorm) | no | in training mode |

Two flags, both read from the modules themselves:

* **train/eval**: a module with ``use_running_average = False`` is in training mode (NNX's
  ``module.train()`` / ``module.eval()`` set it on every sub-module); :func:`in_training_mode`.
* **data-init**: a module whose ``needs_data_init`` is true awaits its data-dependent
  initialisation; :func:`needs_data_init`.

:data:`FROZEN` selects the state no training step changes (:class:`Buffer` and
:class:`DataInit`): it enters a compiled training loop as constants.
"""

from __future__ import annotations

import jax
from flax import nnx


class Buffer(nnx.Variable):
    """A non-trainable array that belongs to a layer (masks, permutations).

    It travels with the module (stacking, checkpoints) but the optimizer never sees it.

    >>> import jax.numpy as jnp
    >>> mask = Buffer(jnp.array([1.0, 0.0]))
    >>> isinstance(mask, nnx.Param), mask[...].tolist()
    (False, [1.0, 0.0])
    """


class DataInit(nnx.Variable):
    """State written once by a data-dependent initialisation (never trained, always saved).

    Not a :class:`Buffer`: it changes during a call, so :class:`~nflax.bijections.Stack` and
    the training loop carry it out of compiled code like batch statistics.
    """


# State that no training step changes: masks, permutations, data-dependent initialisation
# (done once, before the first step).
FROZEN = nnx.Any(Buffer, DataInit)


def in_training_mode(module: nnx.Module) -> bool:
    """True when ``module`` or a sub-module is in training mode (``use_running_average`` is
    False: batch statistics are used and running averages updated).

    >>> from nflax.bijections import BatchNorm
    >>> layer = BatchNorm(2)
    >>> before = in_training_mode(layer)
    >>> layer.eval()
    >>> before, in_training_mode(layer)
    (True, False)
    """
    return any(getattr(m, "use_running_average", True) is False for _, m in nnx.iter_graph(module))


def needs_data_init(module: nnx.Module) -> bool:
    """True when ``module`` or a sub-module awaits its data-dependent initialisation (its
    ``needs_data_init`` is true: read eagerly, false under a trace).

    >>> import jax.numpy as jnp
    >>> from nflax.bijections import ActNorm
    >>> layer = ActNorm(2)
    >>> before = needs_data_init(layer)
    >>> _ = layer.forward(jnp.array([[0.0, 1.0], [2.0, 3.0]]))
    >>> before, needs_data_init(layer)
    (True, False)
    """
    return any(getattr(m, "needs_data_init", False) for _, m in nnx.iter_graph(module))


def may_write_data_init(module: nnx.Module) -> bool:
    """True when a forward call of ``module`` may write its data-dependent initialisation:
    :func:`needs_data_init`, or its :class:`DataInit` state is traced (under ``nnx.jit`` or
    ``nnx.split``/``nnx.merge`` inside ``jax.jit``, where the flag is known only when the
    program runs).

    >>> import jax.numpy as jnp
    >>> from nflax.bijections import ActNorm
    >>> layer = ActNorm(2)
    >>> _ = layer.forward(jnp.ones((3, 2)))
    >>> may_write_data_init(layer), bool(nnx.jit(may_write_data_init)(layer))
    (False, True)
    """
    flags = jax.tree.leaves(nnx.state(module, DataInit))
    traced = any(isinstance(v, jax.core.Tracer) for v in flags)
    return traced or needs_data_init(module)
