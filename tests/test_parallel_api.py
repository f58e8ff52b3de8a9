"""nflax.parallel's functions one by one, on 4 virtual CPU devices (a subprocess: the device
count is fixed when JAX starts). Training on meshes is tested in test_parallel.py."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nflax import parallel

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, PartitionSpec as P
    from nflax import parallel

    out = {}
    mesh = parallel.make_mesh("all")
    out["axis_names"] = list(mesh.axis_names)
    out["mesh_devices"] = [d.id for d in mesh.devices.ravel()]
    out["devices"] = [d.id for d in jax.devices()]
    out["data_size"] = parallel.data_size(mesh)
    out["two"] = parallel.data_size(parallel.make_mesh(jax.devices()[:2]))
    out["replicated"] = str(parallel.replicated(mesh).spec)
    out["batch_sharded"] = str(parallel.batch_sharded(mesh).spec)
    out["resolved_all"] = parallel.data_size(parallel.resolve_mesh(None, "all"))
    out["resolved_same"] = parallel.resolve_mesh(mesh, None) is mesh
    out["resolved_none"] = parallel.resolve_mesh(None, None) is None
    x = np.arange(12.0, dtype=np.float32).reshape(6, 2)
    put = parallel.put_rows({"x": x}, mesh)["x"]
    out["put"] = np.asarray(put).tolist()
    out["put_spec"] = str(put.sharding.spec)
    out["put_shards"] = sorted(
        (int(s.index[0].start), list(s.data.shape)) for s in put.addressable_shards
    )
    explicit = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    auto = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    out["is_explicit"] = [parallel.is_explicit(explicit), parallel.is_explicit(auto)]
    for name, m in [("explicit", explicit), ("auto", auto)]:
        y = jax.device_put(jnp.arange(8.0).reshape(8, 1), parallel.replicated(m))
        z = jax.jit(lambda a, m=m: parallel.shard_rows(a, m) * 2)(y)
        out["shard_rows_" + name] = [np.asarray(z).ravel().tolist(), z.sharding.spec[0]]
    out["gather_is_identity"] = parallel.gather_process_data(x) is x
    out["is_primary"] = parallel.is_primary()
    json.dump(out, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def four():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_make_mesh_data_size_and_resolve_mesh(four):
    assert four["axis_names"] == ["data"]
    assert four["mesh_devices"] == four["devices"] and len(four["devices"]) == 4
    assert four["data_size"] == 4 and four["two"] == 2 and four["resolved_all"] == 4
    assert four["resolved_same"] and four["resolved_none"]
    with pytest.raises(ValueError, match="received an empty list of devices"):
        parallel.make_mesh([])


def test_shardings_put_rows_and_shard_rows(four):
    assert four["replicated"] == "P()"
    assert four["batch_sharded"] == "P('data',)"
    # 6 rows padded with zeros to 8, two rows on each of the 4 devices
    want = np.concatenate([np.arange(12.0).reshape(6, 2), np.zeros((2, 2))])
    np.testing.assert_array_equal(four["put"], want)
    assert four["put_spec"] == "P('data',)"
    assert four["put_shards"] == [[0, [2, 2]], [2, [2, 2]], [4, [2, 2]], [6, [2, 2]]]
    assert four["is_explicit"] == [True, False]
    for name in ("explicit", "auto"):  # the values untouched, the rows split over the axis
        values, spec = four[f"shard_rows_{name}"]
        assert values == [2.0 * i for i in range(8)] and spec == "data"


def test_one_process_gather_primary_and_initialize_checks(four):
    assert four["gather_is_identity"] and four["is_primary"]
    assert parallel.is_primary()  # and here, in the test process
    x = np.ones((3, 2))
    assert parallel.gather_process_data(x) is x
    with pytest.raises(ValueError, match="num_processes must be ≥ 1, received 0"):
        parallel.initialize("localhost:1234", 0, 0)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), received -1"):
        parallel.initialize("localhost:1234", 2, -1)
