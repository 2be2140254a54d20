"""BYOL on CIFAR-100: the solo-learn recipe of SPEC 6.3 (ResNet-18, 1000 epochs).

Command (CIFAR-100 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-100-python.tar.gz):
  ssljax train --config configs/byol_cifar100.py --workdir runs/byol_cifar100 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.3, solo-learn scripts/pretrain/cifar/byol.yaml): CIFAR ResNet-18 (3x3 stem,
no max-pool), projector 512-4096-256 and predictor 256-4096-256 (Linear-BN-ReLU-Linear),
each view through the networks separately (per-view BN, synchronised across devices), target
EMA momentum cosine from 0.99 to 1, LARS lr 1.0 per 256 images, eta 0.02, weight decay 1e-5,
biases and BN excluded from LARS, warmup (10 epochs) + cosine, batch 256, 1000 epochs;
`asymmetric` augmentations (SPEC 6): RRC 0.08-1, colour jitter 0.4/0.4/0.2/0.1 with p 0.8,
grayscale 0.2, flip 0.5, no blur, solarisation p 0.2 on the second view only.
CIFAR-100 runs the CIFAR-10 recipe unchanged, with CIFAR-100's channel statistics.
Deviations: solo-learn's LARS also clips the adaptive rate (`clip_lr`) and its warmup starts
at 3e-5 rather than 0; solo-learn trains in fp16 (here float32 unless train.compute_dtype).

Published (not measured by ssljax): 70.46% linear top-1 after 1000 epochs, solo-learn README
(SPEC 6 table). Hardware / time: one GPU suffices (solo-learn's config runs on one device at
batch 256); not run by ssljax yet, so no time of ours is quoted.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar100")
  set_augment_preset(c, "asymmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "byol"
  c.method.byol.proj_hidden_dim = 4096
  c.method.byol.proj_dim = 256
  c.method.byol.pred_hidden_dim = 4096
  c.method.byol.ema_momentum = 0.99
  c.method.byol.ema_momentum_final = 1.0
  c.method.byol.per_view_forward = True

  c.optim.name = "lars"
  c.optim.lr = 1.0
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs
  return c
