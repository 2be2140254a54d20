"""NPID on CIFAR-10: CLD's NPID branch of SPEC 5.5/5.6 (ResNet-18, full softmax, 200 epochs).

Command (CIFAR-10 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-10-python.tar.gz):
  ssljax train --config configs/npid_cifar10.py --workdir runs/npid_cifar10 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 5.5/5.6, frank-xwang/CLD-UnsupervisedLearning scripts/cifar and
train_cifar_npid_cld.py without the CLD term): ResNet-18 with the CIFAR stem (3x3 conv, no
max-pool), linear head 512-128 with bias, L2-normalised; full softmax over a memory bank of
all 50,000 training images (nce_k = 0), temperature 0.1, bank momentum 0.5; SGD (momentum
0.9) at 0.03 x batch / 128 (0.06 at batch 256) with weight decay 7e-4 on every parameter,
5 warm-up epochs from lr/100, then a per-step cosine to 1e-6, batch 256, 200 epochs, one view
per image (CLD's NPID+CLD runs the branch on two views: method.npid.num_views = 2); CLD's
`default` views: RRC 32 (0.2-1), colour jitter 0.4/0.4/0.4/0.4 always applied, grayscale 0.2,
flip 0.5, CLD's CIFAR statistics. The original NPID (zhirongw/lemniscate.pytorch cifar.py)
instead used NCE with 4096 noise samples (method.npid.nce_negatives = 4096), batch 128,
constant lr 0.1, weight decay 5e-4 and no flip.
Deviations: the CLD scripts train with apex AMP O1 (here float32 unless train.compute_dtype).

Published (not measured by ssljax): NPID kNN top-1 (k 200) 80.8% on CIFAR-10, ResNet-18,
200 epochs, the CLD README's NPID row (SPEC 5.7, 10.3; the README does not say which script
produced that row). CLD's kNN runs on the 128-d head output with sigma = 0.1; ssljax's
default protocol uses the 512-d backbone features. Hardware / time: one GPU (the CLD CIFAR
scripts run on one); not run by ssljax yet, so no time of ours is quoted.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar10")
  c.data.std = (0.2023, 0.1994, 0.2010)  # CLD's CIFAR statistics

  set_augment_preset(c, "npid")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "npid"
  hp = c.method.npid
  hp.temperature = 0.1
  hp.proj_dim = 128
  hp.bank_size = 0  # the training-set size (50,000)
  hp.bank_momentum = 0.5
  hp.nce_negatives = 0
  hp.num_views = 1

  c.optim.name = "sgd"
  c.optim.lr = 0.03
  c.optim.base_batch_size = 128
  c.optim.momentum = 0.9
  c.optim.weight_decay = 7e-4
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_init_fraction = 0.01
  c.optim.final_lr_fraction = 1e-6 / 0.06

  c.train.batch_size = 256
  c.train.epochs = 200.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 3900  # every 20 epochs (195 steps per epoch)
  return c
