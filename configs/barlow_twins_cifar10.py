"""Barlow Twins on CIFAR-10: the solo-learn recipe of SPEC 6.5 (ResNet-18, 1000 epochs).

Command (CIFAR-10 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-10-python.tar.gz):
  ssljax train --config configs/barlow_twins_cifar10.py --workdir runs/barlow_twins_cifar10 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.5, solo-learn scripts/pretrain/cifar/barlow.yaml): CIFAR ResNet-18 (3x3 stem,
no max-pool), projector 512-2048-2048-2048 (Linear-BN-ReLU twice, then Linear; solo-learn's
linear layers have biases), lambda 0.0051, loss scaled by 0.1, LARS lr 0.3 per 256 images,
eta 0.02, weight decay 1e-4, biases and BN excluded from LARS, warmup + cosine, batch 256,
1000 epochs; `asymmetric` augmentations (SPEC 6): RRC 0.08-1, colour jitter 0.4/0.4/0.2/0.1
with p 0.8, grayscale 0.2, flip 0.5, no blur, solarisation p 0.2 on the second view only.
Deviation: solo-learn's LARS also clips the adaptive rate (`clip_lr`); ssljax's LARS does not.

Published (not measured by ssljax): 92.10% linear top-1 after 1000 epochs, solo-learn README
(SPEC 6 table). Hardware / time: one GPU suffices (ResNet-18 on 32x32 images at batch 256);
not run by ssljax yet, so no time of ours is quoted.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar10")
  set_augment_preset(c, "asymmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "barlow_twins"
  c.method.barlow_twins.lambda_offdiag = 0.0051
  c.method.barlow_twins.scale_loss = 0.1
  c.method.barlow_twins.unbiased_std = False
  c.method.barlow_twins.proj_hidden_dim = 2048
  c.method.barlow_twins.proj_dim = 2048
  c.method.barlow_twins.proj_layers = 3
  c.method.barlow_twins.proj_bias = True

  c.optim.name = "lars"
  c.optim.lr = 0.3
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs
  return c
