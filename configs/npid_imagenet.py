"""NPID on ImageNet-1k: the original NCE recipe (zhirongw/lemniscate.pytorch main.py).

Command (ImageNet prepared by TFDS in DATA_DIR; 8 GPUs or a TPU slice):
  ssljax train --config configs/npid_imagenet.py --workdir gs://BUCKET/npid_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.6; main.py defaults with the README's command): ResNet-50 (7x7 stem +
max-pool), linear head 2048-128 with bias, L2-normalised; a memory bank of all 1,281,167
training images (about 656 MB in float32, replicated on every device), NCE with 4096 uniform
noise samples per image and the normaliser Z estimated on the first batch, temperature 0.07,
bank momentum 0.5; SGD (momentum 0.9) at 0.03 for batch 256 with weight decay 1e-4, 200
epochs; augmentations: RRC 224 (0.2-1), grayscale 0.2, colour jitter 0.4/0.4/0.4/0.4 always
applied, flip 0.5.
Deviations: the original drops the learning rate 10x at epochs 120 and 160; ssljax has no step
schedule and uses a cosine instead. The original applies grayscale before the colour jitter,
ssljax's policy after it. The original's BN statistics are per GPU (DataParallel); here they
span the global batch. This config computes in bfloat16 (the original in float32).

Published (not measured by ssljax): top-1 accuracy 46.8% for ResNet-50 (41.0% for
ResNet-18), the lemniscate.pytorch README, which evaluates with its weighted kNN classifier.

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")
  set_augment_preset(c, "npid")

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"

  c.method.name = "npid"
  hp = c.method.npid
  hp.temperature = 0.07
  hp.proj_dim = 128
  hp.bank_size = 0  # the training-set size
  hp.bank_momentum = 0.5
  hp.nce_negatives = 4096
  hp.num_views = 1

  c.optim.name = "sgd"
  c.optim.lr = 0.03
  c.optim.base_batch_size = 256
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr_fraction = 0.0

  c.train.batch_size = 256
  c.train.epochs = 200.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 1024
  c.eval.monitor_train_examples = 50000
  c.eval.monitor_test_examples = 10000
  return c
