"""Test set-up: 8 virtual CPU devices, so sharded code paths run in CI without accelerators.

The flag must be set before JAX initialises its backends, hence at import time here.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The suite is bound by XLA compile time (tiny models, few steps): LLVM's optimisation level
# changes how fast the CPU code runs, not what it computes, and at 0 a train step compiles in
# half the time (tests/methods/test_moco.py 61 s -> 33 s on 2 cores). An optimisation level
# given in XLA_FLAGS wins (e.g. 3, the default users get).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the flag on purpose)
import pytest  # noqa: E402

# On the CPU build of jax 0.10, partitionable threefry makes XLA compile jax.random.normal on
# rank >= 3 arrays (every conv kernel init) several times slower; tests run on CPU only, and
# ssljax draws its training randomness per example, so the non-partitionable form is used here.
jax.config.update("jax_threefry_partitionable", False)

# Several tests compile the same programs (e.g. a resumed run re-jits its step). A persistent
# compilation cache private to this test session turns those recompiles into cache hits.
_CACHE_DIR = tempfile.mkdtemp(prefix="ssljax-test-jax-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def num_devices() -> int:
  assert jax.device_count() == 8, "conftest must run before anything initialises JAX"
  return jax.device_count()
