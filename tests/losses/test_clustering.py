"""sinkhorn and swav: hand-computed values, NumPy references, distributed equivalence, descent."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import l2_normalize, sinkhorn, swav, swav_terms


def _reference_sinkhorn(scores: np.ndarray, epsilon: float, num_iters: int) -> np.ndarray:
  """SPEC 6.4 in float64 NumPy, in the form of the current official SwAV code."""
  q = np.exp(scores / epsilon).T  # [K, B]
  num_prototypes, num_samples = q.shape
  q = q / q.sum()
  for _ in range(num_iters):
    q = q / q.sum(axis=1, keepdims=True)
    q = q / num_prototypes
    q = q / q.sum(axis=0, keepdims=True)
    q = q / num_samples
  return (q * num_samples).T


def _reference_swav(scores, codes, t, crops):
  """The SwAV loss as the official double loop, one sample at a time."""
  num_views, n = len(scores), scores[0].shape[0]
  total = 0.0
  for c, q in zip(crops, codes):
    sub = 0.0
    for j in range(num_views):
      if j == c:
        continue
      for i in range(n):
        logits = scores[j][i] / t
        log_p = logits - math.log(np.exp(logits).sum())
        sub -= float(q[i] @ log_p) / n
    total += sub / (num_views - 1)
  return total / len(crops)


def test_hand_computed_3x2_example():
  # exp(scores / eps) = [[1, 1], [1, 1], [1, 2]] with eps = 1. By hand: Q = [[1,1,1],[1,1,2]]/7;
  # row sums (3/7, 4/7) -> rows scaled by 1/(2u) = (7/6, 7/8); columns then normalised:
  # codes = [[4/7, 3/7], [4/7, 3/7], [2/5, 3/5]] after one iteration.
  scores = jnp.log(jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0]]))
  codes = sinkhorn(scores, epsilon=1.0, num_iters=1)
  np.testing.assert_allclose(codes, [[4 / 7, 3 / 7], [4 / 7, 3 / 7], [0.4, 0.6]], rtol=1e-6)
  # No iteration: the per-sample softmax of scores / eps.
  np.testing.assert_allclose(sinkhorn(scores, epsilon=1.0, num_iters=0),
                             [[0.5, 0.5], [0.5, 0.5], [1 / 3, 2 / 3]], rtol=1e-6)
  # Many iterations: rows sum to 1 and each prototype receives B / K = 1.5 in total.
  converged = sinkhorn(scores, epsilon=1.0, num_iters=200)
  np.testing.assert_allclose(converged.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(converged.sum(axis=0), [1.5, 1.5], rtol=1e-5)
  # One iteration already moves the prototype masses (8/7 + 2/5, 6/7 + 3/5) towards 1.5.
  np.testing.assert_allclose(codes.sum(axis=0), [8 / 7 + 0.4, 6 / 7 + 0.6], rtol=1e-6)


@pytest.mark.parametrize("epsilon, num_iters", [(0.05, 3), (0.5, 1), (0.1, 10)])
def test_matches_numpy_reference(epsilon, num_iters):
  rng = np.random.default_rng(0)
  scores = rng.uniform(-1, 1, size=(12, 7))
  codes = sinkhorn(jnp.asarray(scores, jnp.float32), epsilon=epsilon, num_iters=num_iters)
  assert codes.dtype == jnp.float32 and codes.shape == (12, 7)
  np.testing.assert_allclose(codes, _reference_sinkhorn(scores, epsilon, num_iters),
                             rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-5)


def test_codes_are_stable_without_gradient_and_shift_invariant():
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.uniform(-1, 1, size=(6, 4)), jnp.float32)
  # Scores whose exp(s / eps) overflows float32 without the max subtraction.
  codes = sinkhorn(scores + 50.0, epsilon=0.05)
  assert np.all(np.isfinite(codes))
  # (Equal up to the float32 rounding of the shifted logits, ~1e3 * 2^-24 relative.)
  np.testing.assert_allclose(codes, sinkhorn(scores, epsilon=0.05), rtol=2e-4, atol=1e-7)
  grad = jax.grad(lambda s: jnp.sum(sinkhorn(s) * jnp.arange(4.0)))(scores)
  np.testing.assert_array_equal(grad, 0.0)
  bf16 = sinkhorn(scores.astype(jnp.bfloat16))
  assert bf16.dtype == jnp.float32


def test_prototype_that_underflows_everywhere_gets_finite_codes():
  # Prototype 2's scores are so low that exp underflows to 0 for every sample: its row
  # factor 1/(K u) is infinite and is replaced by the largest finite one (shoot_infs).
  scores = jnp.array([[1.0, 0.5, -60.0], [0.2, 0.9, -60.0]])
  codes = sinkhorn(scores, epsilon=0.5, num_iters=3)
  assert np.all(np.isfinite(codes))
  np.testing.assert_array_equal(codes[:, 2], 0.0)
  np.testing.assert_allclose(codes.sum(axis=1), 1.0, rtol=1e-6)


def test_sinkhorn_bad_inputs():
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    sinkhorn(jnp.ones((2, 3)), epsilon=0.0)
  with pytest.raises(ValueError, match="num_iters must be >= 0"):
    sinkhorn(jnp.ones((2, 3)), num_iters=-1)
  with pytest.raises(AssertionError):
    sinkhorn(jnp.ones((2, 3, 1)))


def _sharded(fn, in_specs, out_specs):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=False))


def test_distributed_codes_equal_single_device_codes(num_devices):
  rng = np.random.default_rng(2)
  scores = jnp.asarray(rng.uniform(-1, 1, size=(32, 5)), jnp.float32)
  single = sinkhorn(scores, epsilon=0.05, num_iters=3)
  per_device = lambda s: sinkhorn(s, epsilon=0.05, num_iters=3, axis_name="data")
  sharded = _sharded(per_device, P("data"), P("data"))(scores)
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-7)
  pmapped = jax.pmap(per_device, axis_name="data")(scores.reshape(num_devices, 4, 5))
  np.testing.assert_allclose(pmapped.reshape(32, 5), single, rtol=1e-5, atol=1e-7)
  # The local softmax alone is not the answer: the global normalisation matters.
  local = jax.vmap(lambda s: sinkhorn(s, epsilon=0.05))(scores.reshape(num_devices, 4, 5))
  assert not np.allclose(local.reshape(32, 5), single, atol=1e-3)


def _random_inputs(seed, n=6, k=5, views=4):
  rng = np.random.default_rng(seed)
  scores = [jnp.asarray(rng.uniform(-1, 1, size=(n, k)), jnp.float32) for _ in range(views)]
  codes = [jnp.asarray(rng.dirichlet(np.ones(k), size=n), jnp.float32) for _ in range(2)]
  return scores, codes


@pytest.mark.parametrize("crops", [(0, 1), (1,), (0, 2, 3)])
def test_swav_matches_loop_reference(crops):
  scores, _ = _random_inputs(3)
  rng = np.random.default_rng(4)
  codes = [jnp.asarray(rng.dirichlet(np.ones(5), size=6), jnp.float32) for _ in crops]
  loss, metrics = swav(scores, codes, temperature=0.1, crops_for_assign=crops)
  expected = _reference_swav([np.asarray(s, np.float64) for s in scores],
                             [np.asarray(q, np.float64) for q in codes], 0.1, crops)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert 0.0 <= float(metrics["agreement"]) <= 1.0
  entropy = np.mean([-(np.asarray(q) * np.log(np.asarray(q))).sum(1) for q in codes])
  np.testing.assert_allclose(metrics["code_entropy"], entropy, rtol=1e-5)


def test_two_view_hand_computed_value():
  # Two views, one sample, two prototypes, T = 1: view 1's code (1, 0) predicted by view 2,
  # whose scores (0, 0) give p = (1/2, 1/2) -> CE = log 2; view 2's code (1/2, 1/2)
  # predicted by view 1's scores (log 3, 0) -> p = (3/4, 1/4), CE = -(log 3/4 + log 1/4)/2.
  scores = [jnp.array([[math.log(3.0), 0.0]]), jnp.array([[0.0, 0.0]])]
  codes = [jnp.array([[1.0, 0.0]]), jnp.array([[0.5, 0.5]])]
  loss, _ = swav(scores, codes, temperature=1.0)
  expected = 0.5 * (math.log(2.0) - 0.5 * (math.log(0.75) + math.log(0.25)))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_terms_decompose_the_loss_and_weights_reweight_predicted_views():
  scores, codes = _random_inputs(5)
  loss, _ = swav(scores, codes, temperature=0.1)
  terms = swav_terms(scores, codes, temperature=0.1)
  assert terms.shape == (4, 6)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), loss, rtol=1e-6)
  np.testing.assert_allclose(swav(scores, codes, temperature=0.1,
                                  view_weights=jnp.ones((4, 6)))[0], loss, rtol=1e-6)
  # Weight 0 on the small crops: only the two global crops predict each other, each with
  # 1/(A (V - 1)) = 1/6 of its cross-entropy.
  weights = jnp.array([1.0, 1.0, 0.0, 0.0])[:, None] * jnp.ones((4, 6))
  weighted, _ = swav(scores, codes, temperature=0.1, view_weights=weights)
  two_view = _reference_swav([np.asarray(s, np.float64) for s in scores[:2]],
                             [np.asarray(q, np.float64) for q in codes], 0.1, (0, 1))
  np.testing.assert_allclose(weighted, two_view / 3, rtol=1e-5)
  # The weights and the codes are constants for the gradient.
  grad_w = jax.grad(lambda w: swav(scores, codes, temperature=0.1, view_weights=w)[0])(weights)
  np.testing.assert_array_equal(grad_w, 0.0)
  grad_q = jax.grad(lambda q: swav(scores, q, temperature=0.1)[0])(codes)
  np.testing.assert_array_equal(grad_q[0], 0.0)


def test_swav_bad_inputs():
  scores, codes = _random_inputs(6)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    swav(scores, codes, temperature=0.0)
  with pytest.raises(ValueError, match="at least 2 views"):
    swav(scores[:1], codes[:1], temperature=0.1, crops_for_assign=(0,))
  with pytest.raises(ValueError, match="crops_for_assign must be distinct view indices"):
    swav(scores, codes, temperature=0.1, crops_for_assign=(0, 4))
  with pytest.raises(ValueError, match="one codes array per assignment crop"):
    swav(scores, codes[:1], temperature=0.1)
  with pytest.raises(AssertionError):
    swav(scores, [codes[0][:3], codes[1]], temperature=0.1)


def _model_loss(params, xs, axis_name=None):
  """A linear projector, unit-norm prototypes, Sinkhorn codes of views 0 and 1, SwAV."""
  w, prototypes = params
  z = [l2_normalize(x @ w) for x in xs]
  scores = [zv @ l2_normalize(prototypes).T for zv in z]
  codes = [sinkhorn(scores[c], epsilon=0.05, num_iters=3, axis_name=axis_name) for c in (0, 1)]
  return swav(scores, codes, temperature=0.1)[0]


def test_distributed_value_and_gradient_equal_single_device(num_devices):
  rng = np.random.default_rng(7)
  xs = tuple(jnp.asarray(rng.normal(size=(32, 6)), jnp.float32) for _ in range(4))
  params = (jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
            jnp.asarray(rng.normal(size=(10, 4)), jnp.float32))
  single_loss, single_grad = jax.value_and_grad(_model_loss)(params, xs)

  def per_device(params, xs):
    loss, grad = jax.value_and_grad(_model_loss)(params, xs, "data")
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")

  loss, grad = _sharded(per_device, (P(), P("data")), (P(), P()))(params, xs)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grad, single_grad)

  split = tuple(x.reshape(num_devices, 4, 6) for x in xs)
  p_loss, p_grad = jax.pmap(per_device, axis_name="data", in_axes=(None, 0))(params, split)
  np.testing.assert_allclose(p_loss[0], single_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[5], b, rtol=1e-4, atol=1e-6),
               p_grad, single_grad)


def test_gradient_steps_lower_the_loss():
  # Free embeddings of 2 global + 2 small crops of 16 images and 8 free prototypes; the
  # codes are recomputed by Sinkhorn at every step, as in training.
  rng = np.random.default_rng(8)
  base = rng.normal(size=(16, 8))
  xs = tuple(jnp.asarray(base + 0.8 * rng.normal(size=base.shape), jnp.float32)
             for _ in range(4))
  prototypes = jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)

  def loss_fn(params):
    z = [l2_normalize(x) for x in params[0]]
    scores = [zv @ l2_normalize(params[1]).T for zv in z]
    codes = [sinkhorn(scores[c]) for c in (0, 1)]
    return swav(scores, codes, temperature=0.1)[0]

  step = jax.jit(jax.value_and_grad(loss_fn))
  params = (xs, prototypes)
  start, _ = step(params)
  for _ in range(30):
    _, grads = step(params)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  final, _ = step(params)
  assert float(final) < 0.7 * float(start), (float(start), float(final))
