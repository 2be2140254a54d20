"""benchmarks/cpu_alternatives.py: the two rewrites it times compute what they replace (the
custom-vjp BatchNorm's gradients and running statistics are Flax's; im2col convolution is
XLA's convolution), on every convolution shape of the default encoder; the timing is not
tested."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.util import load_benchmark


@pytest.fixture(scope="module")
def bench():
  return load_benchmark("cpu_alternatives")


def test_im2col_convolution_and_its_gradients_equal_xla(bench):
  rng = np.random.default_rng(0)
  shapes = bench.encoder_conv_shapes(2, 9)
  assert len(shapes) == 10
  # One of each kind (3x3 stride 2 from one channel, 3x3 stride 1, 1x1 stride 2, 1x1 stride 1).
  for x_shape, k_shape, stride in (shapes[0], shapes[1], shapes[5], shapes[9]):
    x = jnp.asarray(rng.random(x_shape, np.float32))
    kernel = jnp.asarray(rng.normal(size=k_shape).astype(np.float32))
    pad = [(k_shape[0] // 2,) * 2, (k_shape[1] // 2,) * 2]
    grads = [jax.grad(lambda a, b, f=f: jnp.sum(jnp.sin(f(a, b, stride, pad))), argnums=(0, 1))(
        x, kernel) for f in (bench.conv_xla, bench.conv_im2col)]
    np.testing.assert_allclose(bench.conv_im2col(x, kernel, stride, pad),
                               bench.conv_xla(x, kernel, stride, pad), rtol=1e-4, atol=1e-4)
    for a, b in zip(*grads):  # float32 sums in another order: relative to the largest entry
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_custom_vjp_batchnorm_matches_flax_under_sync_axis():
  bench = load_benchmark("cpu_alternatives")
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3, 3, 5)).astype(np.float32) * 2 + 1)
  outs = []
  for bn in (nn.BatchNorm(momentum=0.9, axis_name="d"),
             bench.custom_vjp_batchnorm()(momentum=0.9, axis_name="d")):
    variables = bn.init(jax.random.key(0), x[:2], use_running_average=True)

    def loss(params, xs, bn=bn, variables=variables):
      y, stats = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, xs,
                          use_running_average=False, mutable=["batch_stats"])
      return jnp.sum(jnp.cos(y) * jnp.arange(5.0)), stats

    # Two "devices" of 4 rows each, statistics averaged over the named axis.
    grads, stats = jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True), in_axes=(None, 0),
                            axis_name="d")(variables["params"], x.reshape(2, 4, 3, 3, 5))
    outs.append((grads, stats))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *outs)


@pytest.mark.slow  # ~20 s of compiles; the two tests above cover what it computes
def test_the_script_writes_its_table_and_json(bench, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
  out = tmp_path / "alt.json"
  report = bench.main(["--batch", "4", "--size", "8", "--rounds", "1", "--out", str(out)])
  stored = json.loads(out.read_text())
  assert stored["batchnorm"]["max_relative_gradient_difference"] < 1e-4
  assert stored["batchnorm"]["max_running_stat_difference"] < 1e-6
  assert len(stored["convolution"]["layers"]) == 10
  assert all(r["max_output_difference"] < 1e-4 for r in stored["convolution"]["layers"])
  assert stored["command"].startswith("python benchmarks/cpu_alternatives.py --batch 4")
  assert report["rounds"] == 1 and "BatchNorm: encoder forward + backward" in capsys.readouterr(
      ).out
