"""CISSL and DISSL losses: hand-computed values, loop references, the NT-Xent relation,
gradients through the teacher, 8 devices against 1, and clear errors on bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import cissl, cissl_terms, dissl, nt_xent


# ------------------------------------------------------------------ loop references (numpy)

def _unit(x):
  return x / np.linalg.norm(x)


def _reference_contrastive(s_a, s_b, t_a, t_b, temp, *, keep_self=True):
  """Anchors: student rows of [a; b]; candidates: teacher rows of [a; b].

  keep_self=True: CISSL (self column kept, two positives of weight 1/2).
  keep_self=False: the self column is dropped and the only positive is the other view
  (with identical heads this is NT-Xent).
  """
  students = [_unit(x) for x in np.concatenate([s_a, s_b])]
  teachers = [_unit(x) for x in np.concatenate([t_a, t_b])]
  n = len(s_a)
  total = 0.0
  for k, u in enumerate(students):
    pos = k + n if k < n else k - n
    columns = [l for l in range(2 * n) if keep_self or l != k]
    log_z = math.log(sum(math.exp(u @ teachers[l] / temp) for l in columns))
    log_p = lambda l: u @ teachers[l] / temp - log_z
    total += -0.5 * (log_p(k) + log_p(pos)) if keep_self else -log_p(pos)
  return total / (2 * n)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _reference_dissl(t_a, t_b, s_a, s_b, tau_t, tau_s, lam, beta):
  teacher = [[_softmax(row / tau_t) for row in t] for t in (t_a, t_b)]
  student = [[np.log(_softmax(row / tau_s)) for row in s] for s in (s_a, s_b)]
  n = len(t_a)
  distill = det_inv = entropy = 0.0
  for v, w in ((0, 1), (1, 0)):
    for i in range(n):
      distill += -sum(teacher[v][i][c] * student[w][i][c] for c in range(len(t_a[0]))) / n
      det_inv += -sum(teacher[v][i][c] * math.log(teacher[w][i][c])
                      for c in range(len(t_a[0]))) / n
    marginal = sum(teacher[v]) / n
    entropy += -sum(m * math.log(m) for m in marginal)
  return distill / 2 - lam * entropy / 2 + beta * det_inv / 2


def _random(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ------------------------------------------------------------------------------------ CISSL

def test_cissl_hand_computed_orthogonal_case():
  # Two images, every head output e_image, t = 1: each anchor sees its two positives at
  # cosine 1 and the other image's two outputs at 0, so l = log(2e + 2) - 1.
  z = jnp.eye(2)
  loss, metrics = cissl(z, z, z, z, temperature=1.0)
  np.testing.assert_allclose(loss, math.log(2 * math.e + 2) - 1, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["self_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], 0.0, atol=1e-7)
  assert metrics["accuracy"] == 1.0
  np.testing.assert_allclose(metrics["I_q_zm"], math.log(4) - float(loss), rtol=1e-6)


@pytest.mark.parametrize("t", [0.07, 0.5, 2.0])
def test_cissl_matches_loop_reference(t):
  s_a, s_b, t_a, t_b = (np.asarray(_random(i, 5, 4)) for i in range(4))
  loss, _ = cissl(*map(jnp.asarray, (s_a, s_b, t_a, t_b)), temperature=t)
  np.testing.assert_allclose(loss, _reference_contrastive(s_a, s_b, t_a, t_b, t), rtol=1e-5)
  terms, _ = cissl_terms(*map(jnp.asarray, (s_a, s_b, t_a, t_b)), temperature=t)
  assert terms.shape == (2, 5)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), loss, rtol=1e-6)


def test_cissl_with_identical_heads_and_the_self_pair_removed_is_nt_xent():
  # The loop reference with the self column dropped and one positive is NT-Xent when the
  # student and teacher outputs coincide; keeping the self pair gives CISSL. With identical
  # heads the self logit is 1/t, so CISSL's anchor loss is
  #   log(exp(1/t) + Z'_k) - (1/t + s_pos/t) / 2,
  # Z'_k NT-Xent's partition sum: a pull toward the constant self-pair the heads cannot move.
  z_a, z_b = np.asarray(_random(10, 6, 3)), np.asarray(_random(11, 6, 3))
  t = 0.3
  simclr, _ = nt_xent(jnp.asarray(z_a), jnp.asarray(z_b), temperature=t)
  np.testing.assert_allclose(
      _reference_contrastive(z_a, z_b, z_a, z_b, t, keep_self=False), simclr, rtol=1e-5)
  ours, _ = cissl(*map(jnp.asarray, (z_a, z_b, z_a, z_b)), temperature=t)
  np.testing.assert_allclose(_reference_contrastive(z_a, z_b, z_a, z_b, t), ours, rtol=1e-5)

  u = np.concatenate([z_a, z_b])
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  sims = u @ u.T / t
  n = len(z_a)
  pos = np.concatenate([np.arange(n) + n, np.arange(n)])
  z_prime = np.exp(sims).sum(1) - np.exp(np.diag(sims))
  by_relation = np.log(np.exp(1 / t) + z_prime) - 0.5 * (1 / t + sims[np.arange(2 * n), pos])
  nt_by_relation = np.log(z_prime) - sims[np.arange(2 * n), pos]
  np.testing.assert_allclose(by_relation.mean(), ours, rtol=1e-5)
  np.testing.assert_allclose(nt_by_relation.mean(), simclr, rtol=1e-5)


def test_cissl_gradient_matches_finite_differences_on_both_heads():
  s_a, s_b, t_a, t_b = (_random(20 + i, 4, 3) for i in range(4))
  f = jax.jit(lambda s, t: cissl(s, s_b, t, t_b, temperature=0.5)[0])
  g_s, g_t = jax.grad(f, argnums=(0, 1))(s_a, t_a)
  eps = 1e-2
  for idx in [(0, 0), (2, 1), (3, 2)]:
    e = jnp.zeros_like(s_a).at[idx].set(eps)
    np.testing.assert_allclose(g_s[idx], (f(s_a + e, t_a) - f(s_a - e, t_a)) / (2 * eps),
                               rtol=2e-2, atol=2e-4)
    np.testing.assert_allclose(g_t[idx], (f(s_a, t_a + e) - f(s_a, t_a - e)) / (2 * eps),
                               rtol=2e-2, atol=2e-4)


def _cissl_linear(w, x_a, x_b, axis_name=None):
  # Student: a linear map; teacher: a small MLP sharing nothing with it.
  teacher = lambda x: jnp.tanh(x @ w[:, :4]) @ w[:4, 4:]
  return cissl(x_a @ w[:, 4:], x_b @ w[:, 4:], teacher(x_a), teacher(x_b), temperature=0.2,
               axis_name=axis_name)[0]


def test_cissl_8_devices_equal_1_device(num_devices):
  x_a, x_b = _random(30, 32, 6), _random(31, 32, 6)
  w = _random(32, 6, 8)
  single_loss, single_grad = jax.value_and_grad(_cissl_linear)(w, x_a, x_b)

  def per_device(w, x_a, x_b):
    loss, grad = jax.value_and_grad(_cissl_linear)(w, x_a, x_b, "data")
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  loss, grad = sharded(w, x_a, x_b)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)
  # Without the axis each device would only contrast its own 4 images: a different loss.
  local = jax.jit(jax.shard_map(lambda w, a, b: jax.lax.pmean(_cissl_linear(w, a, b), "data"),
                                mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                out_specs=P(), check_vma=False))(w, x_a, x_b)
  assert abs(float(local) - float(single_loss)) > 1e-2


def test_cissl_bad_inputs():
  ok = jnp.ones((3, 4))
  for t in (0.0, -0.1):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      cissl(ok, ok, ok, ok, temperature=t)
  with pytest.raises(ValueError, match=r"one shape.*teacher_b \(3, 5\)"):
    cissl(ok, ok, ok, jnp.ones((3, 5)))
  with pytest.raises(ValueError, match=r"student_a must be \[n, d\]"):
    cissl(jnp.ones((3,)), ok, ok, ok)
  one = jnp.ones((1, 4))
  with pytest.raises(ValueError, match="at least 2 images"):
    cissl(one, one, one, one)


# ------------------------------------------------------------------------------------ DISSL

def test_dissl_hand_computed_uniform_case():
  # All logits 0, C = 2: P = Q = (1/2, 1/2), so distill = det_inv = H_max = log 2 and
  # L = log 2 (1 - lambda + beta); H[M|Z] = log 2; both KLs 0.
  zeros = jnp.zeros((3, 2))
  loss, metrics = dissl(zeros, zeros, zeros, zeros)
  np.testing.assert_allclose(loss, math.log(2) * (1 - 2.3 + 0.8), rtol=1e-6)
  for name in ("H_M", "H_M_given_Z", "CE_distill", "H_M_global"):
    np.testing.assert_allclose(metrics[name], math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics["KL_invariance"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["KL_distillation"], 0.0, atol=1e-6)


def test_dissl_diagnostics_of_a_deterministic_balanced_teacher():
  # Teacher puts image i in class i (n = 4 of C = 6) on both views: H[M|Z] = 0, H[M] =
  # log 4, no invariance gap; the student (uniform) pays log C in distillation.
  logits = 100.0 * jnp.eye(4, 6)
  loss, metrics = dissl(logits, logits, jnp.zeros((4, 6)), jnp.zeros((4, 6)))
  np.testing.assert_allclose(metrics["H_M_given_Z"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics["H_M"], math.log(4), rtol=1e-5)
  np.testing.assert_allclose(metrics["KL_invariance"], 0.0, atol=1e-5)
  np.testing.assert_allclose(metrics["CE_distill"], math.log(6), rtol=1e-5)
  np.testing.assert_allclose(loss, math.log(6) - 2.3 * math.log(4), rtol=1e-4)


@pytest.mark.parametrize("tau_t, tau_s, lam, beta", [(0.5, 1.0, 2.3, 0.8), (0.2, 0.7, 1.0, 0.0)])
def test_dissl_matches_loop_reference(tau_t, tau_s, lam, beta):
  arrays = [np.asarray(_random(40 + i, 5, 7)) for i in range(4)]
  loss, _ = dissl(*map(jnp.asarray, arrays), teacher_temperature=tau_t,
                  student_temperature=tau_s, lambda_maximality=lam, beta_det_inv=beta)
  np.testing.assert_allclose(loss, _reference_dissl(*arrays, tau_t, tau_s, lam, beta),
                             rtol=1e-5)


def test_dissl_computes_in_float32_from_bfloat16_logits():
  arrays = [_random(45 + i, 4, 5) for i in range(4)]
  loss32, _ = dissl(*arrays)
  loss16, metrics = dissl(*(a.astype(jnp.bfloat16) for a in arrays))
  assert loss16.dtype == jnp.float32 and metrics["H_M"].dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_dissl_gradient_reaches_the_teacher_through_every_p_and_matches_finite_differences():
  t_a, t_b, s_a, s_b = (_random(50 + i, 4, 5) for i in range(4))
  f = jax.jit(lambda t: dissl(t, t_b, s_a, s_b)[0])
  g = jax.grad(f)(t_a)
  eps = 1e-2
  for idx in [(0, 0), (1, 3), (3, 4)]:
    e = jnp.zeros_like(t_a).at[idx].set(eps)
    np.testing.assert_allclose(g[idx], (f(t_a + e) - f(t_a - e)) / (2 * eps), rtol=2e-2,
                               atol=2e-4)

  # The same objective with P under stop-gradient where it is a cross-entropy target gives
  # another teacher gradient: the no-stop-gradient form is not that one.
  def with_detached_targets(t):
    p = jax.nn.softmax(jnp.stack([t, t_b]) / 0.5, axis=-1)
    log_p = jax.nn.log_softmax(jnp.stack([t, t_b]) / 0.5, axis=-1)
    log_q = jax.nn.log_softmax(jnp.stack([s_a, s_b]), axis=-1)
    sp = jax.lax.stop_gradient(p)
    ce = lambda a, b: jnp.mean(-jnp.sum(a * b, -1))
    distill = (ce(sp[0], log_q[1]) + ce(sp[1], log_q[0])) / 2
    det_inv = (ce(sp[0], log_p[1]) + ce(sp[1], log_p[0])) / 2
    m = jnp.mean(p, axis=1)
    h = -jnp.mean(jnp.sum(m * jnp.log(m), -1))
    return distill - 2.3 * h + 0.8 * det_inv

  detached = jax.jit(jax.value_and_grad(with_detached_targets))
  value, detached_grad = detached(t_a)
  np.testing.assert_allclose(value, f(t_a), rtol=1e-5)
  assert np.abs(detached_grad - g).max() > 1e-3
  # The student gets a gradient too.
  assert np.abs(jax.jit(jax.grad(lambda s: dissl(t_a, t_b, s, s_b)[0]))(s_a)).max() > 1e-3


def _dissl_linear(w, x_a, x_b, axis_name=None, global_marginal=False):
  teacher = lambda x: jnp.tanh(x @ w[:, :6]) @ w[:6, 6:]
  return dissl(teacher(x_a), teacher(x_b), x_a @ w[:, 6:], x_b @ w[:, 6:],
               axis_name=axis_name, global_marginal=global_marginal)[0]


def test_dissl_8_devices_equal_1_device(num_devices):
  x_a, x_b = _random(60, 32, 8), _random(61, 32, 8)
  w = _random(62, 8, 14)
  mesh = Mesh(np.array(jax.devices()), ("data",))

  def sharded(global_marginal):
    def per_device(w, x_a, x_b):
      loss, grad = jax.value_and_grad(_dissl_linear)(w, x_a, x_b, "data", global_marginal)
      return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                 out_specs=(P(), P()), check_vma=False))(w, x_a, x_b)

  # Global marginal: the loss and gradient of the concatenated batch.
  single_loss, single_grad = jax.value_and_grad(_dissl_linear)(w, x_a, x_b)
  loss, grad = sharded(True)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)

  # Per-device marginal (official): the mean of the 8 single-device losses of the chunks.
  chunks = [(x_a[4 * i:4 * i + 4], x_b[4 * i:4 * i + 4])
            for i in range(num_devices)]
  value_and_grad = jax.jit(jax.value_and_grad(_dissl_linear))
  chunk_values = [value_and_grad(w, a, b) for a, b in chunks]
  loss, grad = sharded(False)
  np.testing.assert_allclose(loss, np.mean([v for v, _ in chunk_values]), rtol=1e-5)
  np.testing.assert_allclose(grad, np.mean([g for _, g in chunk_values], axis=0), rtol=1e-4,
                             atol=1e-6)
  assert abs(float(loss) - float(single_loss)) > 1e-3  # the marginals differ


def test_dissl_bad_inputs():
  ok = jnp.zeros((3, 4))
  for key in ("teacher_temperature", "student_temperature"):
    for value in (0.0, -1.0):
      with pytest.raises(ValueError, match=f"{key} must be > 0"):
        dissl(ok, ok, ok, ok, **{key: value})
  with pytest.raises(ValueError, match="lambda_maximality must be >= 0"):
    dissl(ok, ok, ok, ok, lambda_maximality=-1.0)
  with pytest.raises(ValueError, match=r"one shape.*student_b \(3, 5\)"):
    dissl(ok, ok, ok, jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match=r"teacher_a must be \[n, d\]"):
    dissl(jnp.zeros((2, 3, 4)), ok, ok, ok)
  one_class = jnp.zeros((3, 1))
  with pytest.raises(ValueError, match="C >= 2"):
    dissl(one_class, one_class, one_class, one_class)
