import os

# a script run by test_parallel, not a test module (importing it would start a worker)
collect_ignore = ["parallel_worker.py"]

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
