"""benchmarks/cpu_alternatives.py: the rewrites it times compute what they replace (the
custom-vjp BatchNorm's gradients and running statistics are Flax's; im2col convolution is
XLA's convolution, on every convolution shape of the default encoder; the per-layer
convolution and the masked ReLU inside the train step give its loss and take effect in its
compiled program); the timing is not tested."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.util import load_benchmark, tiny_config


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


def test_conv_by_layer_is_flax_conv_with_its_gradients(bench):
  """Through flax.linen.Conv's own call (its dimension numbers and padding), each kind of
  layer: 1x1 stride 2 (slice + product), the one-channel stem and a padded 1x1 of 3 channels
  (im2col), and, left to lax, a 3x3 of 16 channels, a padded 1x1 of 8 and 'SAME' padding."""
  import flax.linen as nn
  rng = np.random.default_rng(2)
  for cin, cout, kernel, stride, pad in ((16, 8, (1, 1), 2, [(0, 0), (0, 0)]),
                                         (1, 8, (3, 3), 2, [(1, 1), (1, 1)]),
                                         (3, 4, (1, 1), 1, [(1, 1), (1, 1)]),
                                         (16, 8, (3, 3), 1, [(1, 1), (1, 1)]),
                                         (8, 4, (1, 1), 1, [(1, 1), (1, 1)]),
                                         (8, 4, (3, 3), 2, "SAME")):
    x = jnp.asarray(rng.normal(size=(3, 9, 9, cin)).astype(np.float32))
    convs = [nn.Conv(cout, kernel, stride, padding=pad, use_bias=False, **extra)
             for extra in ({}, {"conv_general_dilated": bench.conv_by_layer})]
    params = convs[0].init(jax.random.key(0), x)
    outs = [jax.value_and_grad(lambda p, a, c=c: jnp.sum(jnp.sin(c.apply(p, a))),
                               argnums=(0, 1))(params, x) for c in convs]
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max())), outs[1][1], outs[0][1])


def test_conv_by_layer_passes_other_ranks_to_lax(bench):
  import flax.linen as nn
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 5)).astype(np.float32))
  convs = [nn.Conv(3, (3,), padding=[(1, 1)], **extra)
           for extra in ({}, {"conv_general_dilated": bench.conv_by_layer})]
  params = convs[0].init(jax.random.key(0), x)
  np.testing.assert_array_equal(convs[1].apply(params, x), convs[0].apply(params, x))


def test_relu_mask_has_relus_values_and_gradient_including_at_zero(bench):
  import flax.linen as nn
  x = jnp.asarray([-2.0, -0.0, 0.0, 1e-30, 3.0])
  np.testing.assert_array_equal(bench.relu_mask(x), nn.relu(x))
  np.testing.assert_array_equal(jax.grad(lambda a: jnp.sum(bench.relu_mask(a) * 2.0))(x),
                                jax.grad(lambda a: jnp.sum(nn.relu(a) * 2.0))(x))
  assert bench.relu_mask(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_step_rewrite_restores_flax_and_refuses_unknown_names(bench):
  import flax.linen as nn
  conv, relu = nn.Conv, nn.relu
  with pytest.raises(RuntimeError):
    with bench.step_rewrite("conv_by_layer"):
      assert nn.Conv is not conv
      raise RuntimeError("inside")
  with bench.step_rewrite("relu_mask"):
    assert nn.relu is bench.relu_mask and nn.Conv is conv
  assert (nn.Conv, nn.relu) == (conv, relu)
  with pytest.raises(ValueError, match="unknown rewrite 'im2col'.*conv_by_layer"):
    with bench.step_rewrite("im2col"):
      pass


def test_rewrites_in_the_train_step_change_its_program_not_its_loss(bench, tmp_path):
  report = bench.in_step(tiny_config(str(tmp_path)), rounds=1)
  hlo = report["hlo"]
  # The tiny ResNet's 1x1 shortcuts and its one-channel stem no longer compile to
  # convolutions (forward, input and weight gradients); the masked ReLU is another program.
  assert hlo["conv_by_layer"]["convolutions"] < hlo["current"]["convolutions"]
  assert hlo["relu_mask"]["convolutions"] == hlo["current"]["convolutions"]
  # The masked ReLU adds no constant array of its own; where XLA writes out max(x, 0)'s zero
  # (this jaxlib does, for the ReLU fused into the pooling sum) it removes that one.
  current = list(hlo["current"]["materialised_broadcasts"])
  for shape in hlo["relu_mask"]["materialised_broadcasts"]:
    current.remove(shape)  # ValueError if relu_mask materialises one the current step does not
  assert len({h["sha256"] for h in hlo.values()}) == 3
  for name in ("conv_by_layer", "relu_mask"):
    assert report["first_loss_difference"][name] < 1e-5
    assert report["first_step"][name]["train/grad_norm"] == pytest.approx(
        report["first_step"]["current"]["train/grad_norm"], rel=1e-4)
    assert report["over_current"][name] > 0
  assert report["views"][1] == 2


@pytest.mark.slow  # ~20 s of compiles; the two tests above cover what it computes
def test_the_script_writes_its_table_and_json(bench, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
  out = tmp_path / "alt.json"
  report = bench.main(["--batch", "4", "--size", "8", "--rounds", "1", "--config", "",
                       "--out", str(out)])
  stored = json.loads(out.read_text())
  assert stored["batchnorm"]["max_relative_gradient_difference"] < 1e-4
  assert stored["batchnorm"]["max_running_stat_difference"] < 1e-6
  assert len(stored["convolution"]["layers"]) == 10 and "train_step" not in stored
  assert all(r["max_output_difference"] < 1e-4 for r in stored["convolution"]["layers"])
  assert stored["command"].startswith("python benchmarks/cpu_alternatives.py --batch 4")
  assert report["rounds"] == 1 and "BatchNorm: encoder forward + backward" in capsys.readouterr(
      ).out
