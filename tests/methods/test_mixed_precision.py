"""bf16 compute (``train.compute_dtype = 'bfloat16'``) against float32, every method, one batch.

Parameters stay float32 and the losses reduce in float32 (softmax, log-sum-exp, Sinkhorn,
cross-correlation, k-means), so only the networks' activations are rounded to bf16's 8-bit
mantissa. Stated tolerances, on the same parameters and views: the loss within 2% (measured
on 2026-12-02: at most 0.75%, SwAV), and the gradient's cosine with the float32 gradient at
least 0.97 (measured: relative L2 error 0.11-0.19, i.e. cosine >= 0.98).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.methods import build_method
from ssljax.methods.base import RunInfo
from tests.util import SMALL_METHOD_SIZES, init_with_numpy_kernels, small_method_config

_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64)


def _value_and_grad(config, params, state, views):
  method = build_method(config, run=_RUN)
  batch = {"views": views, "index": jnp.arange(16, dtype=jnp.int32),
           "label": jnp.zeros((16,), jnp.int32)}
  loss = lambda p: method.loss(p, state, batch, key=jax.random.key(1), step=jnp.int32(3),
                               axis_name=None)[0]
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("name", sorted(SMALL_METHOD_SIZES))
def test_bf16_compute_stays_close_to_float32(name, tmp_path):
  config = small_method_config(str(tmp_path), name)
  config.train.compute_dtype = "float32"  # the reference; the default 'auto' is bf16 on a GPU
  method = build_method(config, run=_RUN)
  rng = np.random.default_rng(0)
  views = tuple(jnp.asarray(rng.uniform(size=(16, 16, 16, 1)), jnp.float32)
                for _ in range(method.num_views))
  params, state = init_with_numpy_kernels(method.init, jax.random.key(0), views)
  value32, grad32 = _value_and_grad(config, params, state, views)
  config.train.compute_dtype = "bfloat16"
  value16, grad16 = _value_and_grad(config, params, state, views)
  assert value16.dtype == jnp.float32, "the loss must be reduced in float32"
  np.testing.assert_allclose(value16, value32, rtol=2e-2)
  g32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad32)])
  g16 = jnp.concatenate([g.astype(jnp.float32).ravel() for g in jax.tree.leaves(grad16)])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad16)), "float32 parameters"
  cosine = float(g16 @ g32 / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32)))
  assert cosine >= 0.97, f"{name}: gradient cosine {cosine:.4f} between bf16 and float32"


def test_auto_compute_dtype_is_bf16_on_accelerators_only(monkeypatch):
  from ssljax.config import default_config
  from ssljax.models import compute_dtype, resolve_compute_dtype
  assert default_config("simclr").train.compute_dtype == "auto"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # also where the tests run on a GPU
  assert compute_dtype("auto") == jnp.float32
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert resolve_compute_dtype("auto") == "bfloat16"
  assert resolve_compute_dtype("float32") == "float32", "an explicit dtype wins"
  with pytest.raises(ValueError, match="'auto' or one of \\['bfloat16', 'float32'\\], got 'fp16'"):
    compute_dtype("fp16")


def test_every_accelerator_recipe_computes_in_bf16_on_a_gpu(monkeypatch):
  # The CIFAR / TinyImageNet / ImageNet recipes are GPU/TPU jobs: each either says 'auto' or
  # 'bfloat16', so none of them trains in float32 on an accelerator by accident.
  from ssljax import configs
  from ssljax.config import DATASETS, load_config
  from ssljax.models import resolve_compute_dtype
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  checked = 0
  for name in configs.names():
    for dataset in (d for d in DATASETS if d != "fashion_mnist"):
      try:
        config = load_config(f"{name}:{dataset}")
      except ValueError:  # not every method ships every dataset
        continue
      assert resolve_compute_dtype(config.train.compute_dtype) == "bfloat16", (name, dataset)
      checked += 1
  assert checked >= 20
  # The embedded default job (README command 1) and the other CPU-sized Fashion-MNIST jobs keep
  # the float32 their accuracies were measured in, on any backend.
  for name in configs.names():
    config = load_config(name)
    assert resolve_compute_dtype(config.train.compute_dtype) == "float32", name
