"""MoCo on CIFAR-10: the official CIFAR-10 demo recipe of SPEC 6.2 (ResNet-18, 200 epochs).

Command (CIFAR-10 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-10-python.tar.gz):
  ssljax train --config configs/moco_cifar10.py --workdir runs/moco_cifar10 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.2, facebookresearch/moco branch colab-notebook, colab/moco_cifar10_demo.ipynb):
ResNet-18 with the CIFAR stem (3x3 conv, no max-pool) and a linear 512-128 head (no MLP), the
symmetric loss, temperature 0.1, a queue of 4096 keys, key-encoder EMA momentum 0.99, SGD
(momentum 0.9) at 0.06 for batch 512 with weight decay 5e-4 on every parameter, cosine
schedule without warm-up, batch 512, 200 epochs; views: RRC 32 (0.08-1), flip 0.5, colour
jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, no blur, the demo's CIFAR statistics.
The demo sums the two symmetric terms while ssljax averages them; with SGD and coupled
weight decay, twice the learning rate (0.12) and half the weight decay (2.5e-4) give exactly
the demo's update, which is what this config sets.
Deviations: the demo emulates 8 GPUs with SplitBatchNorm (BN over 64-image chunks) and
shuffles the key batch (Shuffle-BN); ssljax uses BN over the whole batch (synchronised across
devices) for both encoders and does not shuffle (see ssljax/methods/moco.py; the demo notes
that dropping Shuffle-BN cost it 4% at 800 epochs with split BN). The demo steps the cosine
per epoch; ssljax per step.

Published (not measured by ssljax): kNN top-1 (k 200, t 0.1) of 85.3% after 200 epochs with
the symmetric loss (82.6% asymmetric; 88.5 / 89.7% symmetric after 400 / 800 epochs), the
demo's results table (SPEC 6.2, 10.3). The demo's kNN runs on the 128-d head output, ssljax's
on the 512-d backbone features, so the numbers are not strictly comparable. Hardware / time:
one GPU; the demo's log shows about 20 s per training epoch on one Tesla V100 for the
asymmetric loss (about 70 minutes for 200 epochs; the symmetric loss does twice the work).
Not run by ssljax yet, so no time of ours is quoted. solo-learn's MoCo V2+ recipe is
configs/moco_cifar100.py; for CIFAR-10 run it with --config.data.name=cifar10
--config.data.num_classes=10 (published 92.94% linear top-1 after 1000 epochs).
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar10")
  c.data.std = (0.2023, 0.1994, 0.2010)  # the demo's CIFAR statistics

  set_augment_preset(c, "symmetric_weak")
  c.augment.blur_prob = 0.0  # the demo's views have no blur

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "moco"
  hp = c.method.moco
  hp.temperature = 0.1
  hp.queue_size = 4096
  hp.ema_momentum = 0.99
  hp.ema_momentum_final = 0.99
  hp.symmetric = True
  hp.proj_dim = 128
  hp.proj_layers = 1  # the ResNet's fc layer is the projection
  hp.num_views = 2

  c.optim.name = "sgd"
  c.optim.lr = 0.12  # the demo's 0.06 doubled: ssljax averages the two symmetric terms
  c.optim.base_batch_size = 512
  c.optim.momentum = 0.9
  c.optim.weight_decay = 2.5e-4  # the demo's 5e-4 halved, for the same reason
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr_fraction = 0.0

  c.train.batch_size = 512
  c.train.epochs = 200.0
  c.train.checkpoint_every_steps = 2000
  c.train.eval_every_steps = 1940  # every 20 epochs (97 steps per epoch)
  return c
