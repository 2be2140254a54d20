"""benchmarks/method_step.py: the memory column and the arms it builds, not the timing."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
_MIB = 2 ** 20


@pytest.fixture(scope="module")
def bench():
  sys.path.insert(0, os.path.abspath(_BENCH))  # method_step imports its sibling cpu_step
  try:
    spec = importlib.util.spec_from_file_location("method_step",
                                                  os.path.join(_BENCH, "method_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module


def test_step_memory_counts_arguments_outputs_and_donation(bench):
  x = jnp.zeros((_MIB // 4,), jnp.float32)  # 1 MiB
  plain = bench.step_memory(jax.jit(lambda v: v * 2.0).lower(x).compile())
  # One MiB in, one MiB out, nothing aliased: at least 2 MiB at the peak.
  assert plain["peak_mib"] >= 2.0 - 1e-6
  assert plain["temp_mib"] >= 0.0
  donated = bench.step_memory(
      jax.jit(lambda v: v * 2.0, donate_argnums=0).lower(x).compile())
  # Donating the input lets XLA write the output into it: one MiB less at the peak.
  assert donated["peak_mib"] == pytest.approx(plain["peak_mib"] - 1.0, abs=1e-3)


def test_memory_arms_build_their_method(bench):
  reference = bench.cpu_step.load_config(bench.config_spec("simclr"))
  remat = bench.method_config("metamask[remat]", reference, 64)
  assert remat.method.metamask.remat_backbone
  assert remat.train.batch_size == 64
  issl_head = bench.method_config("simclr[issl head]", reference, 64)
  assert issl_head.method.simclr.proj_hidden_dim == 1024
  assert issl_head.method.simclr.proj_last_bn
  assert issl_head.model.to_dict() == reference.model.to_dict()


def test_dino_arm_gets_dissls_views(bench):
  # DISSL over DINO is only a like-for-like ratio when both augment the same views.
  reference = bench.cpu_step.load_config(bench.config_spec("simclr"))
  dino = bench.method_config("dino[dissl views]", reference, 64)
  dissl = bench.method_config("dissl", reference, 64)
  assert dino.method.name == "dino"
  assert dino.augment.to_dict() == dissl.augment.to_dict()
  assert dino.model.to_dict() == dissl.model.to_dict()
