"""The per-epoch warmup + cosine schedule of the DISSL/CISSL code (pl_bolts
LinearWarmupCosineAnnealingLR stepped once per epoch)."""

import math

import pytest

from ssljax.config import default_config
from ssljax.train.optim import build_schedule


def _optim(**changes):
  optim = default_config("simclr").optim
  optim.schedule = "warmup_cosine_per_epoch"
  optim.lr, optim.warmup_epochs = 2e-3, 10.0
  for key, value in changes.items():
    optim[key] = value
  return optim


def _reference(epoch, base=2e-3, warmup=10, epochs=300):
  # pl_bolts' closed form with warmup_start_lr = 0, eta_min = 0.
  if epoch < warmup:
    return epoch * base / max(1, warmup - 1)
  return 0.5 * base * (1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))


def test_matches_the_closed_form_and_is_constant_within_an_epoch():
  schedule = build_schedule(_optim(), global_batch=256, total_steps=300 * 7, steps_per_epoch=7)
  for epoch in (0, 1, 5, 9, 10, 11, 150, 299):
    for offset in (0, 6):
      assert float(schedule(7 * epoch + offset)) == pytest.approx(_reference(epoch), abs=1e-9)
  assert float(schedule(0)) == 0.0  # the first epoch trains at lr 0
  assert float(schedule(7 * 9)) == pytest.approx(2e-3)  # the peak at epoch W - 1


def test_bad_settings():
  with pytest.raises(ValueError, match="whole number of epochs"):
    build_schedule(_optim(warmup_epochs=0.5), global_batch=256, total_steps=100,
                   steps_per_epoch=10)
  with pytest.raises(ValueError, match="warmup_cosine_per_epoch"):
    build_schedule(_optim(schedule="per_epoch"), global_batch=256, total_steps=100,
                   steps_per_epoch=10)
