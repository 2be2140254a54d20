"""benchmarks/cpu_step.py: its PyTorch twin's LARS is ssljax's LARS, the convolutions it times
alone are the ones the step runs, and its flag sweep's options parse (the timing is not
tested)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssljax.config import default_config
from ssljax.train.optim import build_optimizer
from tests.util import load_benchmark, tiny_config


@pytest.fixture(scope="module")
def bench():
  return load_benchmark("cpu_step")


def test_torch_lars_takes_ssljax_lars_steps(bench):
  # Three steps on a kernel (adapted, decayed), a bias and a zero tensor (both unadapted): the
  # PyTorch twin must do the optimiser work ssljax's step does, or the timing compares unequal
  # steps.
  torch = pytest.importorskip("torch")
  optim = default_config("simclr").optim
  optim.name, optim.lars_eta, optim.weight_decay, optim.momentum = "lars", 0.02, 1e-3, 0.9
  rng = np.random.default_rng(0)
  params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32),
            "zero": np.zeros((2, 2), np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(3)]
  tx = build_optimizer(optim, optax.constant_schedule(0.1))
  p = {k: jnp.asarray(v) for k, v in params.items()}
  state = tx.init(p)
  tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  lars = bench._torch_lars_class()(list(tensors.values()), lr=0.1, momentum=0.9,
                                   weight_decay=1e-3, eta=0.02, exclude_bias_and_norm=True)
  for g in grads:
    updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, updates)
    for k, t in tensors.items():
      t.grad = torch.from_numpy(g[k])
    lars.step()
  for k, t in tensors.items():
    np.testing.assert_allclose(t.detach().numpy(), np.asarray(p[k]), rtol=1e-5, atol=1e-6)


def test_encoder_convolutions_are_recorded_on_the_views_not_the_stored_images(bench, tmp_path):
  config = tiny_config(str(tmp_path))  # 16 px images
  config.augment.crop_size = 12
  layers = bench.encoder_convolutions(bench.JaxSetup(config))
  rows = config.train.batch_size * 2
  assert layers[0]["input"] == [rows, 12, 12, 1]  # the stem sees the 12 px views
  assert layers[0]["kernel"] == [3, 3] and layers[0]["strides"] == [2, 2]
  assert all(layer["input"][1] <= 12 for layer in layers)  # none at the stored 16 px


def test_every_sweep_flag_set_becomes_compiler_options(bench):
  sets = bench.sweep_flag_sets()
  assert len({name for name, _ in sets}) == len(sets)
  for name, flags in sets:
    options = bench.xla_flags_to_options(flags)
    assert len(options) == len({t.split("=")[0] for t in flags.split()}), name
    assert all(key.startswith("xla_cpu_") for key in options), name
  preset = bench.xla_flags_to_options(dict(sets)["cli + FAST_RUNTIME preset"])
  assert preset["xla_cpu_opt_preset"] == "CPU_OPT_PRESET_FAST_RUNTIME"
  with pytest.raises(ValueError, match="full fusion-type list"):
    bench.xla_flags_to_options("--xla_cpu_experimental_ynn_fusion_type=-individual_dot")


def test_sweep_compares_with_the_first_rows_of_no_flags_and_of_the_cli_flags(bench):
  cli = bench.cli_xla_flags()
  timed = {name: {"xla_flags": flags} for name, flags in bench.sweep_flag_sets()}
  assert sum(row["xla_flags"] == cli for row in timed.values()) >= 2  # a duplicate follows
  assert bench.sweep_baselines(timed, cli) == ("none (XLA defaults)", "cli (CPU_XLA_FLAGS)")
  del timed["none (XLA defaults)"]
  assert bench.sweep_baselines(timed, cli)[0] is None
