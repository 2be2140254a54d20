"""MLPHead: layer structure, the Linear-BN-ReLU computation by hand, last BN, linearity.

DINOHead: both layouts by hand, the unit-norm last layer (weight norm with g = 1).

NormLinear / NormMLP (CLD): cosine outputs by hand, scale invariance, the unit-column init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.models import MLPHead
from ssljax.models.heads import DINOHead, NormLinear, NormMLP

_KEY = jax.random.key(0)
_EPS = 1e-5


def _shapes(head: MLPHead, in_dim: int = 5, batch: int = 4):
  return jax.eval_shape(head.init, _KEY, jax.ShapeDtypeStruct((batch, in_dim), jnp.float32))


def _shape_tree(tree):
  return jax.tree.map(lambda leaf: leaf.shape, tree)


def _random_variables(head: MLPHead, in_dim: int, seed: int = 0):
  """Every parameter random (kernels, biases, BN scales and offsets); BN running stats set
  to random means and positive variances, so no term of the computation is trivially 0 or 1."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "var":
      values = rng.uniform(0.5, 2.0, size=leaf.shape)
    elif name == "scale":
      values = rng.uniform(0.5, 1.5, size=leaf.shape)
    else:
      values = rng.normal(size=leaf.shape) / (np.sqrt(leaf.shape[0]) if leaf.ndim == 2 else 1)
    return jnp.asarray(values, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, _shapes(head, in_dim))


def _batch_norm(h, mean, var, scale=1.0, bias=0.0):
  return (h - mean) / np.sqrt(var + _EPS) * scale + bias


def test_layer_structure():
  head = MLPHead(hidden_dim=16, out_dim=8, num_layers=3)
  variables = _shapes(head)
  assert _shape_tree(variables["params"]) == {
      "dense1": {"kernel": (5, 16), "bias": (16,)}, "bn1": {"scale": (16,), "bias": (16,)},
      "dense2": {"kernel": (16, 16), "bias": (16,)}, "bn2": {"scale": (16,), "bias": (16,)},
      "dense3": {"kernel": (16, 8), "bias": (8,)}}
  assert _shape_tree(variables["batch_stats"]) == {
      "bn1": {"mean": (16,), "var": (16,)}, "bn2": {"mean": (16,), "var": (16,)}}

  no_bias = _shapes(MLPHead(hidden_dim=16, out_dim=8, num_layers=2, use_bias=False))
  assert _shape_tree(no_bias["params"]["dense1"]) == {"kernel": (5, 16)}
  assert _shape_tree(no_bias["params"]["dense2"]) == {"kernel": (16, 8)}


@pytest.mark.parametrize("affine", [False, True])
def test_last_bn_is_affine_only_when_asked(affine):
  variables = _shapes(MLPHead(hidden_dim=16, out_dim=8, num_layers=2, last_bn=True,
                              last_bn_affine=affine))
  assert ("bn2" in variables["params"]) == affine
  if affine:
    assert _shape_tree(variables["params"]["bn2"]) == {"scale": (8,), "bias": (8,)}
  assert _shape_tree(variables["batch_stats"]["bn2"]) == {"mean": (8,), "var": (8,)}


