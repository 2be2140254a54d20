"""Tests for ssljax.eval.features: batching, padding, sharding over the 'data' mesh axis."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ssljax.eval.features import extract_features

_DIM = 5


def _pool_and_project(variables: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  """Mean over pixels, then a fixed linear map: [b, H, W, C] -> [b, D]."""
  return jnp.mean(x, axis=(1, 2)) @ variables["w"] + variables["b"]


def _reference(variables: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
  pooled = (images.astype(np.float64) / 255.0).mean(axis=(1, 2))
  return pooled @ np.asarray(variables["w"], np.float64) + np.asarray(variables["b"], np.float64)


@pytest.fixture(name="problem")
def _problem() -> tuple[dict[str, np.ndarray], np.ndarray]:
  rng = np.random.default_rng(0)
  variables = {"w": rng.normal(size=(3, _DIM)).astype(np.float32),
               "b": rng.normal(size=(_DIM,)).astype(np.float32)}
  images = rng.integers(0, 256, size=(37, 6, 6, 3), dtype=np.uint8)
  return variables, images


def test_matches_reference_with_partial_last_batch(problem):
  variables, images = problem
  features = extract_features(_pool_and_project, variables, images, batch_size=16)
  assert features.shape == (37, _DIM)
  assert features.dtype == np.float32
  np.testing.assert_allclose(features, _reference(variables, images), rtol=1e-5, atol=1e-5)


def test_eight_device_mesh_equals_single_device(problem, num_devices):
  variables, images = problem
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = extract_features(_pool_and_project, variables, images, batch_size=16, mesh=mesh)
  single = extract_features(_pool_and_project, variables, images, batch_size=16)
  assert sharded.shape == (37, _DIM)
  # Each device computes 2 rows of a 16-row batch; XLA's CPU kernels may round a 2-row and a
  # 16-row matmul differently (seen on AVX-512 Xeons: 1-ulp differences), so float32
  # rounding, not bit equality, is the contract.
  np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


def test_apply_fn_sees_unit_interval_floats():
  seen = {}

  def record_range(variables, x):
    del variables
    seen["dtype"] = x.dtype
    return jnp.stack([x.min(axis=(1, 2, 3)), x.max(axis=(1, 2, 3))], axis=1)

  images = np.zeros((3, 2, 2, 1), np.uint8)
  images[0] = 255
  features = extract_features(record_range, {}, images, batch_size=2)
  assert seen["dtype"] == jnp.float32
  np.testing.assert_allclose(features, [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])


def test_batch_size_not_divisible_by_mesh_is_rejected(problem):
  variables, images = problem
  mesh = Mesh(np.array(jax.devices()), ("data",))
  with pytest.raises(ValueError, match="divisible"):
    extract_features(_pool_and_project, variables, images, batch_size=12, mesh=mesh)


def test_non_uint8_images_are_rejected(problem):
  variables, images = problem
  with pytest.raises(AssertionError):
    extract_features(_pool_and_project, variables, images.astype(np.float32), batch_size=8)


def _counting_apply(traces: list):
  """_pool_and_project that appends its input shape to `traces` each time it is traced."""

  def apply(variables, x):
    traces.append(x.shape)
    return _pool_and_project(variables, x)

  return apply


def test_traces_once_for_all_batches(problem):
  variables, images = problem
  traces = []
  extract_features(_counting_apply(traces), variables, images, batch_size=16)
  assert traces == [(16, 6, 6, 3)]


def test_later_calls_with_the_same_apply_fn_reuse_the_compiled_function(problem):
  # The training loop's kNN monitor calls extract_features every few epochs with new
  # variables; it must not recompile, and must not reuse the old variables either.
  variables, images = problem
  traces = []
  counting_apply = _counting_apply(traces)

  first = extract_features(counting_apply, variables, images, batch_size=16)
  moved = {"w": variables["w"] * 2.0, "b": variables["b"] - 1.0}
  second = extract_features(counting_apply, moved, images[:20], batch_size=16)
  assert traces == [(16, 6, 6, 3)]
  np.testing.assert_allclose(first, _reference(variables, images), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(second, _reference(moved, images[:20]), rtol=1e-5, atol=1e-5)


_TWO_PROCESS_WORKER = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from ssljax.eval.features import extract_features
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    images = rng.integers(0, 256, size=(21, 4, 4, 3), dtype=np.uint8)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.is_multi_process
    apply_fn = lambda v, x: jnp.mean(x, axis=(1, 2)) @ v
    features = extract_features(apply_fn, w, images, batch_size=8, mesh=mesh)
    expected = (images / 255.0).mean(axis=(1, 2)) @ w
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)

    # A streamed split: each process decodes only its devices' rows (rows 0-3 of a batch of 8
    # on process 0's two devices, 4-7 on process 1's), and both end with every label. With 18
    # images, process 1 holds only padding in the last batch.
    from ssljax.eval.evaluate import _StreamedSplit

    class Source:
      def __init__(self):
        self.read = []
      def get(self, indices, resize_side=None):
        self.read.extend(int(i) for i in indices)
        return {"image": images[indices], "label": 100 + np.asarray(indices)}

    source = Source()
    split = _StreamedSplit(source, np.arange(18))
    features = extract_features(apply_fn, w, split.images, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(features, expected[:18], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(split.labels, 100 + np.arange(18))
    process = jax.process_index()
    mine = [i for i in range(18) if (i % 8) // 4 == process]
    assert sorted(source.read) == mine, (process, source.read)

    # Three images: process 1's rows are all padding, so it reads one image for the shape.
    source = Source()
    split = _StreamedSplit(source, np.arange(3))
    features = extract_features(apply_fn, w, split.images, batch_size=8, mesh=mesh)
    np.testing.assert_allclose(features, expected[:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(split.labels, [100, 101, 102])
    assert sorted(source.read) == ([0, 1, 2] if process == 0 else [0]), (process, source.read)

    # Precise BN over a stream reads the same way and gives the in-memory array's statistics.
    import flax.linen as nn
    from ssljax.eval.precise_bn import precise_batch_stats

    class Pooled(nn.Module):
      bn_momentum: float = 0.9
      axis_name: str | None = None
      @nn.compact
      def __call__(self, x, train=False):
        return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            axis_name=self.axis_name)(x.mean(axis=(1, 2)))

    module = Pooled()
    variables = module.init(jax.random.PRNGKey(0), images[:1] / 255.0)
    source = Source()
    split = _StreamedSplit(source, np.arange(21))
    streamed = precise_batch_stats(module, variables, split.images, batch_size=8, mesh=mesh)
    in_memory = precise_batch_stats(module, variables, images, batch_size=8, mesh=mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), streamed, in_memory)
    assert sorted(source.read) == [i for i in range(16) if (i % 8) // 4 == process]
""")


def test_two_processes_each_receive_all_features_and_read_only_their_rows():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    address = f"localhost:{s.getsockname()[1]}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
  workers = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER, address, str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
  try:
    for worker in workers:
      output, _ = worker.communicate(timeout=120)
      assert worker.returncode == 0, output.decode()[-3000:]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
