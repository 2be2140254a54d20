"""benchmarks/cpu_step.py: its PyTorch twin's LARS is ssljax's LARS (the timing is not tested)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssljax.config import default_config
from ssljax.train.optim import build_optimizer
from tests.util import load_benchmark


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