@pytest.mark.parametrize("last_bn", [False, True])
def test_matches_linear_bn_relu_by_hand(last_bn):
  head = MLPHead(hidden_dim=6, out_dim=3, num_layers=2, last_bn=last_bn, last_bn_affine=True)
  variables = _random_variables(head, in_dim=5)
  p, s = variables["params"], variables["batch_stats"]
  x = np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32)

  out, updates = jax.jit(functools.partial(head.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  h = x @ p["dense1"]["kernel"] + p["dense1"]["bias"]
  h = np.maximum(_batch_norm(h, h.mean(0), h.var(0), p["bn1"]["scale"], p["bn1"]["bias"]), 0)
  z = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  expected = z
  if last_bn:
    expected = _batch_norm(z, z.mean(0), z.var(0), p["bn2"]["scale"], p["bn2"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  # Running means move 10% of the way to the batch means (decay 0.9).
  first = x @ p["dense1"]["kernel"] + p["dense1"]["bias"]
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"],
                             0.9 * s["bn1"]["mean"] + 0.1 * first.mean(0), rtol=1e-4,
                             atol=1e-6)

  # Inference mode normalises with the running statistics instead.
  out = jax.jit(functools.partial(head.apply, train=False))(variables, x)
  h = x @ p["dense1"]["kernel"] + p["dense1"]["bias"]
  h = np.maximum(_batch_norm(h, s["bn1"]["mean"], s["bn1"]["var"], p["bn1"]["scale"],
                             p["bn1"]["bias"]), 0)
  expected = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  if last_bn:
    expected = _batch_norm(expected, s["bn2"]["mean"], s["bn2"]["var"], p["bn2"]["scale"],
                           p["bn2"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_non_affine_last_bn_standardises_each_output():
  head = MLPHead(hidden_dim=6, out_dim=4, num_layers=2, last_bn=True)
  variables = _random_variables(head, in_dim=5)
  x = np.random.default_rng(2).normal(loc=3.0, size=(32, 5)).astype(np.float32)
  out, _ = jax.jit(functools.partial(head.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.std(0), 1.0, rtol=1e-3)


def test_single_layer_is_a_linear_map():
  head = MLPHead(hidden_dim=99, out_dim=3, num_layers=1, use_bias=False)
  variables = _random_variables(head, in_dim=4)
  assert _shape_tree(variables) == {"params": {"dense1": {"kernel": (4, 3)}}}
  rng = np.random.default_rng(3)
  x, y = (jnp.asarray(rng.normal(size=(5, 4)), jnp.float32) for _ in range(2))
  f = jax.jit(functools.partial(head.apply, variables, train=True))
  np.testing.assert_allclose(f(2.0 * x - 3.0 * y), 2.0 * f(x) - 3.0 * f(y), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(f(x), x @ variables["params"]["dense1"]["kernel"], rtol=1e-5,
                             atol=1e-6)


def test_rejects_fewer_than_one_layer():
  with pytest.raises(ValueError, match="num_layers >= 1"):
    _shapes(MLPHead(hidden_dim=4, out_dim=2, num_layers=0))


def test_bfloat16_head_returns_float32():
  head = MLPHead(hidden_dim=8, out_dim=4, num_layers=2, dtype=jnp.bfloat16)
  variables = _random_variables(head, in_dim=5)
  assert {leaf.dtype for leaf in jax.tree.leaves(_shapes(head))} == {jnp.dtype(jnp.float32)}
  x = np.random.default_rng(4).normal(size=(6, 5)).astype(np.float32)
  out = head.apply(variables, x, train=False)
  assert out.dtype == jnp.float32
  reference = MLPHead(hidden_dim=8, out_dim=4, num_layers=2).apply(variables, x, train=False)
  np.testing.assert_allclose(out, reference, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------ DINOHead

def _gelu(x):
  """Exact (erf) GELU, as torch.nn.GELU()."""
  from math import erf
  return x * 0.5 * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


def _unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def test_dino_head_layouts():
  issl = DINOHead(hidden_dim=16, bottleneck_dim=6, out_dim=9, num_layers=2, use_bn=True,
                  use_bias=False, normalize_before_bottleneck=True)
  variables = _shapes(issl)
  assert _shape_tree(variables["params"]) == {
      "dense1": {"kernel": (5, 16)}, "bn1": {"scale": (16,), "bias": (16,)},
      "dense2": {"kernel": (16, 6)}, "last_layer": {"kernel": (6, 9)}}
  assert _shape_tree(variables["batch_stats"]) == {"bn1": {"mean": (16,), "var": (16,)}}

  official = _shapes(DINOHead(hidden_dim=16, bottleneck_dim=6, out_dim=9))
  assert _shape_tree(official) == {"params": {
      "dense1": {"kernel": (5, 16), "bias": (16,)}, "dense2": {"kernel": (16, 16), "bias": (16,)},
      "dense3": {"kernel": (16, 6), "bias": (6,)}, "last_layer": {"kernel": (6, 9)}}}
  single = _shapes(DINOHead(hidden_dim=16, bottleneck_dim=6, out_dim=9, num_layers=1))
  assert set(single["params"]) == {"dense1", "last_layer"}
  with pytest.raises(ValueError, match="num_layers >= 1"):
    _shapes(DINOHead(hidden_dim=4, bottleneck_dim=2, out_dim=3, num_layers=0))


def test_dino_head_issl_layout_by_hand():
  # ISSL: Linear (no bias) - BN - GELU - L2-normalise - bottleneck - unit-norm layer.
  head = DINOHead(hidden_dim=6, bottleneck_dim=3, out_dim=4, num_layers=2, use_bn=True,
                  use_bias=False, normalize_before_bottleneck=True)
  variables = _random_variables(head, in_dim=5)
  p = variables["params"]
  x = np.random.default_rng(5).normal(size=(7, 5)).astype(np.float32)
  out, _ = jax.jit(functools.partial(head.apply, train=True, mutable=["batch_stats"]))(
      variables, x)
  h = x @ p["dense1"]["kernel"]
  h = _gelu(_batch_norm(h, h.mean(0), h.var(0), p["bn1"]["scale"], p["bn1"]["bias"]))
  expected = _unit(h) @ p["dense2"]["kernel"] @ _unit(np.asarray(p["last_layer"]["kernel"]), 0)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_dino_head_official_layout_by_hand_gives_cosines():
  # Official DINO: (Linear - GELU) x 2 - bottleneck - L2-normalise - unit-norm layer.
  head = DINOHead(hidden_dim=6, bottleneck_dim=3, out_dim=4)
  variables = _random_variables(head, in_dim=5)
  p = variables["params"]
  x = np.random.default_rng(6).normal(size=(7, 5)).astype(np.float32)
  out = jax.jit(functools.partial(head.apply, train=True))(variables, x)
  h = _gelu(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  h = _gelu(h @ p["dense2"]["kernel"] + p["dense2"]["bias"])
  z = _unit(h @ p["dense3"]["kernel"] + p["dense3"]["bias"])
  expected = z @ _unit(np.asarray(p["last_layer"]["kernel"]), 0)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
  assert np.abs(out).max() <= 1.0 + 1e-6  # cosine similarities


def test_unit_norm_layer_ignores_column_scale_and_its_gradient_is_tangent():
  # weight_norm with g = 1: scaling a weight column changes nothing, so the gradient w.r.t.
  # each column is orthogonal to that column.
  head = DINOHead(hidden_dim=6, bottleneck_dim=3, out_dim=4)
  variables = _random_variables(head, in_dim=5)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(7, 5)), jnp.float32)
  f = jax.jit(lambda v: head.apply(v, x, train=True))
  scaled = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf * jnp.array([0.5, 2.0, 3.0, 7.0])
      if "last_layer" in jax.tree_util.keystr(path) else leaf, variables)
  np.testing.assert_allclose(f(scaled), f(variables), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(f(v) ** 3))(variables)
  kernel = variables["params"]["last_layer"]["kernel"]
  g = grad["params"]["last_layer"]["kernel"]
  assert np.abs(g).max() > 1e-3
  np.testing.assert_allclose(jnp.sum(kernel * g, axis=0), 0.0, atol=1e-5)


def test_dino_head_bfloat16_returns_float32():
  head = DINOHead(hidden_dim=8, bottleneck_dim=4, out_dim=6, num_layers=2, use_bn=True,
                  dtype=jnp.bfloat16)
  variables = _random_variables(head, in_dim=5)
  x = np.random.default_rng(8).normal(size=(6, 5)).astype(np.float32)
  out = head.apply(variables, x, train=False)
  assert out.dtype == jnp.float32
  reference = DINOHead(hidden_dim=8, bottleneck_dim=4, out_dim=6, num_layers=2,
                       use_bn=True).apply(variables, x, train=False)
  np.testing.assert_allclose(out, reference, rtol=0.05, atol=0.05)


def test_norm_linear_is_the_cosine_of_input_and_weight_columns():
  layer = NormLinear(3)
  params = layer.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  np.testing.assert_allclose(jnp.linalg.norm(params["kernel"], axis=0), 1.0, rtol=1e-6)
  assert float(jnp.abs(params["kernel"]).max()) <= 1.0
  w = jnp.asarray([[3.0, 0.0, 1.0], [4.0, 2.0, -1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  x = jnp.asarray([[0.0, 5.0, 0.0, 0.0], [6.0, 8.0, 0.0, 0.0]])
  y = layer.apply({"params": {"kernel": w}}, x)
  s2 = 1 / np.sqrt(2)
  np.testing.assert_allclose(y, [[0.8, 1.0, -s2], [0.6 * 0.6 + 0.8 * 0.8, 0.8, -0.2 * s2]],
                             rtol=1e-6)
  np.testing.assert_allclose(layer.apply({"params": {"kernel": 7 * w}}, 3 * x), y, rtol=1e-6)
  mlp = NormMLP(hidden_dim=5, out_dim=2)
  variables = mlp.init(jax.random.key(1), jnp.ones((2, 4)))
  assert set(variables["params"]) == {"dense1", "norm_linear"}
  assert float(jnp.abs(mlp.apply(variables, x)).max()) <= 1.0 + 1e-6
