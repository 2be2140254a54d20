"""BYOL on Fashion-MNIST, CPU-sized: the SimCLR default job with BYOL's networks and loss.

Command:
  ssljax train --config configs/byol_fashion_mnist.py --workdir runs/byol_fashion_mnist

Same data, crops, backbone, batch and length as configs/simclr_fashion_mnist.py (resnet_tiny +
1x1 expansion to 512 features, batch 256, 12 epochs), so the methods are compared on equal
terms. Augmentation: the 'byol' policy with solo-learn's CIFAR `asymmetric` choice (no blur,
solarisation p 0.2 on the second view only); colour jitter reduces to brightness/contrast on
one channel. Method (SPEC 6.3): projector 512-1024-256 and predictor 256-1024-256 (Linear-BN-
ReLU-Linear; the published 4096-wide hidden layers shrunk for a 2-core CPU), each view through
the networks separately (per-view BN, as the DeepMind and solo-learn code), target EMA
momentum cosine from 0.99 to 1 (solo-learn CIFAR). Optimiser: solo-learn's CIFAR LARS (lr 1.0
per 256 images, eta 0.02, weight decay 1e-5, biases and BN excluded), warmup half an epoch as
in the SimCLR job.

Measured: see docs/results.md.
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

  # As configs/simclr_fashion_mnist.py, with BYOL's asymmetric second view (solarisation).
  c.augment.policy = "byol"
  c.augment.crop_size = 28
  c.augment.crop_scale = (0.3, 1.0)
  c.augment.jitter = (0.4, 0.4, 0.0, 0.0)
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.0
  c.augment.byol_blur_probs = (0.0, 0.0)
  c.augment.byol_solarize_probs = (0.0, 0.2)

  c.model.encoder = "resnet_tiny"
  c.model.expand_features = 512

  c.method.name = "byol"
  c.method.byol.proj_hidden_dim = 1024
  c.method.byol.proj_dim = 256
  c.method.byol.pred_hidden_dim = 1024
  c.method.byol.ema_momentum = 0.99
  c.method.byol.ema_momentum_final = 1.0
  c.method.byol.per_view_forward = True

  c.optim.name = "lars"
  c.optim.lr = 1.0
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0

  c.train.batch_size = 256
  c.train.epochs = 12.0
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.eval_every_steps = 234
  return c
