"""NPID on Fashion-MNIST, CPU-sized: the SimCLR default job with NPID's memory bank.

Command:
  ssljax train --config configs/npid_fashion_mnist.py --workdir runs/npid_fashion_mnist

Same data, crops, backbone, batch, length and optimiser as configs/simclr_fashion_mnist.py
(resnet_tiny + 1x1 expansion to 512 features, batch 256, 12 epochs, LARS 3.0 per 256 images),
so the comparison isolates the objective. Method (SPEC 6.6, CLD's NPID branch of SPEC 5.5):
linear head to 128 dimensions, L2-normalised; full softmax over a memory bank of all 60,000
training images (no NCE), temperature 0.1, bank momentum 0.5; one view per image. Each bank
row is rewritten once per epoch, so in 12 epochs the bank is young: NPID is expected to trail
the methods that contrast two fresh views. The augmentation policy still draws two views (it
needs at least two); NPID uses the first.

Measured (2026-11-23, seed 0, 2-core AMD EPYC CPU, jax 0.10.2) with
`--config.train.epochs=6` (`python benchmarks/fashion_mnist_table.py --epochs 6`): kNN
top-1 0.6599 (k=200, t=0.1), linear probe 0.7780, 419 s wall for
training + evaluation. The full 12 epochs were not run; all baselines: docs/results.md.

The shared settings are the first recipe of the SimCLR job (28x28 views, 12 epochs); that
job has since moved to 20x20 views for 26 epochs (README), which was not tried here.
"""

from ssljax.config import default_config, set_augment_preset, set_cpu_job, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "fashion_mnist")
  set_augment_preset(c, "fashion_mnist_cpu")
  set_cpu_job(c)

  c.method.name = "npid"
  hp = c.method.npid
  hp.temperature = 0.1
  hp.proj_dim = 128
  hp.bank_size = 0  # the training-set size (60,000)
  hp.bank_momentum = 0.5
  hp.nce_negatives = 0
  hp.num_views = 1

  c.optim.name = "lars"
  c.optim.lr = 3.0
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0
  return c
