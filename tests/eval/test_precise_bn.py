"""ssljax.eval.precise_bn: BN statistics re-estimated on clean images, by hand and on 8 devices."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ssljax.eval import evaluate
from ssljax.eval.precise_bn import precise_batch_stats
from ssljax.methods import build_method
from ssljax.parallel import make_mesh
from tests.util import tiny_config


class _PoolDenseBN(nn.Module):
  """Mean over pixels, a Dense layer, then BatchNorm: small enough to check by hand."""

  bn_momentum: float = 0.9
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.Dense(4, name="dense")(jnp.mean(x, axis=(1, 2)))
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        axis_name=self.axis_name if train else None, name="bn")(h)



_TRACES: list[tuple[int, ...]] = []


class _CountingPoolDenseBN(_PoolDenseBN):
  """`_PoolDenseBN` that records each trace (Python code runs only while jit traces)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    _TRACES.append(x.shape)
    return super().__call__(x, train)


@pytest.fixture(name="problem")
def _problem():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(50, 5, 5, 3), dtype=np.uint8)
  module = _PoolDenseBN()
  variables = module.init(jax.random.key(0), jnp.zeros((2, 5, 5, 3)), train=False)
  # Running statistics far from the data's, as after training on other views.
  variables = {**variables, "batch_stats": {"bn": {"mean": jnp.full((4,), 7.0),
                                                   "var": jnp.full((4,), 0.01)}}}
  return module, variables, images


def _by_hand(variables, images, batch_size):
  kernel = np.asarray(variables["params"]["dense"]["kernel"], np.float64)
  bias = np.asarray(variables["params"]["dense"]["bias"], np.float64)
  h = (images.astype(np.float64) / 255.0).mean(axis=(1, 2)) @ kernel + bias
  batches = [h[i:i + batch_size] for i in range(0, len(h) - batch_size + 1, batch_size)]
  return (np.mean([b.mean(0) for b in batches], 0), np.mean([b.var(0) for b in batches], 0))


def test_statistics_are_the_average_of_full_batch_statistics(problem):
  module, variables, images = problem
  new = precise_batch_stats(module, variables, images, batch_size=16)  # 3 full batches of 50
  mean, var = _by_hand(variables, images, 16)
  np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], var, rtol=1e-4, atol=1e-6)
  assert new["params"] is variables["params"]
  # Statistics of one batch standardise that batch in eval mode: mean 0, variance 1.
  one = precise_batch_stats(module, variables, images[:48], batch_size=48)
  out = module.apply(one, images[:48].astype(np.float32) / 255.0, train=False)
  np.testing.assert_allclose(np.mean(out, 0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.var(out, 0), 1.0, rtol=1e-2)  # BN eps 1e-5 vs small variances


def test_eight_device_mesh_equals_single_device(problem, num_devices):
  module, variables, images = problem
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = precise_batch_stats(module, variables, images, batch_size=16, mesh=mesh)
  single = precise_batch_stats(module, variables, images, batch_size=16)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               sharded["batch_stats"], single["batch_stats"])


def test_errors_name_the_problem(problem):
  module, variables, images = problem
  with pytest.raises(ValueError, match="at least one full batch"):
    precise_batch_stats(module, variables, images[:8], batch_size=16)
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    precise_batch_stats(module, variables, images, batch_size=12,
                        mesh=Mesh(np.array(jax.devices()), ("data",)))

  class NoFields(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      return nn.BatchNorm(use_running_average=not train)(jnp.mean(x, axis=(1, 2)))

  plain = NoFields()
  plain_vars = plain.init(jax.random.key(0), jnp.zeros((2, 5, 5, 3)), train=False)
  with pytest.raises(ValueError, match="eval.precise_bn_examples = 0"):
    precise_batch_stats(plain, plain_vars, images, batch_size=16)


def test_evaluation_uses_reestimated_statistics_when_configured(tmp_path, num_devices):
  config = tiny_config(str(tmp_path))
  method = build_method(config)
  images = np.random.default_rng(1).integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
  params, method_state = method.init(jax.random.key(0), [jnp.zeros((4, 8, 8, 1))] * 2)
  state = types.SimpleNamespace(params=params, method_state=method_state)
  mesh = make_mesh()
  stats = method.eval_variables(params, method_state)["batch_stats"]
  assert config.eval.precise_bn_examples == 0  # off by default: the running statistics
  running = evaluate.encoder_variables(config, method, state, mesh, images)
  jax.tree.map(np.testing.assert_array_equal, running["batch_stats"], stats)

  config.eval.precise_bn_examples = 32
  config.eval.batch_size = 16
  recalibrated = evaluate.encoder_variables(config, method, state, mesh, images)
  expected = precise_batch_stats(
      method.encoder, method.eval_variables(params, method_state),
      images[evaluate._subset_index(len(images), 32, config.seed + 2)], batch_size=16)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               recalibrated["batch_stats"], expected["batch_stats"])
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), recalibrated["batch_stats"], stats)
  assert all(jax.tree.leaves(changed))

  # How many images the statistics come from, as export and the kNN protocol report it: the
  # whole batches of the images drawn (32 = 2 x 16; 36 drawn -> 2 x 16 = 32; 8 -> one batch
  # of 8 = the mesh size), and 0 when the running statistics are kept.
  for examples, used in ((32, 32), (36, 32), (8, 8), (0, 0)):
    config.eval.precise_bn_examples = examples
    _, count = evaluate.encoder_variables_and_bn_images(config, method, state, mesh, images)
    assert count == used, examples


def test_evaluation_rejects_fewer_examples_than_devices(tmp_path, num_devices):
  config = tiny_config(str(tmp_path))
  method = build_method(config)
  params, method_state = method.init(jax.random.key(0), [jnp.zeros((4, 8, 8, 1))] * 2)
  state = types.SimpleNamespace(params=params, method_state=method_state)
  config.eval.precise_bn_examples = 4
  images = np.zeros((40, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match="eval.precise_bn_examples = 4 gives 4 images, fewer "
                     "than the 8 devices"):
    evaluate.encoder_variables(config, method, state, make_mesh(), images)


def test_repeated_calls_compile_once_and_use_the_new_variables(problem):
  # The kNN monitor re-estimates the statistics every few epochs with new parameters.
  _, variables, images = problem
  module = _CountingPoolDenseBN()
  _TRACES.clear()
  first = precise_batch_stats(module, variables, images, batch_size=16)
  moved = {**variables, "params": jax.tree.map(lambda p: p * 3.0, variables["params"])}
  second = precise_batch_stats(module, moved, images, batch_size=16)
  assert _TRACES == [(16, 5, 5, 3)]
  for new, source in ((first, variables), (second, moved)):
    mean, var = _by_hand(source, images, 16)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], var, rtol=1e-4, atol=1e-6)


def test_encode_fn_is_one_object_per_encoder(tmp_path):
  # extract_features caches its compiled function per apply_fn object.
  method = build_method(tiny_config(str(tmp_path)))
  assert evaluate._encode_fn(method) is evaluate._encode_fn(method)
