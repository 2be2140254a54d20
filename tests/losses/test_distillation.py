"""byol_regression and dino: hand-computed values, distributed equivalence, and descent."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import byol_regression, byol_terms, dino, dino_center_update, dino_terms


# ------------------------------------------------------------------ byol_regression


def _reference_byol(p: np.ndarray, t: np.ndarray) -> float:
  total = 0.0
  for a, b in zip(p, t):
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    total += float(np.sum((a - b) ** 2))
  return total / len(p)


def test_byol_hand_computed():
  # Row 1: same direction (cos 1, loss 0); row 2: orthogonal (cos 0, loss 2). Mean 1.
  p = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  t = jnp.array([[3.0, 0.0], [1.0, 0.0]])
  loss, metrics = byol_regression(p, t)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["cosine"], 0.5, rtol=1e-6)
  opposite, _ = byol_regression(p, -p)
  np.testing.assert_allclose(opposite, 4.0, rtol=1e-6)


def test_byol_matches_loop_reference_and_is_scale_invariant():
  rng = np.random.default_rng(0)
  p = rng.normal(size=(7, 5)).astype(np.float32)
  t = rng.normal(size=(7, 5)).astype(np.float32)
  loss, _ = byol_regression(jnp.asarray(p), jnp.asarray(t))
  np.testing.assert_allclose(loss, _reference_byol(p, t), rtol=1e-5)
  scaled, _ = byol_regression(jnp.asarray(3 * p), jnp.asarray(0.2 * t))
  np.testing.assert_allclose(scaled, loss, rtol=1e-5)
  assert byol_regression(jnp.asarray(p, jnp.bfloat16), jnp.asarray(t))[0].dtype == jnp.float32


def test_byol_leaves_the_target_to_the_caller():
  # No stop_gradient inside: the target gets a gradient unless the caller stops it.
  rng = np.random.default_rng(1)
  p, t = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2))
  g_p, g_t = jax.grad(lambda a, b: byol_regression(a, b)[0], argnums=(0, 1))(p, t)
  assert np.abs(g_p).max() > 0 and np.abs(g_t).max() > 0
  g_t = jax.grad(lambda b: byol_regression(p, jax.lax.stop_gradient(b))[0])(t)
  np.testing.assert_array_equal(g_t, 0.0)


def test_byol_bad_inputs():
  with pytest.raises(AssertionError):
    byol_regression(jnp.ones((2, 3)), jnp.ones((3, 3)))
  with pytest.raises(AssertionError):
    byol_regression(jnp.ones((2, 3, 1)), jnp.ones((2, 3, 1)))


def test_byol_gradient_steps_lower_the_loss():
  rng = np.random.default_rng(2)
  p = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  f = lambda x: byol_regression(x, t)[0]
  start = f(p)
  for _ in range(20):
    p = p - 2.0 * jax.grad(f)(p)
  assert f(p) < 0.5 * start


def test_byol_terms_reduce_to_the_pairwise_losses():
  # Two views: L(p1, t2) + L(p2, t1). The hand-computed case: p1 against t2 row by row.
  p1 = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  p2 = jnp.array([[0.0, 1.0], [1.0, 1.0]])
  t1 = jnp.array([[0.0, 5.0], [2.0, 2.0]])
  t2 = jnp.array([[3.0, 0.0], [1.0, 0.0]])
  terms, metrics = byol_terms([p1, p2], [t1, t2])
  assert terms.shape == (2, 2) and terms.dtype == jnp.float32
  np.testing.assert_allclose(terms, [[0.0, 2.0], [0.0, 0.0]], atol=1e-6)

  rng = np.random.default_rng(6)
  p = [jnp.asarray(rng.normal(size=(7, 5)), jnp.float32) for _ in range(4)]
  t = [jnp.asarray(rng.normal(size=(7, 5)), jnp.float32) for _ in range(2)]
  terms, metrics = byol_terms(p[:2], t)
  assert terms.shape == (2, 7)
  expected = byol_regression(p[0], t[1])[0] + byol_regression(p[1], t[0])[0]
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), expected, rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(terms[0]), byol_regression(p[0], t[1])[0], rtol=1e-6)
  np.testing.assert_allclose(metrics["cosine"], (byol_regression(p[0], t[1])[1]["cosine"]
                                                 + byol_regression(p[1], t[0])[1]["cosine"])
                             / 2, rtol=1e-5)
  # Multi-crop: four predictions, targets of the first two views.
  terms, _ = byol_terms(p, t)
  assert terms.shape == (4, 7)
  expected = sum(byol_regression(p[v], t[g])[0] for v in range(4) for g in range(2) if g != v)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="byol_terms needs"):
    byol_terms(p[:1], t[:1])


def test_byol_distributed_value_and_gradient_equal_single_device(num_devices):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(32, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  f = lambda w, x, t: byol_regression(x @ w, t)[0]
  single = jax.value_and_grad(f)(w, x, t)

  def per_device(w, x, t):
    value, grad = jax.value_and_grad(f)(w, x, t)
    return jax.lax.pmean(value, "data"), jax.lax.pmean(grad, "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  for got, want in zip(sharded(w, x, t), single):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0))
  split = lambda a: a.reshape(num_devices, -1, a.shape[-1])
  for got, want in zip(pmapped(w, split(x), split(t)), single):
    np.testing.assert_allclose(got[2], want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ dino


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _reference_dino(student, teacher, centers, tau_s, tau_t) -> float:
  """Pair-by-pair, row-by-row DINO loss; centers is one [K] centre per teacher view."""
  total, pairs = 0.0, 0
  for t in range(teacher.shape[0]):
    for s in range(student.shape[0]):
      if s == t:
        continue
      ce = 0.0
      for i in range(student.shape[1]):
        q = _softmax((teacher[t, i] - centers[t]) / tau_t)
        log_p = np.log(_softmax(student[s, i] / tau_s))
        ce += -float(np.sum(q * log_p))
      total += ce / student.shape[1]
      pairs += 1
  return total / pairs


def test_dino_hand_computed_uniform_case():
  # Teacher outputs equal to the centre: q uniform over K = 2; student logits 0: p uniform.
  # Every pair's cross-entropy is log 2; teacher entropy log 2; KL 0.
  student = jnp.zeros((2, 3, 2))
  teacher = jnp.full((2, 3, 2), 0.7)
  loss, metrics = dino(student, teacher, center=jnp.full((2,), 0.7), student_temperature=0.1,
                       teacher_temperature=0.04)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics["teacher_entropy"], math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["teacher_marginal_entropy"], math.log(2), rtol=1e-6)


def test_dino_hand_computed_one_hot_case():
  # Sharp teacher (tau_t -> one-hot on class 0 for view 0, class 1 for view 1) and a student
  # with logits (log 3, 0) / tau_s = 1 on every view: p = (3/4, 1/4). Pairs (0, 1): -log 3/4;
  # (1, 0): -log 1/4. Mean: (log 4/3 + log 4) / 2.
  student = jnp.broadcast_to(jnp.array([math.log(3.0), 0.0]), (2, 1, 2))
  teacher = jnp.array([[[10.0, 0.0]], [[0.0, 10.0]]])
  loss, metrics = dino(student, teacher, center=jnp.zeros(2), student_temperature=1.0,
                       teacher_temperature=0.01)
  np.testing.assert_allclose(loss, (math.log(4 / 3) + math.log(4)) / 2, rtol=1e-5)
  np.testing.assert_allclose(metrics["teacher_entropy"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["teacher_marginal_entropy"], math.log(2), rtol=1e-5)


@pytest.mark.parametrize("num_student, per_view_center", [(2, False), (2, True), (5, False)])
def test_dino_matches_loop_reference(num_student, per_view_center):
  rng = np.random.default_rng(4)
  student = rng.normal(size=(num_student, 4, 6)).astype(np.float32)
  teacher = rng.normal(size=(2, 4, 6)).astype(np.float32)
  center = rng.normal(size=(2, 6) if per_view_center else (6,)).astype(np.float32)
  loss, metrics = dino(jnp.asarray(student), jnp.asarray(teacher), center=jnp.asarray(center),
                       student_temperature=0.1, teacher_temperature=0.07)
  centers = center if per_view_center else np.stack([center, center])
  expected = _reference_dino(student, teacher, centers, 0.1, 0.07)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  q = np.stack([[_softmax((teacher[t, i] - centers[t]) / 0.07) for i in range(4)]
                for t in range(2)])
  entropy = -np.mean(np.sum(q * np.log(q), axis=-1))
  np.testing.assert_allclose(metrics["teacher_entropy"], entropy, rtol=1e-4)
  np.testing.assert_allclose(metrics["kl"], expected - entropy, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_student, per_view_center", [(2, False), (2, True), (4, False),
                                                          (4, True)])
def test_dino_terms_reduce_to_the_loss(num_student, per_view_center):
  rng = np.random.default_rng(4)
  student = jnp.asarray(rng.normal(size=(num_student, 4, 6)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  center = jnp.asarray(rng.normal(size=(2, 6) if per_view_center else (6,)), jnp.float32)
  kwargs = dict(center=center, student_temperature=0.1, teacher_temperature=0.07)
  terms = dino_terms(student, teacher, **kwargs)
  loss, _ = dino(student, teacher, **kwargs)
  assert terms.shape == (num_student, 4) and terms.dtype == jnp.float32
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), loss, rtol=1e-6)
  # Row by row: student view s of image i against every other teacher view, over the pairs.
  centers = np.asarray(center) if per_view_center else np.stack([center, center])
  num_pairs = 2 * (num_student - 1)
  for s in range(num_student):
    for i in range(4):
      expected = sum(-float(np.sum(_softmax((np.asarray(teacher[t, i]) - centers[t]) / 0.07)
                                   * np.log(_softmax(np.asarray(student[s, i]) / 0.1))))
                     for t in range(2) if t != s) / num_pairs
      np.testing.assert_allclose(terms[s, i], expected, rtol=1e-5, atol=1e-6)


def test_dino_terms_hand_computed_one_hot_case():
  # The one-hot case above: student view 0 meets teacher view 1 (-log 1/4 ... see there).
  student = jnp.broadcast_to(jnp.array([math.log(3.0), 0.0]), (2, 1, 2))
  teacher = jnp.array([[[10.0, 0.0]], [[0.0, 10.0]]])
  terms = dino_terms(student, teacher, center=jnp.zeros(2), student_temperature=1.0,
                     teacher_temperature=0.01)
  # Student 0 vs teacher 1 (class 1): -log 1/4; student 1 vs teacher 0 (class 0): -log 3/4.
  np.testing.assert_allclose(terms[:, 0], [math.log(4) / 2, math.log(4 / 3) / 2], rtol=1e-5)


def test_dino_teacher_temperature_may_be_traced_and_teacher_gets_no_gradient():
  rng = np.random.default_rng(5)
  student = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  f = jax.jit(lambda s, g, tau: dino(s, g, center=jnp.zeros(5), student_temperature=0.1,
                                      teacher_temperature=tau)[0])
  np.testing.assert_allclose(f(student, teacher, 0.05),
                             _reference_dino(np.asarray(student), np.asarray(teacher),
                                             np.zeros((2, 5)), 0.1, 0.05), rtol=1e-5)
  g_s, g_t = jax.grad(f, argnums=(0, 1))(student, teacher, 0.05)
  assert np.abs(g_s).max() > 0
  np.testing.assert_array_equal(g_t, 0.0)


def test_dino_bad_inputs():
  ok = dict(center=jnp.zeros(3), student_temperature=0.1, teacher_temperature=0.04)
  with pytest.raises(ValueError, match="S >= 2 student views"):
    dino(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), **ok)
  with pytest.raises(ValueError, match="1 <= T <= S"):
    dino(jnp.zeros((2, 2, 3)), jnp.zeros((3, 2, 3)), **ok)
  with pytest.raises(AssertionError):
    dino(jnp.zeros((2, 2, 3)), jnp.zeros((2, 5, 3)), **ok)
  with pytest.raises(AssertionError):
    dino(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)), **{**ok, "center": jnp.zeros(4)})
  with pytest.raises(AssertionError):
    dino(jnp.zeros((3, 2, 3)), jnp.zeros((2, 2, 3)), **{**ok, "center": jnp.zeros((3, 3))})
  with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
    dino(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)), **{**ok, "teacher_temperature": 0.0})
  with pytest.raises(ValueError, match="student_temperature must be > 0"):
    dino(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2, 3)), **{**ok, "student_temperature": -1.0})
  with pytest.raises(ValueError, match="center momentum must be in"):
    dino_center_update(jnp.zeros(3), jnp.zeros((2, 3)), momentum=1.5)
  with pytest.raises(AssertionError):
    dino_center_update(jnp.zeros(3), jnp.zeros((2, 4)), momentum=0.9)


def test_center_update_by_hand():
  center = jnp.array([1.0, -1.0])
  teacher = jnp.array([[[0.0, 2.0], [2.0, 2.0]], [[4.0, 0.0], [2.0, 0.0]]])  # mean (2, 1)
  new = dino_center_update(center, teacher, momentum=0.9)
  np.testing.assert_allclose(new, [0.9 * 1 + 0.1 * 2, 0.9 * -1 + 0.1 * 1], rtol=1e-6)
  np.testing.assert_allclose(dino_center_update(center, teacher[0], momentum=0.0), [1.0, 2.0])


def test_dino_gradient_steps_lower_the_loss():
  rng = np.random.default_rng(6)
  teacher = jnp.asarray(rng.normal(size=(2, 16, 10)), jnp.float32)
  student = jnp.asarray(rng.normal(size=(4, 16, 10)), jnp.float32)
  f = jax.jit(lambda s: dino(s, teacher, center=jnp.zeros(10), student_temperature=0.1,
                             teacher_temperature=0.07)[0])
  step = jax.jit(lambda s: s - 2.0 * jax.grad(f)(s))
  start = f(student)
  for _ in range(30):
    student = step(student)
  assert f(student) < 0.5 * start


def _dino_with_center(w, x, teacher, center, axis_name=None):
  """Student logits = x @ w for 3 views; returns (loss, (new centre, marginal entropy))."""
  student = jnp.einsum("vnd,dk->vnk", x, w)
  loss, metrics = dino(student, teacher, center=center, student_temperature=0.1,
                       teacher_temperature=0.05, axis_name=axis_name)
  new_center = dino_center_update(center, teacher, momentum=0.9, axis_name=axis_name)
  return loss, (new_center, metrics["teacher_marginal_entropy"])


def test_dino_distributed_value_gradient_and_center_equal_single_device(num_devices):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, 32, 6)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 32, 5)), jnp.float32)
  center = jnp.asarray(rng.normal(size=(5,)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  grad_fn = jax.value_and_grad(_dino_with_center, has_aux=True)
  (single_loss, (single_center, single_entropy)), single_grad = grad_fn(w, x, teacher, center)

  def per_device(w, x, teacher, center):
    (loss, (new_center, entropy)), grad = grad_fn(w, x, teacher, center, "data")
    return (jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data"), new_center, entropy)

  def check(loss, grad, new_center, entropy):
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_center, single_center, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(entropy, single_entropy, rtol=1e-5)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = P(None, "data")
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), rows, rows, P()),
                                  out_specs=P(), check_vma=False))
  check(*sharded(w, x, teacher, center))

  split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], num_devices, -1, a.shape[-1]), 1, 0)
  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0, None))
  out = pmapped(w, split(x), split(teacher), center)
  check(*(leaf[num_devices - 1] for leaf in out))
