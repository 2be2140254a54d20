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

# Several tests compile the same programs (a resumed run re-jits its step; most files train the
# same tiny configs). One persistent compilation cache for the whole test run turns those
# recompiles into cache hits: made by the first process that loads this file (pytest-xdist's
# controller, or pytest itself without -n), which removes it at exit, and passed through the
# environment to the xdist workers and to the subprocesses tests start (a CLI run compiles what
# an in-process run of the same config compiled). A size limit switches on JAX's file lock, so
# that concurrent writers never leave a half-written entry for a reader; it needs `filelock`,
# without which entries are written unlocked (a torn read is a warning and a recompile).
_CACHE_ENV = "SSLJAX_TEST_JAX_CACHE"
if not os.environ.get(_CACHE_ENV):
  os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="ssljax-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
try:
  import filelock  # noqa: F401
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(32 << 30)
except ImportError:
  pass

import jax  # noqa: E402  (after the flag on purpose)
import pytest  # noqa: E402

# JAX reads the variables above at its first import; one before this file would lose them.
assert jax.config.jax_compilation_cache_dir == os.environ["JAX_COMPILATION_CACHE_DIR"], (
    "jax was imported before tests/conftest.py, so the test run has no compilation cache")

# On the CPU build of jax 0.10, partitionable threefry makes XLA compile jax.random.normal on
# rank >= 3 arrays (every conv kernel init) several times slower; tests run on CPU only, and
# ssljax draws its training randomness per example, so the non-partitionable form is used here.
jax.config.update("jax_threefry_partitionable", False)

# orbax saves an array replicated over several devices "replica-parallel" by default (except
# on GPU): every replica writes a slice, cut by an eager jax.lax.slice per array and replica,
# each compiled on first use. On the 8 virtual CPU devices that is ~1000 dispatches per save
# (moco's resume test spent 6.9 of its 46 s in them, under cProfile), for no gain: all 8 share
# one host's memory. The tests save each array from its first replica (the same values; a
# restore reads either).
# Subprocess runs (the CLI and multi-process tests) keep orbax's default.
# Unlike orbax's default handler, this one writes no array-metadata files (orbax keeps there
# what it needs for arrays such as typed PRNG keys; ssljax saves keys as raw key data).
import orbax.checkpoint as ocp  # noqa: E402
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)



@pytest.fixture(scope="session")
def num_devices() -> int:
  assert jax.device_count() == 8, "conftest must run before anything initialises JAX"
  return jax.device_count()


# pytest-xdist's --dist loadfile hands a worker a whole file at a time. By default it queues
# the files with the most tests first, which left files of one or a few long tests (the
# bucket-workdir test, the ImageNet recipes, the multi-process runs) for the end, one worker
# finishing them while the other idled. Longest first balances the two workers instead: these
# files, in this order (summed test time, full suite on 2 cores, 2026-12-03: 152 s down to
# 25 s), then every other file in collection order.
_LONGEST_FILES_FIRST = (
    "tests/train/test_loop.py", "tests/train/test_multiprocess.py",
    "tests/methods/test_mixed_precision.py", "tests/methods/test_addons.py",
    "tests/methods/test_uota.py", "tests/methods/test_cld.py", "tests/train/test_step.py",
    "tests/methods/test_metamask.py", "tests/train/test_bucket_workdir.py",
    "tests/losses/test_contrastive.py", "tests/analysis/test_analyze.py",
    "tests/train/test_faults.py", "tests/methods/test_byol.py", "tests/test_imagenet_configs.py",
    "tests/methods/test_swav.py", "tests/methods/test_dino.py",
    "tests/test_accel_step_benchmark.py", "tests/losses/test_uota.py", "tests/losses/test_issl.py",
    "tests/methods/test_moco.py", "tests/methods/test_npid.py", "tests/test_configs.py",
    "tests/models/test_heads.py", "tests/losses/test_cld.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(_LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


def pytest_sessionfinish(session, exitstatus):
  # After the session pytest collects garbage five times (to report late unraisable
  # exceptions), and every collection runs jax's own collector: on a worker that ran half the
  # suite that took over 5 s, after which execnet, whose worker had already reported itself
  # finished, interrupts it with SIGINT, printing a KeyboardInterrupt "ignored in
  # _xla_gc_callback" at the end of a passing run. Here, before pytest-xdist reports the worker
  # finished, JAX's caches are dropped and the garbage collected once; what is left alive is
  # frozen, so pytest's collections have nothing to traverse.
  del session, exitstatus
  import gc
  jax.clear_caches()
  gc.collect()
  gc.freeze()
