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

  # As configs/simclr_fashion_mnist.py.
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

  c.train.batch_size = 256
  c.train.epochs = 12.0
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.eval_every_steps = 234
  return c
