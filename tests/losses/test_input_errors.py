"""Inputs that would give a silently wrong loss: one image per view (NT-Xent) and a memory-bank
index outside the bank (NPID)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.losses import contrastive


def test_nt_xent_with_one_row_per_view_is_an_error():
  z = jnp.ones((1, 4))
  with pytest.raises(ValueError, match="at least 2 images .* got 1"):
    contrastive.nt_xent(z, z, temperature=0.1)
  with pytest.raises(ValueError, match="at least 2 images"):
    contrastive.multiview_nt_xent([z, z, z], temperature=0.1)
  with pytest.raises(ValueError, match="at least 2 images"):  # a trace-time (shape) error
    jax.jit(lambda a: contrastive.nt_xent(a, a, temperature=0.1))(z)


def test_nt_xent_with_one_row_per_device_and_several_devices_is_fine(num_devices):
  z = jax.random.normal(jax.random.key(0), (num_devices, 1, 4))
  loss, _ = jax.vmap(lambda a, b: contrastive.nt_xent(a, b, temperature=0.5, axis_name="d"),
                     axis_name="d")(z, z[::-1])
  assert np.all(np.isfinite(loss)) and np.all(loss > 0)


def test_npid_index_outside_the_bank():
  v, bank = jnp.ones((2, 4)), jnp.ones((5, 4))
  for index in ([0, 5], [-1, 2]):
    with pytest.raises(ValueError, match=r"index must lie in \[0, 5\).*bank_size"):
      contrastive.npid_softmax(v, bank, jnp.asarray(index), temperature=0.1)
  loss, _ = contrastive.npid_softmax(v, bank, jnp.asarray([0, 4]), temperature=0.1)
  assert np.isfinite(loss)
  # Under jit the values are unknown at trace time: the documented result is a NaN loss.
  jitted = jax.jit(lambda i: contrastive.npid_softmax(v, bank, i, temperature=0.1)[0])
  assert np.isnan(jitted(jnp.asarray([0, 5])))
