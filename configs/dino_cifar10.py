"""DINO on CIFAR-10: the solo-learn recipe (ResNet-18, 1000 epochs), official DINO layout.

Command (CIFAR-10 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-10-python.tar.gz):
  ssljax train --config configs/dino_cifar10.py --workdir runs/dino_cifar10 \
      --config.data.data_dir=DATA_DIR

Recipe (solo-learn scripts/pretrain/cifar/dino.yaml and solo/methods/dino.py; the only
published CIFAR recipe for DINO with a ResNet): CIFAR ResNet-18 (3x3 stem, no max-pool),
official DINO head 512-2048-2048-256 (Linear-GELU, no BN, biases) -> L2-normalise ->
unit-norm layer to K = 4096, student temperature 0.1, teacher temperature 0.04 -> 0.07 over
50 epochs then constant, one centre update per step (momentum 0.9, mean of both views),
teacher EMA cosine from 0.9995 to 1, last layer frozen for the first epoch, each view through
the networks separately (per-view BN, synchronised across devices), the student evaluated;
LARS lr 0.3 per 256 images, eta 0.02, weight decay 1e-6, biases and BN excluded from LARS,
warmup (10 epochs) + cosine, batch 256, 1000 epochs; `asymmetric` augmentations (SPEC 6):
RRC 0.08-1, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, flip 0.5, no blur,
solarisation p 0.2 on the second view only.
For the DISSL/CISSL code's variant (SPEC 2.3b) use the `method.dino` defaults instead (head
z-1024-BN-GELU, normalised before the bottleneck, K = 1000, per-pair centre updates).
Deviations: solo-learn's LARS also clips the adaptive rate (`clip_lr`) and its warmup starts
at 3e-5 rather than 0; solo-learn trains in fp16 (here float32 unless train.compute_dtype).

Published (not measured by ssljax): 89.52% linear top-1 after 1000 epochs, solo-learn README
(CIFAR table, DINO row). Hardware / time: one GPU suffices (solo-learn's config runs on one
device at batch 256); not run by ssljax yet, so no time of ours is quoted.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar10")
  set_augment_preset(c, "asymmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "dino"
  hp = c.method.dino
  hp.proj_hidden_dim = 2048
  hp.bottleneck_dim = 256
  hp.out_dim = 4096
  hp.proj_layers = 3
  hp.proj_bn = False
  hp.proj_bias = True
  hp.normalize_before_bottleneck = False
  hp.student_temperature = 0.1
  hp.teacher_temperature = 0.07
  hp.teacher_temperature_warmup = 0.04
  hp.teacher_temperature_warmup_epochs = 50.0
  hp.center_momentum = 0.9
  hp.sequential_center = False
  hp.ema_momentum = 0.9995
  hp.ema_momentum_final = 1.0
  hp.freeze_last_layer_epochs = 1.0
  hp.per_view_forward = True
  hp.eval_teacher = False

  c.optim.name = "lars"
  c.optim.lr = 0.3
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs
  return c
