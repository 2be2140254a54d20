"""SwAV on Fashion-MNIST, CPU-sized: the same data, views and encoder as the SimCLR job.

Command:
  ssljax train --config configs/swav_fashion_mnist.py --workdir runs/swav_fashion_mnist

Measured: see docs/results.md.

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
"""

from ssljax.config import default_config


def get_config():
  c = default_config()
  c.data.source = "fashion_mnist_idx"
  c.data.name = "fashion_mnist"
  c.data.image_size = 28
  c.data.channels = 1
  c.data.num_classes = 10
  c.data.mean = (0.2860,)
  c.data.std = (0.3530,)

  c.augment.policy = "simclr"
  c.augment.crop_size = 28
  c.augment.crop_scale = (0.3, 1.0)
  c.augment.jitter = (0.4, 0.4, 0.0, 0.0)
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.0
  c.augment.blur_prob = 0.0
  c.augment.solarize_prob = 0.0

  c.model.encoder = "resnet_tiny"
  c.model.expand_features = 512

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

  c.train.batch_size = 256
  c.train.epochs = 12.0
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.eval_every_steps = 234
  return c
