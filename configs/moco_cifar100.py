"""MoCo v2 on CIFAR-100: solo-learn's MoCo V2+ recipe of SPEC 6.2 (ResNet-18, 1000 epochs).

Command (CIFAR-100 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-100-python.tar.gz):
  ssljax train --config configs/moco_cifar100.py --workdir runs/moco_cifar100 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.2, solo-learn scripts/pretrain/cifar/mocov2plus.yaml): CIFAR ResNet-18 (3x3
stem, no max-pool), projector 512-2048-256 (Linear-ReLU-Linear, no BN), temperature 0.2,
symmetric loss (the mean of the two terms), key-encoder EMA momentum cosine from 0.99 to
0.999, SGD (momentum 0.9) at 0.3 per 256 images with weight decay 1e-4, warm-up (10 epochs) +
cosine, batch 256, 1000 epochs, sync BN; `symmetric_weak` augmentations: RRC 0.08-1, colour
jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, blur p 0.5, flip 0.5.
Deviations: solo-learn keeps one queue of 32768 keys per view (a query meets only earlier keys
of the other view); ssljax keeps the official single queue fed with both views' keys, here of
65536 rows: the same memory and the same 128 steps of history, and every query also meets the
keys of its own view of those steps. solo-learn's warm-up starts at 3e-5 rather than 0, and
it trains in 16-bit mixed precision (here float32 unless train.compute_dtype). No Shuffle-BN
(see ssljax/methods/moco.py).

Published (not measured by ssljax): 69.89% linear top-1 on CIFAR-100 after 1000 epochs
(92.94% on CIFAR-10 with the same recipe), solo-learn README (SPEC 6 table). Hardware /
time: one GPU suffices (solo-learn's config runs on one device at batch 256); not run by
ssljax yet, so no time of ours is quoted.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar100")
  set_augment_preset(c, "symmetric_weak")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "moco"
  hp = c.method.moco
  hp.temperature = 0.2
  hp.queue_size = 65536
  hp.ema_momentum = 0.99
  hp.ema_momentum_final = 0.999
  hp.symmetric = True
  hp.proj_hidden_dim = 2048
  hp.proj_dim = 256
  hp.proj_layers = 2
  hp.num_views = 2

  c.optim.name = "sgd"
  c.optim.lr = 0.3
  c.optim.base_batch_size = 256
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs
  return c
