"""Run by tests/test_parallel.py in subprocesses (it needs a fresh JAX per configuration).

usage: python parallel_worker.py MODE OUT [PROCESS_ID NUM_PROCESSES PORT]
MODE: "single" (one device), "virtual4" (4 virtual CPU devices), "multi" (jax.distributed).
Writes the loss trajectories as JSON to OUT.
"""

import json
import os
import sys

mode, out = sys.argv[1], sys.argv[2]
if mode == "virtual4":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from nflax import parallel  # noqa: E402

pid, nproc = 0, 1
if mode == "multi":
    pid, nproc, port = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    parallel.initialize(f"localhost:{port}", nproc, pid)

from flax import nnx  # noqa: E402

import nflax  # noqa: E402

x = np.asarray(nflax.datasets.get("banana").sample(jax.random.key(0), 256))
result = {"device_count": jax.device_count(), "process_count": jax.process_count()}


def run(data, **kw):
    flow = nflax.flows.realnvp(2, num_layers=3, hidden=(16,), rngs=nnx.Rngs(0))
    h = nflax.fit(flow, data, key=jax.random.key(1), steps=40, patience=100, progress=False, **kw)
    return flow, h


for bs in (None, 64):
    kw = {"batch_size": bs}
    if mode == "multi":
        block = len(x) // nproc
        flow, h = run(x[pid * block : (pid + 1) * block], devices="all", **kw)
    elif mode == "virtual4":
        flow, h = run(x, devices="all", **kw)
    else:
        flow, h = run(x, **kw)
    result[f"loss_{bs}"] = h.loss.tolist()
    result[f"val_{bs}"] = h.val_loss.tolist()

if mode == "virtual4":
    mesh = parallel.make_mesh("all")
    sharded = jax.device_put(x, parallel.batch_sharded(mesh))
    result["log_prob_sharded"] = np.asarray(flow.log_prob(sharded)).tolist()
    result["log_prob_plain"] = np.asarray(flow.log_prob(x)).tolist()
    result["samples_finite"] = bool(np.all(np.isfinite(flow.sample(jax.random.key(0), 8))))
    try:
        run(x, devices="all", batch_size=30)
    except ValueError as e:
        result["indivisible_error"] = str(e)

if pid == 0:
    with open(out, "w") as f:
        json.dump(result, f)
