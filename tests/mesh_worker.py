"""Run by tests/test_user_paths.py in a subprocess (it needs 4 virtual CPU devices, set before
JAX starts): ``fit``, ``fit_vi`` and ``nll`` on one device and on 4-device meshes whose
``"data"`` axis is Explicit (``jax.make_mesh``'s default) or Auto. Writes JSON to OUT.

usage: python mesh_worker.py OUT
"""

import json
import os
import sys


def _meshes() -> dict:
    import jax
    from jax.sharding import AxisType

    return {
        "one": None,
        "explicit": jax.make_mesh((4,), ("data",)),
        "auto": jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,)),
    }


def _results(mesh) -> dict:
    """Loss curves, NLLs and ELBOs of a tiny flow trained and scored with ``mesh``."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    import nflax

    x = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 250))  # 250 % 4 ≠ 0
    c = np.linspace(0, 1, len(x), dtype=np.float32)[:, None]
    out = {}
    flow = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    h = nflax.fit(flow, x, key=jax.random.key(1), steps=15, patience=50, mesh=mesh, progress=False)
    out["fit_full_batch"] = h.loss.tolist() + h.val_loss.tolist()
    out["nll"] = nflax.nll(flow, x, batch_size=100, mesh=mesh).tolist()  # a ragged last batch
    cond = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), context_dim=1, rngs=nnx.Rngs(0))
    h = nflax.fit(
        cond,
        x,
        context=c,
        key=jax.random.key(1),
        steps=15,
        batch_size=64,
        mesh=mesh,
        progress=False,
    )
    out["fit_minibatch_conditional"] = h.loss.tolist()
    out["nll_conditional"] = nflax.nll(cond, x, c, mesh=mesh).tolist()
    target = nflax.datasets.get_target("energy1")
    vi = nflax.flows.realnvp(2, num_layers=2, hidden=(8,), rngs=nnx.Rngs(0))
    h = nflax.fit_vi(
        vi,
        target.log_density,
        key=jax.random.key(1),
        steps=15,
        num_samples=64,
        eval_every=5,
        optimizer=optax.adam(1e-2),
        mesh=mesh,
        progress=False,
    )
    out["fit_vi"] = h.elbo.tolist() + h.log_z.tolist() + h.ess_fraction.tolist()
    return out


def _indivisible_error() -> str:
    import jax
    from flax import nnx

    import nflax

    flow = nflax.flows.realnvp(2, num_layers=1, hidden=(4,), rngs=nnx.Rngs(0))
    target = nflax.datasets.get_target("energy1")
    try:
        nflax.fit_vi(flow, target.log_density, key=jax.random.key(0), steps=1, num_samples=30,
                     devices="all")  # fmt: skip
    except ValueError as e:
        return str(e)
    return "no error"


def main(path: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    result = {name: _results(mesh) for name, mesh in _meshes().items()}
    result["device_count"] = jax.device_count()
    result["indivisible_error"] = _indivisible_error()
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
