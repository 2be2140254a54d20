"""benchmarks/knn_diagnostics.py: the layer capture and the resizing it reports numbers from."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.config import default_config, set_dataset
from ssljax.models import build_encoder

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "knn_diagnostics.py")


@pytest.fixture(scope="module")
def diag():
  spec = importlib.util.spec_from_file_location("knn_diagnostics", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny_encoder():
  c = default_config()
  set_dataset(c, "fashion_mnist")
  c.model.encoder = "resnet_tiny"
  c.model.expand_features = 24
  return build_encoder(c)


def test_residual_blocks_are_listed_in_forward_order_with_their_widths(diag):
  encoder = _tiny_encoder()
  x = jnp.zeros((2, 20, 20, 1))
  variables = encoder.init(jax.random.key(0), x, train=False)
  blocks = diag.residual_blocks(encoder, variables, (20, 20, 1))
  assert blocks == [("stage1_block1", 16), ("stage2_block1", 32), ("stage3_block1", 64)]


def test_layer_encoder_ends_with_the_encoder_output_and_pools_each_block(diag):
  encoder = _tiny_encoder()
  x = jax.random.uniform(jax.random.key(1), (3, 20, 20, 1))
  variables = encoder.init(jax.random.key(0), x, train=False)
  blocks = diag.residual_blocks(encoder, variables, (20, 20, 1))
  features = diag.layer_encoder(encoder, [name for name, _ in blocks])(variables, x)
  assert features.shape == (3, 16 + 32 + 64 + 24)
  np.testing.assert_allclose(features[:, -24:], encoder.apply(variables, x, train=False),
                             rtol=1e-6, atol=1e-6)
  # The stage-3 block's pooled output, recomputed from its captured activation map.
  _, state = encoder.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
  stage3 = state["intermediates"]["stage3_block1"]["__call__"][0]
  np.testing.assert_allclose(features[:, 48:112], stage3.mean(axis=(1, 2)), rtol=1e-6,
                             atol=1e-6)


def test_resize_images_keeps_native_size_and_constant_images(diag):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
  assert diag.resize_images(images, 28) is images
  flat = np.full((3, 28, 28, 1), 77, np.uint8)
  out = diag.resize_images(flat, 20, chunk=2)
  assert out.shape == (3, 20, 20, 1) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 77)
