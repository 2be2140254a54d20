"""SimCLR on Fashion-MNIST, CPU-sized: the embedded default job.

Command (fresh Debian/Ubuntu machine, see README):
  bash launch/local.sh     # = ssljax train --config configs/simclr_fashion_mnist.py \
                           #       --workdir runs/simclr_fashion_mnist

Measured (2026-11-23, seed 0, 2-core AMD EPYC CPU, idle, jax 0.10.2, `bash launch/local.sh`):
  12 epochs, kNN top-1 0.8252 (k=200, t=0.1), linear probe 0.8893, 12 min 3 s wall including
  install check, compile, monitors and evaluation (median 1198 images/s). Raw pixels give kNN
  0.7885 (0.8447 at k=20) and a random-init encoder 0.7666 under the same protocol.
"""

from ssljax.config import default_config, set_augment_preset, set_cpu_job, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "fashion_mnist")
  set_augment_preset(c, "fashion_mnist_cpu")
  set_cpu_job(c)

  c.method.name = "simclr"
  c.method.simclr.temperature = 0.2
  c.method.simclr.proj_hidden_dim = 512
  c.method.simclr.proj_dim = 128

  c.optim.name = "lars"
  c.optim.lr = 3.0  # per 256 images; short runs learn faster with a high LARS rate
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0
  return c
