import atexit
import os
import shutil
import tempfile

# a script run by test_parallel, not a test module (importing it would start a worker)
collect_ignore = ["parallel_worker.py"]

os.environ.setdefault("MPLBACKEND", "Agg")
# `nflax` commands run by the tests keep their compiled programs (JAX's persistent compilation
# cache) in a folder of this test session, never in the user's ~/.cache/nflax
os.environ.setdefault("NFLAX_CACHE_DIR", tempfile.mkdtemp(prefix="nflax-test-cache-"))
atexit.register(shutil.rmtree, os.environ["NFLAX_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)
