"""SwAV on CIFAR-10: the solo-learn recipe of SPEC 6.4 (ResNet-18, 1000 epochs, queue).

Command (CIFAR-10 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-10-python.tar.gz):
  ssljax train --config configs/swav_cifar10.py --workdir runs/swav_cifar10 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.4, solo-learn scripts/pretrain/cifar/swav.yaml): CIFAR ResNet-18 (3x3 stem,
no max-pool), projector 512-2048-128 with BN + ReLU, 3000 prototypes, temperature 0.1,
Sinkhorn eps 0.05 with 3 iterations, a queue of 3840 projections (15 batches) that starts
filling at epoch 50 and joins the codes once full, prototypes frozen for 2 epochs, LARS lr 0.6
per 256 images, eta 0.02, weight decay 1e-6, biases and BN excluded from LARS, warmup (10
epochs) + cosine, batch 256, 1000 epochs, sync BN, `symmetric` augmentations (two 32 px crops,
RRC 0.08-1, colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5 as SPEC lists
it, flip 0.5; no multi-crop). Before the queue joins, Sinkhorn sees 256 samples for 3000
prototypes, so the codes are soft for the first 50 epochs, as in solo-learn. Deviations:
solo-learn's LARS clips the adaptive rate (clip_lr) and trains in 16-bit mixed precision;
ssljax's LARS does not clip, and this config computes in float32. Prototypes follow the
official SwAV code (re-normalised after every step) where solo-learn uses a weight-normalised
layer (gradient through the normalisation); crops of one resolution share one forward (BN
over both views) where solo-learn forwards each crop alone; solo-learn fills the queue from
step 0 and uses it at epoch 50, ssljax starts filling it at epoch 50 (used 15 steps
later). SPEC 6.4 notes from the SwAV issues that a lower eps (0.01-0.03) and colour-jitter
strength 0.5 helped on CIFAR; the recipe here keeps solo-learn's values.

Published (not measured by ssljax): 89.17% linear top-1 on CIFAR-10 after 1000 epochs,
solo-learn README (SPEC 6 table). Hardware / time: one GPU suffices (solo-learn's config runs
on one device at batch 256); not run by ssljax yet, so no time of ours is quoted.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar10")
  set_augment_preset(c, "symmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "swav"
  c.method.swav.temperature = 0.1
  c.method.swav.epsilon = 0.05
  c.method.swav.sinkhorn_iters = 3
  c.method.swav.num_prototypes = 3000
  c.method.swav.proj_hidden_dim = 2048
  c.method.swav.proj_dim = 128
  c.method.swav.queue_size = 3840
  c.method.swav.queue_start_epoch = 50.0
  c.method.swav.freeze_prototypes_epochs = 2.0
  c.method.swav.crops_for_assign = (0, 1)

  c.optim.name = "lars"
  c.optim.lr = 0.6
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.02
  c.optim.lars_exclude_bias_and_norm = True
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs
  return c
