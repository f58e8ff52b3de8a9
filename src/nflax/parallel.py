"""Data-parallel training over a ``jax.sharding.Mesh``, on one host or many.

nflax uses JAX's own machinery only: a 1D mesh with a ``"data"`` axis (Auto, or Explicit as
``jax.make_mesh`` makes it), the minibatch sharded over it (``NamedSharding(mesh, P("data"))``),
parameters and optimizer state replicated; the compiler inserts the gradient all-reduce.
Across hosts, :func:`initialize` starts JAX's distributed runtime
(``jax.distributed.initialize``), every process contributes its own shard of the data, and the
same :func:`nflax.fit` call runs as one SPMD program.

>>> mesh = make_mesh("all")
>>> mesh.axis_names
('data',)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
    **kwargs,
) -> None:
    """Start JAX's distributed runtime: one call per process, before any other JAX work.

    Arguments go to ``jax.distributed.initialize`` (on SLURM or TPU pods they can all be
    omitted: JAX detects them). On CPU, cross-process collectives use ``gloo``.
    """
    if num_processes is not None and int(num_processes) < 1:
        raise ValueError(f"initialize: num_processes must be ≥ 1, received {num_processes}")
    if (
        process_id is not None
        and num_processes is not None
        and not (0 <= int(process_id) < int(num_processes))
    ):
        raise ValueError(
            f"initialize: process_id must be in [0, {num_processes}), received {process_id}"
        )
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(
            f"initialize: coordinator_address must be HOST:PORT, received {coordinator_address!r}"
        )
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def make_mesh(devices: str | Sequence[jax.Device] = "all") -> Mesh:
    """A 1D mesh named ``"data"`` over ``devices`` (``"all"``: every device of every host)."""
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"make_mesh: devices must be 'all' or a list, received {devices!r}")
        devs = jax.devices()
    else:
        devs = list(devices)
        if not devs:
            raise ValueError("make_mesh: received an empty list of devices")
    return Mesh(np.asarray(devs), (DATA_AXIS,))


def resolve_mesh(
    mesh: Mesh | None, devices: str | Sequence | None, who: str = "fit"
) -> Mesh | None:
    """The mesh ``who`` (``fit``, ``fit_vi``, ``nll``) should use, from its ``mesh=`` /
    ``devices=`` arguments. The ``"data"`` axis may be Auto or Explicit."""
    if mesh is not None and devices is not None:
        raise ValueError(f"{who}: give mesh= or devices=, not both")
    if devices is not None:
        return make_mesh(devices)
    if mesh is not None and DATA_AXIS not in mesh.axis_names:
        raise ValueError(
            f"{who}: the mesh needs an axis named {DATA_AXIS!r}, received axes {mesh.axis_names}"
        )
    return mesh


def data_size(mesh: Mesh) -> int:
    """Number of devices along the ``"data"`` axis."""
    return int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_rows(tree, mesh: Mesh) -> tuple:
    """Host arrays → device arrays whose rows are split over the ``"data"`` axis; each array's
    rows are padded with zeros to a multiple of the axis size (the caller drops the padding)."""
    ndev = data_size(mesh)

    def pad(a: np.ndarray) -> np.ndarray:
        extra = -len(a) % ndev
        return np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)]) if extra else a

    return jax.device_put(jax.tree.map(pad, tree), batch_sharded(mesh))


def shard_rows(tree, mesh: Mesh):
    """Inside a jitted function: split the rows (leading axis) of every array in ``tree`` over
    the mesh's ``"data"`` axis.

    An Explicit axis (``jax.make_mesh``'s default) is resharded (``jax.sharding.reshard``);
    an Auto axis gets a sharding constraint (``jax.lax.with_sharding_constraint``), which the
    compiler propagates.
    """
    if is_explicit(mesh):
        return jax.sharding.reshard(tree, batch_sharded(mesh))
    return jax.lax.with_sharding_constraint(tree, batch_sharded(mesh))


def is_explicit(mesh: Mesh) -> bool:
    """True when the mesh's ``"data"`` axis is Explicit (sharding in types)."""
    return mesh.axis_types[mesh.axis_names.index(DATA_AXIS)] == AxisType.Explicit


def gather_process_data(x: np.ndarray) -> np.ndarray:
    """Every process's local rows, concatenated in process order (identical on all processes).

    With one process this is ``x`` itself. All processes must hold the same number of rows.
    """
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    counts = multihost_utils.process_allgather(np.asarray([x.shape[0]]))
    if len(set(np.asarray(counts).ravel().tolist())) != 1:
        raise ValueError(
            f"fit: every process must pass the same number of rows; received "
            f"{np.asarray(counts).ravel().tolist()}"
        )
    full = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(full)


def is_primary() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0
