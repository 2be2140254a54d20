"""SimCLR on ImageNet-1k: the original paper's ResNet-50 recipe.

Command (ImageNet prepared by TFDS in DATA_DIR; a TPU pod or 8+ GPUs):
  ssljax train --config configs/simclr_imagenet.py --workdir gs://BUCKET/simclr_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (SimCLR paper defaults, [UNVERIFIED] in SPEC 6.1): ResNet-50 (7x7 stem + max-pool),
projector 2048-2048-128 with BN, temperature 0.1, batch 4096, LARS lr 0.3 per 256 images
(4.8 at 4096), weight decay 1e-6, 10 warmup epochs then cosine, 100 epochs; augmentations:
RRC 224 (0.08-1), colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5 with
sigma 0.1-2, flip 0.5.

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")
  set_augment_preset(c, "symmetric")

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"

  c.method.name = "simclr"
  c.method.simclr.temperature = 0.1
  c.method.simclr.proj_hidden_dim = 2048
  c.method.simclr.proj_dim = 128
  c.method.simclr.proj_last_bn = True

  c.optim.name = "lars"
  c.optim.lr = 0.3
  c.optim.base_batch_size = 256
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 4096
  c.train.epochs = 100.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 4096
  c.eval.monitor_train_examples = 50000
  c.eval.monitor_test_examples = 10000
  return c
