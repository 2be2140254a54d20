"""SwAV on Fashion-MNIST, CPU-sized: the same data, views and encoder as the SimCLR job.

Command:
  ssljax train --config configs/swav_fashion_mnist.py --workdir runs/swav_fashion_mnist

Measured (2026-11-23, seed 0, 2-core AMD EPYC CPU, jax 0.10.2) with
`--config.train.epochs=6` (`python benchmarks/fashion_mnist_table.py --epochs 6`): kNN
top-1 0.8130 (k=200, t=0.1), linear probe 0.8750, 428 s wall for
training + evaluation. The full 12 epochs were not run; all baselines: docs/results.md.

Recipe: the views, encoder and batch of configs/simclr_fashion_mnist.py (two 28x28 crops,
resnet_tiny + a 1x1 expansion to 512 features, batch 256, 12 epochs), with SwAV's head and
loss (SPEC 6.4): projector 512-512-128, 100 prototypes (10 per class; SwAV's 3000 are for
ImageNet's 1000 classes), temperature 0.1, Sinkhorn eps 0.05 with 3 iterations, prototypes
frozen for the first epoch (official: one epoch, 313 iterations at batch 4096). The batch
(256) exceeds the prototypes, so no queue is needed (queue_size 0; the official 800-epoch
recipe has none either). Multi-crop, SwAV's other ingredient, costs about 25% more compute
per step with two 14x14 crops: add it with --config.augment.policy=multicrop
--config.augment.num_small_crops=2 (small crops of 14 px, area 5-40%).
Hardware / time: 2 CPU cores, roughly the SimCLR job's time (the Sinkhorn step is small).

The shared settings are the first recipe of the SimCLR job (28x28 views, 12 epochs); that
job has since moved to 20x20 views for 26 epochs (README), which was not tried here.
"""

from ssljax.config import default_config, set_augment_preset, set_cpu_job, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "fashion_mnist")
  set_augment_preset(c, "fashion_mnist_cpu")
  set_cpu_job(c)

  c.method.name = "swav"
  c.method.swav.temperature = 0.1
  c.method.swav.epsilon = 0.05
  c.method.swav.sinkhorn_iters = 3
  c.method.swav.num_prototypes = 100
  c.method.swav.proj_hidden_dim = 512
  c.method.swav.proj_dim = 128
  c.method.swav.queue_size = 0
  c.method.swav.freeze_prototypes_epochs = 1.0
  c.method.swav.crops_for_assign = (0, 1)

  c.optim.name = "lars"
  c.optim.lr = 3.0  # per 256 images, as the SimCLR CPU job
  c.optim.weight_decay = 1e-6  # SwAV's
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0
  return c
