"""Contrastive losses (nt_xent, moco_infonce, NPID): hand-computed values, distributed
equivalence, and descent."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import (moco_infonce, moco_infonce_terms, multiview_nt_xent,
                           multiview_nt_xent_terms, npid, npid_nce, npid_nce_log_z,
                           npid_softmax, npid_terms, nt_xent)


def _reference_nt_xent(z_a: np.ndarray, z_b: np.ndarray, t: float) -> float:
  """Loop-by-loop SPEC 6.1 formula, written independently of the vectorised code."""
  z = []
  for a, b in zip(z_a, z_b):
    z.append(a / np.linalg.norm(a))
    z.append(b / np.linalg.norm(b))
  total = 0.0
  for i in range(len(z)):
    pos = i + 1 if i % 2 == 0 else i - 1
    denom = sum(math.exp(z[i] @ z[k] / t) for k in range(len(z)) if k != i)
    total += -math.log(math.exp(z[i] @ z[pos] / t) / denom)
  return total / len(z)


def test_hand_computed_orthogonal_case():
  # Two images, identical views, orthogonal across images, t = 1. Every anchor sees its
  # positive at cosine 1 and two negatives at cosine 0: loss = log(e + 2) - 1.
  z = jnp.eye(2)
  loss, metrics = nt_xent(z, z, temperature=1.0)
  np.testing.assert_allclose(loss, math.log(math.e + 2) - 1, rtol=1e-6)
  assert metrics["accuracy"] == 1.0
  np.testing.assert_allclose(metrics["pos_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], 0.0, atol=1e-7)


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_matches_loop_reference(t):
  rng = np.random.default_rng(0)
  z_a = rng.normal(size=(6, 5)).astype(np.float32)
  z_b = rng.normal(size=(6, 5)).astype(np.float32)
  loss, _ = nt_xent(jnp.asarray(z_a), jnp.asarray(z_b), temperature=t)
  np.testing.assert_allclose(loss, _reference_nt_xent(z_a, z_b, t), rtol=1e-5)


def test_scale_invariant_and_symmetric():
  rng = np.random.default_rng(1)
  z_a = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  base, _ = nt_xent(z_a, z_b, temperature=0.2)
  scaled, _ = nt_xent(3.0 * z_a, 0.5 * z_b, temperature=0.2)
  swapped, _ = nt_xent(z_b, z_a, temperature=0.2)
  np.testing.assert_allclose(scaled, base, rtol=1e-5)
  np.testing.assert_allclose(swapped, base, rtol=1e-5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="temperature"):
    nt_xent(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.0)
  with pytest.raises(AssertionError):
    nt_xent(jnp.ones((2, 3)), jnp.ones((3, 3)), temperature=0.1)


def _linear_model_loss(w, x_a, x_b, axis_name=None):
  loss, _ = nt_xent(x_a @ w, x_b @ w, temperature=0.3, axis_name=axis_name)
  return loss


def test_distributed_value_and_gradient_equal_single_device(num_devices):
  rng = np.random.default_rng(2)
  x_a = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  x_b = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  single_loss, single_grad = jax.value_and_grad(_linear_model_loss)(w, x_a, x_b)

  def per_device(w, x_a, x_b):
    loss, grad = jax.value_and_grad(_linear_model_loss)(w, x_a, x_b, "data")
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  loss, grad = sharded(w, x_a, x_b)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)

  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0))
  p_loss, p_grad = pmapped(w, x_a.reshape(num_devices, 4, 6), x_b.reshape(num_devices, 4, 6))
  np.testing.assert_allclose(p_loss[0], single_loss, rtol=1e-5)
  np.testing.assert_allclose(p_grad[3], single_grad, rtol=1e-4, atol=1e-6)


def test_gradient_wrt_embeddings_matches_single_device(num_devices):
  # The gradient each device gets for its own rows must include what the other devices'
  # anchors send back through the gather: it equals N_dev x the single-device gradient rows.
  rng = np.random.default_rng(3)
  z_a = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  single = jax.grad(lambda a, b: nt_xent(a, b, temperature=0.5)[0], argnums=(0, 1))(z_a, z_b)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  grad_fn = jax.grad(lambda a, b: nt_xent(a, b, temperature=0.5, axis_name="data")[0],
                     argnums=(0, 1))
  sharded = jax.jit(jax.shard_map(grad_fn, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=(P("data"), P("data")), check_vma=False))
  g_a, g_b = sharded(z_a, z_b)
  np.testing.assert_allclose(g_a / num_devices, single[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_b / num_devices, single[1], rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(4)
  z_a = jnp.asarray(rng.normal(size=(4, 3)), jnp.float64 if jax.config.x64_enabled else
                    jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(4, 3)), z_a.dtype)
  f = lambda a: nt_xent(a, z_b, temperature=0.5)[0]
  g = jax.grad(f)(z_a)
  eps = 1e-2
  for idx in [(0, 0), (2, 1), (3, 2)]:
    e = jnp.zeros_like(z_a).at[idx].set(eps)
    fd = (f(z_a + e) - f(z_a - e)) / (2 * eps)
    np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-4)


def test_gradient_steps_lower_the_loss():
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  z_a = z + 0.5 * jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  z_b = z + 0.5 * jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  f = lambda ab: nt_xent(ab[0], ab[1], temperature=0.2)[0]
  start = f((z_a, z_b))
  params = (z_a, z_b)
  for _ in range(20):
    grads = jax.grad(f)(params)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  assert f(params) < 0.5 * start


def _reference_multiview(views: list[np.ndarray], t: float) -> float:
  """Loop-by-loop multi-positive NT-Xent, written independently of the vectorised code."""
  num_views, n = len(views), len(views[0])
  z = {(v, i): views[v][i] / np.linalg.norm(views[v][i]) for v in range(num_views)
       for i in range(n)}
  total = 0.0
  for (v, i), anchor in z.items():
    denom = sum(math.exp(anchor @ other / t) for key, other in z.items() if key != (v, i))
    for u in range(num_views):
      if u != v:
        total += -math.log(math.exp(anchor @ z[(u, i)] / t) / denom) / (num_views - 1)
  return total / len(z)


def test_multiview_hand_computed_case():
  # Two images, three identical views each, orthogonal across images, t = 1. Each anchor has
  # two positives at cosine 1 and three negatives at cosine 0: loss = log(2e + 3) - 1; every
  # anchor's most similar candidate is a positive.
  z = jnp.eye(2)
  loss, metrics = multiview_nt_xent([z, z, z], temperature=1.0)
  np.testing.assert_allclose(loss, math.log(2 * math.e + 3) - 1, rtol=1e-6)
  assert metrics["accuracy"] == 1.0
  np.testing.assert_allclose(metrics["pos_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], 0.0, atol=1e-7)


@pytest.mark.parametrize("num_views,t", [(2, 0.5), (3, 0.2), (4, 1.0)])
def test_multiview_matches_loop_reference(num_views, t):
  rng = np.random.default_rng(num_views)
  views = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(num_views)]
  loss, _ = multiview_nt_xent([jnp.asarray(v) for v in views], temperature=t)
  np.testing.assert_allclose(loss, _reference_multiview(views, t), rtol=1e-5)
  if num_views == 2:
    np.testing.assert_allclose(loss, _reference_nt_xent(views[0], views[1], t), rtol=1e-5)


def test_multiview_invariant_to_view_order():
  rng = np.random.default_rng(6)
  views = [jnp.asarray(rng.normal(size=(6, 3)), jnp.float32) for _ in range(3)]
  base, _ = multiview_nt_xent(views, temperature=0.3)
  permuted, _ = multiview_nt_xent([views[2], views[0], views[1]], temperature=0.3)
  np.testing.assert_allclose(permuted, base, rtol=1e-5)


def test_multiview_positive_forms_hand_computed():
  # t = 1, two images, three views in 2-D: image 0 has views (e1, e1, e2), image 1 their
  # negatives. Anchor e1 (views a, b of image 0): positives at cosine 1 and 0, negatives at
  # -1, -1, 0, so Z = e + 1 + 2/e + 1; mean_log gives log Z - (1 + 0)/2, log_sum gives
  # log Z - log(e + 1). Anchor e2 (view c): positives at 0 and 0, negatives at 0, 0, -1, so
  # Z = 4 + 1/e; mean_log gives log Z, log_sum gives log Z - log 2. Image 1 mirrors image 0.
  e = math.e
  image0 = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
  views = [jnp.asarray(np.stack([image0[v], -image0[v]])) for v in range(3)]
  z_ab, z_c = math.log(e + 2 + 2 / e), math.log(4 + 1 / e)
  mean_log = (2 * (z_ab - 0.5) + z_c) / 3
  log_sum = (2 * (z_ab - math.log(e + 1)) + (z_c - math.log(2))) / 3
  np.testing.assert_allclose(multiview_nt_xent(views, temperature=1.0)[0], mean_log, rtol=1e-6)
  got, _ = multiview_nt_xent(views, temperature=1.0, positives="log_sum")
  np.testing.assert_allclose(got, log_sum, rtol=1e-6)
  assert abs(mean_log - log_sum) > 0.1  # the forms differ with more than one positive
  terms, _ = multiview_nt_xent_terms(views, temperature=1.0, positives="log_sum")
  np.testing.assert_allclose(terms[:, 0] * 3,
                             [z_ab - math.log(e + 1)] * 2 + [z_c - math.log(2)], rtol=1e-6)


def test_multiview_positive_forms_agree_with_two_views():
  rng = np.random.default_rng(11)
  z_a, z_b = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
  views = [jnp.asarray(z_a), jnp.asarray(z_b)]
  mean_log, _ = multiview_nt_xent(views, temperature=0.3)
  log_sum, _ = multiview_nt_xent(views, temperature=0.3, positives="log_sum")
  np.testing.assert_allclose(log_sum, mean_log, rtol=1e-6)
  np.testing.assert_allclose(log_sum, _reference_nt_xent(z_a, z_b, 0.3), rtol=1e-5)
  grad = lambda form: jax.grad(lambda v: multiview_nt_xent(
      [v, views[1]], temperature=0.3, positives=form)[0])(views[0])
  np.testing.assert_allclose(grad("log_sum"), grad("mean_log"), rtol=1e-5, atol=1e-7)


def test_multiview_unknown_positive_form_names_the_choices():
  with pytest.raises(ValueError, match="mean_log.*log_sum.*got 'sum'"):
    multiview_nt_xent([jnp.eye(2)] * 3, temperature=0.1, positives="sum")


def test_multiview_bad_inputs():
  with pytest.raises(ValueError, match="at least 2 views"):
    multiview_nt_xent([jnp.ones((2, 3))], temperature=0.1)
  with pytest.raises(ValueError, match="temperature"):
    multiview_nt_xent([jnp.ones((2, 3))] * 3, temperature=-1.0)
  with pytest.raises(AssertionError):
    multiview_nt_xent([jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones((3, 3))], temperature=0.1)


def test_multiview_distributed_gradient_equals_single_device(num_devices):
  rng = np.random.default_rng(7)
  xs = [jnp.asarray(rng.normal(size=(16, 6)), jnp.float32) for _ in range(3)]
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

  def model_loss(w, xs, axis_name=None):
    return multiview_nt_xent([x @ w for x in xs], temperature=0.4, axis_name=axis_name)[0]

  single_loss, single_grad = jax.value_and_grad(model_loss)(w, xs)

  def per_device(w, xs):
    loss, grad = jax.value_and_grad(model_loss)(w, xs, "data")
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  loss, grad = sharded(w, xs)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)


def _reference_anchor_losses(views: list[np.ndarray], t: float) -> np.ndarray:
  """Loop-by-loop per-anchor multi-positive NT-Xent, ``[V, n]``."""
  num_views, n = len(views), len(views[0])
  z = {(v, i): views[v][i] / np.linalg.norm(views[v][i]) for v in range(num_views)
       for i in range(n)}
  out = np.zeros((num_views, n))
  for (v, i), anchor in z.items():
    denom = sum(math.exp(anchor @ other / t) for key, other in z.items() if key != (v, i))
    out[v, i] = sum(-math.log(math.exp(anchor @ z[(u, i)] / t) / denom)
                    for u in range(num_views) if u != v) / (num_views - 1)
  return out


def test_multiview_terms_hand_computed_case():
  # The hand-computed case above: every anchor's loss is log(2e + 3) - 1, each term a third.
  z = jnp.eye(2)
  terms, metrics = multiview_nt_xent_terms([z, z, z], temperature=1.0)
  assert terms.shape == (3, 2) and terms.dtype == jnp.float32
  np.testing.assert_allclose(terms, (math.log(2 * math.e + 3) - 1) / 3, rtol=1e-6)
  assert metrics["accuracy"] == 1.0


@pytest.mark.parametrize("num_views,t", [(2, 0.5), (3, 0.2), (4, 1.0)])
def test_multiview_terms_reduce_to_the_loss(num_views, t):
  rng = np.random.default_rng(num_views)
  views = [rng.normal(size=(5, 4)).astype(np.float32) for _ in range(num_views)]
  jviews = [jnp.asarray(v) for v in views]
  terms, metrics = multiview_nt_xent_terms(jviews, temperature=t)
  loss, loss_metrics = multiview_nt_xent(jviews, temperature=t)
  assert terms.shape == (num_views, 5)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), loss, rtol=1e-6)
  np.testing.assert_allclose(terms, _reference_anchor_losses(views, t) / num_views,
                             rtol=1e-5)
  for name in loss_metrics:
    np.testing.assert_allclose(metrics[name], loss_metrics[name], rtol=1e-6)


def test_multiview_terms_distributed_equal_single_device(num_devices):
  # Each device's terms are its rows of the global terms (negatives from the whole global
  # batch); the terms' reduction has the loss's distributed value and gradient.
  rng = np.random.default_rng(7)
  xs = [jnp.asarray(rng.normal(size=(16, 6)), jnp.float32) for _ in range(3)]
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  single_terms, _ = multiview_nt_xent_terms([x @ w for x in xs], temperature=0.4)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  per_device = lambda w, xs: multiview_nt_xent_terms([x @ w for x in xs], temperature=0.4,
                                                     axis_name="data")[0]
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=P(None, "data"), check_vma=False))
  terms = sharded(w, xs)
  assert terms.shape == (3, 16)
  np.testing.assert_allclose(terms, single_terms, rtol=1e-5, atol=1e-6)

  def loss_fn(w, x0, x1, x2, axis_name):
    terms, _ = multiview_nt_xent_terms([x @ w for x in (x0, x1, x2)], temperature=0.4,
                                       axis_name=axis_name)
    return jnp.sum(jnp.mean(terms, axis=1))

  _assert_distributed_matches(loss_fn, w, tuple(xs), (), num_devices)
  np.testing.assert_allclose(
      loss_fn(w, *xs, None),
      multiview_nt_xent([x @ w for x in xs], temperature=0.4)[0], rtol=1e-6)


# ---------------------------------------------------------------- moco_infonce


def _reference_moco(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
  """SPEC 6.2 InfoNCE, one query at a time."""
  total = 0.0
  for qi, ki in zip(q, k):
    qi, ki = qi / np.linalg.norm(qi), ki / np.linalg.norm(ki)
    pos = math.exp(qi @ ki / t)
    neg = sum(math.exp(qi @ row / t) for row in queue)
    total += -math.log(pos / (pos + neg))
  return total / len(q)


def test_moco_hand_computed():
  # q = k = e1 and the queue (e2, -e1), t = 1: logits (1, 0, -1) with target 0.
  q = jnp.asarray([[2.0, 0.0]])
  queue = jnp.asarray([[0.0, 1.0], [-1.0, 0.0]])
  loss, metrics = moco_infonce(q, q, queue, temperature=1.0)
  np.testing.assert_allclose(loss, math.log(math.e + 1 + math.exp(-1)) - 1, rtol=1e-6)
  assert metrics["accuracy"] == 1.0
  np.testing.assert_allclose(metrics["pos_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], -0.5, rtol=1e-6)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_moco_matches_loop_reference(t):
  rng = np.random.default_rng(10)
  q, k = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  queue = rng.normal(size=(7, 4))
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  loss, _ = moco_infonce(*(jnp.asarray(a, jnp.float32) for a in (q, k, queue)), temperature=t)
  np.testing.assert_allclose(loss, _reference_moco(q, k, queue, t), rtol=1e-5)


@pytest.mark.parametrize("t", [0.07, 1.0])
def test_moco_terms_reduce_to_the_loss(t):
  # The hand-computed case: one query, logits (1, 0, -1) with target 0.
  terms, metrics = moco_infonce_terms(jnp.asarray([[2.0, 0.0]]), jnp.asarray([[2.0, 0.0]]),
                                      jnp.asarray([[0.0, 1.0], [-1.0, 0.0]]), temperature=1.0)
  assert terms.shape == (1,)
  np.testing.assert_allclose(terms, [math.log(math.e + 1 + math.exp(-1)) - 1], rtol=1e-6)
  rng = np.random.default_rng(10)
  q, k = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
  queue = rng.normal(size=(7, 4))
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  args = [jnp.asarray(a, jnp.float32) for a in (q, k, queue)]
  terms, metrics = moco_infonce_terms(*args, temperature=t)
  loss, loss_metrics = moco_infonce(*args, temperature=t)
  assert terms.shape == (5,) and terms.dtype == jnp.float32
  np.testing.assert_allclose(jnp.mean(terms), loss, rtol=1e-6)
  for i in range(5):
    np.testing.assert_allclose(terms[i], _reference_moco(q[i:i + 1], k[i:i + 1], queue, t),
                               rtol=1e-5)
  for name in loss_metrics:
    np.testing.assert_allclose(metrics[name], loss_metrics[name], rtol=1e-6)


def test_moco_queue_is_a_constant_and_bad_inputs_raise():
  rng = np.random.default_rng(11)
  q, k, queue = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 4), (3, 4), (6, 4)))
  grad_queue = jax.grad(lambda m: moco_infonce(q, k, m, temperature=0.2)[0])(queue)
  np.testing.assert_array_equal(grad_queue, 0.0)
  with pytest.raises(ValueError, match="temperature"):
    moco_infonce(q, k, queue, temperature=-1.0)
  with pytest.raises(AssertionError):
    moco_infonce(q, k[:2], queue, temperature=0.2)
  with pytest.raises(AssertionError):
    moco_infonce(q, k, queue[:, :3], temperature=0.2)


def _assert_distributed_matches(loss_fn, w, sharded_args, replicated_args, num_devices):
  """pmean of per-device values/gradients (shard_map and pmap) = the single-device ones.

  ``loss_fn(w, *sharded_args, *replicated_args, axis_name)`` returns a scalar; the sharded
  arguments are split along axis 0 over the devices, the replicated ones are passed whole.
  """
  single_loss, single_grad = jax.value_and_grad(loss_fn)(w, *sharded_args, *replicated_args,
                                                         None)

  def per_device(w, sharded, replicated):
    loss, grad = jax.value_and_grad(loss_fn)(w, *sharded, *replicated, "data")
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P()),
                                  out_specs=(P(), P()), check_vma=False))
  loss, grad = sharded(w, tuple(sharded_args), tuple(replicated_args))
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)

  split = lambda x: x.reshape(num_devices, -1, *x.shape[1:])
  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, None))
  p_loss, p_grad = pmapped(w, tuple(split(a) for a in sharded_args), tuple(replicated_args))
  np.testing.assert_allclose(p_loss[0], single_loss, rtol=1e-5)
  np.testing.assert_allclose(p_grad[-1], single_grad, rtol=1e-4, atol=1e-6)


def test_moco_distributed_value_and_gradient_equal_single_device(num_devices):
  rng = np.random.default_rng(12)
  x_q, x_k = (jnp.asarray(rng.normal(size=(32, 6)), jnp.float32) for _ in range(2))
  queue = jnp.asarray(rng.normal(size=(24, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

  def loss_fn(w, x_q, x_k, queue, axis_name):
    k = jax.lax.stop_gradient(x_k @ w)  # MoCo's keys carry no gradient
    return moco_infonce(x_q @ w, k, queue, temperature=0.2, axis_name=axis_name)[0]

  _assert_distributed_matches(loss_fn, w, (x_q, x_k), (queue,), num_devices)


def test_moco_gradient_steps_lower_the_loss():
  rng = np.random.default_rng(13)
  k = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  q = k + jnp.asarray(rng.normal(size=k.shape), jnp.float32)
  queue = jnp.asarray(_unit_rows(rng, 64, 8), jnp.float32)
  f = jax.jit(lambda q: moco_infonce(q, k, queue, temperature=0.2)[0])
  grad = jax.jit(jax.grad(f))
  start, params = f(q), q
  for _ in range(20):
    params = params - 5.0 * grad(params)
  assert f(params) < 0.6 * start


# ---------------------------------------------------------------- NPID


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_npid_softmax(v, bank, index, t) -> float:
  total = 0.0
  for vi, i in zip(v, index):
    vi = vi / np.linalg.norm(vi)
    scores = [math.exp(row @ vi / t) for row in bank]
    total += -math.log(scores[i] / sum(scores))
  return total / len(v)


def _reference_npid_nce(v, bank, index, noise, t, z) -> float:
  """The official NCEAverage + NCECriterion arithmetic, eps included."""
  eps, n_bank, k = 1e-7, len(bank), noise.shape[1]
  total = 0.0
  for vi, i, rows in zip(v, index, noise):
    vi = vi / np.linalg.norm(vi)
    p_pos = math.exp(bank[i] @ vi / t) / z
    total += math.log(p_pos / (p_pos + k / n_bank + eps))
    for j in rows:
      p = math.exp(bank[j] @ vi / t) / z
      total += math.log((k / n_bank) / (p + k / n_bank + eps))
  return -total / len(v)


def _npid_inputs(seed, n=6, d=4, n_bank=20, k=5):
  rng = np.random.default_rng(seed)
  v = rng.normal(size=(n, d))
  bank = rng.uniform(-0.8, 0.8, size=(n_bank, d))
  index = rng.permutation(n_bank)[:n]
  noise = rng.integers(0, n_bank, size=(n, k))
  return v, bank, index, noise


def test_npid_softmax_hand_computed():
  # v = e1, bank (e1, e2, -e1), index 0, t = 1: logits (1, 0, -1), target 0.
  bank = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  loss, metrics = npid_softmax(jnp.asarray([[3.0, 0.0]]), bank, jnp.asarray([0]),
                               temperature=1.0)
  np.testing.assert_allclose(loss, math.log(math.e + 1 + math.exp(-1)) - 1, rtol=1e-6)
  assert metrics["accuracy"] == 1.0
  np.testing.assert_allclose(metrics["pos_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], -0.5, rtol=1e-6)


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_npid_losses_match_loop_references(t):
  v, bank, index, noise = _npid_inputs(20)
  args = [jnp.asarray(a, jnp.float32) for a in (v, bank)]
  loss, _ = npid_softmax(*args, jnp.asarray(index), temperature=t)
  np.testing.assert_allclose(loss, _reference_npid_softmax(v, bank, index, t), rtol=1e-5)

  z = 37.5
  loss, _ = npid_nce(*args, jnp.asarray(index), jnp.asarray(noise), temperature=t,
                     log_z=math.log(z))
  np.testing.assert_allclose(loss, _reference_npid_nce(v, bank, index, noise, t, z),
                             rtol=1e-5)

  # Z = N * mean of exp(m.v / t) over each row's positive and noise columns.
  vn = v / np.linalg.norm(v, axis=1, keepdims=True)
  cols = np.concatenate([index[:, None], noise], axis=1)
  expected_z = len(bank) * np.mean([[math.exp(bank[c] @ vi / t) for c in row]
                                    for vi, row in zip(vn, cols)])
  log_z = npid_nce_log_z(*args, jnp.asarray(index), jnp.asarray(noise), temperature=t)
  np.testing.assert_allclose(log_z, math.log(expected_z), rtol=1e-5)


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_npid_terms_reduce_to_the_loss_softmax_and_nce(t):
  v, bank, index, noise = _npid_inputs(20)
  args = [jnp.asarray(a, jnp.float32) for a in (v, bank)]
  index_j, noise_j = jnp.asarray(index), jnp.asarray(noise)
  n = len(v)

  terms, metrics = npid_terms(*args, index_j, temperature=t)
  loss, loss_metrics = npid(*args, index_j, temperature=t)
  assert terms.shape == (n,) and terms.dtype == jnp.float32
  np.testing.assert_allclose(jnp.mean(terms), loss, rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(terms), _reference_npid_softmax(v, bank, index, t),
                             rtol=1e-5)
  for i in range(n):
    np.testing.assert_allclose(
        terms[i], _reference_npid_softmax(v[i:i + 1], bank, index[i:i + 1], t), rtol=1e-5)
  for name in loss_metrics:
    np.testing.assert_allclose(metrics[name], loss_metrics[name], rtol=1e-6)

  z = 37.5
  terms, metrics = npid_terms(*args, index_j, temperature=t, noise_index=noise_j,
                              log_z=math.log(z))
  loss, loss_metrics = npid(*args, index_j, temperature=t, noise_index=noise_j,
                            log_z=math.log(z))
  assert terms.shape == (n,)
  np.testing.assert_allclose(jnp.mean(terms), loss, rtol=1e-6)
  for i in range(n):
    np.testing.assert_allclose(
        terms[i], _reference_npid_nce(v[i:i + 1], bank, index[i:i + 1], noise[i:i + 1], t, z),
        rtol=1e-5)
  for name in loss_metrics:
    np.testing.assert_allclose(metrics[name], loss_metrics[name], rtol=1e-6)

  with pytest.raises(ValueError, match="needs log_z"):
    npid_terms(*args, index_j, temperature=t, noise_index=noise_j)
  with pytest.raises(ValueError, match="pass noise_index"):
    npid_terms(*args, index_j, temperature=t, log_z=2.0)


def test_npid_dispatcher_and_bad_inputs():
  v, bank, index, noise = (jnp.asarray(a) for a in _npid_inputs(21))
  v, bank = v.astype(jnp.float32), bank.astype(jnp.float32)
  full = npid(v, bank, index, temperature=0.1)
  np.testing.assert_array_equal(full[0], npid_softmax(v, bank, index, temperature=0.1)[0])
  nce = npid(v, bank, index, temperature=0.1, noise_index=noise, log_z=2.0)
  np.testing.assert_array_equal(nce[0], npid_nce(v, bank, index, noise, temperature=0.1,
                                                 log_z=2.0)[0])
  with pytest.raises(ValueError, match="needs log_z"):
    npid(v, bank, index, temperature=0.1, noise_index=noise)
  with pytest.raises(ValueError, match="pass noise_index"):
    npid(v, bank, index, temperature=0.1, log_z=2.0)
  with pytest.raises(ValueError, match="temperature"):
    npid_softmax(v, bank, index, temperature=0.0)
  with pytest.raises(AssertionError):
    npid_softmax(v, bank[:, :3], index, temperature=0.1)
  with pytest.raises(AssertionError):
    npid_softmax(v, bank, index[:3], temperature=0.1)
  with pytest.raises(AssertionError):
    npid_softmax(v, bank, index.astype(jnp.float32), temperature=0.1)
  with pytest.raises(AssertionError):
    npid_nce(v, bank, index, noise[:2], temperature=0.1, log_z=2.0)
  grad_bank = jax.grad(lambda m: npid_softmax(v, m, index, temperature=0.1)[0]
                       + npid_nce(v, m, index, noise, temperature=0.1, log_z=2.0)[0])(bank)
  np.testing.assert_array_equal(grad_bank, 0.0)  # the bank is a constant


def test_npid_distributed_value_and_gradient_equal_single_device(num_devices):
  rng = np.random.default_rng(22)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  bank = jnp.asarray(_unit_rows(rng, 50, 4), jnp.float32)
  index = jnp.asarray(rng.permutation(50)[:32], jnp.int32)
  noise = jnp.asarray(rng.integers(0, 50, size=(32, 7)), jnp.int32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)

  def softmax_loss(w, x, index, bank, axis_name):
    return npid_softmax(x @ w, bank, index, temperature=0.1, axis_name=axis_name)[0]

  def nce_loss(w, x, index, noise, bank, axis_name):
    return npid_nce(x @ w, bank, index, noise, temperature=0.1, log_z=3.0,
                    axis_name=axis_name)[0]

  _assert_distributed_matches(softmax_loss, w, (x, index), (bank,), num_devices)
  _assert_distributed_matches(nce_loss, w, (x, index, noise), (bank,), num_devices)


def test_npid_log_z_over_devices_equals_the_global_batch_estimate(num_devices):
  v, bank, index, noise = _npid_inputs(23, n=16)
  v, bank = jnp.asarray(v, jnp.float32), jnp.asarray(bank, jnp.float32)
  index, noise = jnp.asarray(index, jnp.int32), jnp.asarray(noise, jnp.int32)
  single = npid_nce_log_z(v, bank, index, noise, temperature=0.2)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  per_device = lambda v, index, noise: npid_nce_log_z(v, bank, index, noise, temperature=0.2,
                                                       axis_name="data")[None]
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                  out_specs=P("data"), check_vma=False))
  every = sharded(v, index, noise)
  assert every.shape == (num_devices,)
  np.testing.assert_allclose(every, single, rtol=1e-5)


@pytest.mark.parametrize("nce", [False, True])
def test_npid_gradient_steps_lower_the_loss(nce):
  rng = np.random.default_rng(24)
  bank = jnp.asarray(_unit_rows(rng, 40, 8), jnp.float32)
  index = jnp.asarray(rng.permutation(40)[:16], jnp.int32)
  noise = jnp.asarray(rng.integers(0, 40, size=(16, 10)), jnp.int32)
  v0 = bank[index] + jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  options = {"noise_index": noise, "log_z": 2.0} if nce else {}
  f = jax.jit(lambda v: npid(v, bank, index, temperature=0.2, **options)[0])
  grad = jax.jit(jax.grad(f))
  start, v = f(v0), v0
  for _ in range(20):
    v = v - 0.5 * grad(v)
  assert f(v) < 0.7 * start


def test_npid_nce_keeps_the_official_eps_at_cifar_scale():
  # N = 50,000 bank rows, K = 4096 noise rows: eps = 1e-7 moves the loss by ~ eps * N per
  # noise term (5e-3 in total), far above float32 rounding; the float64 reference of the
  # official NCECriterion (vectorised _reference_npid_nce) is matched to 2e-5 absolute.
  rng = np.random.default_rng(7)
  n, d, size, k, t = 4, 128, 50_000, 4096, 0.07
  bank = rng.normal(size=(size, d))
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  v = rng.normal(size=(n, d))
  index = rng.permutation(size)[:n]
  noise = rng.integers(0, size, size=(n, k))
  log_z = math.log(size) + 0.5  # Z ~ N * mean exp(s / t)

  def official(eps):
    vn = v / np.linalg.norm(v, axis=1, keepdims=True)
    p_pos = np.exp(np.sum(bank[index] * vn, axis=1) / t - log_z)
    p_noise = np.exp(np.einsum("nkd,nd->nk", bank[noise], vn) / t - log_z)
    kp = k / size
    total = np.log(p_pos / (p_pos + kp + eps)) + np.sum(np.log(kp / (p_noise + kp + eps)), 1)
    return -np.mean(total)

  loss, _ = npid_nce(jnp.asarray(v, jnp.float32), jnp.asarray(bank, jnp.float32),
                     jnp.asarray(index), jnp.asarray(noise), temperature=t, log_z=log_z)
  assert abs(official(1e-7) - official(0.0)) > 3e-3  # the eps matters at this scale
  np.testing.assert_allclose(float(loss), official(1e-7), rtol=0, atol=2e-5)
