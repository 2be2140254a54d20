"""Barlow Twins on ImageNet-1k: the official ResNet-50 recipe (facebookresearch/barlowtwins).

Command (ImageNet prepared by TFDS in DATA_DIR; a TPU pod or 16+ GPUs):
  ssljax train --config configs/barlow_twins_imagenet.py --workdir gs://BUCKET/barlow_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.5, the official main.py defaults): ResNet-50 (7x7 stem + max-pool) with the
last BN of every residual block zero-initialised, projector 2048-8192-8192-8192 (bias-free
Linear-BN-ReLU twice, then a bias-free Linear), lambda 0.0051, no loss scaling, batch 2048,
LARS (momentum 0.9, eta 0.001) at 0.2 per 256 images, weight decay 1e-6 (the code's default),
biases and BN excluded from weight decay and LARS adaptation, 10 warmup epochs from 0, then
cosine to 0.1% of the peak, 1000 epochs, mixed precision; augmentations: RRC 224 (0.08-1),
flip 0.5, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur (sigma 0.1-2) with
p 1.0 / 0.1 and solarisation with p 0.0 / 0.2 for the two views.
Deviation: the official code gives biases and BN parameters their own learning rate (0.0048
per 256 images, 1/41.7 of the weights' rate); ssljax's optimiser has one learning rate, so
they train at the weights' rate (still without decay or trust ratio).

Published (not measured by ssljax): 73.5% top-1 (91.0% top-5) linear evaluation after 1000
epochs at batch 2048, facebookresearch/barlowtwins README; "approximately 7 days on 16 V100
GPUs" for this recipe (same README).

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")

  # The official Transform / transform_prime pair.
  set_augment_preset(c, "byol")

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.model.zero_init_residual = True
  c.train.compute_dtype = "bfloat16"

  c.method.name = "barlow_twins"
  c.method.barlow_twins.lambda_offdiag = 0.0051
  c.method.barlow_twins.scale_loss = 1.0
  c.method.barlow_twins.unbiased_std = False
  c.method.barlow_twins.proj_hidden_dim = 8192
  c.method.barlow_twins.proj_dim = 8192
  c.method.barlow_twins.proj_layers = 3
  c.method.barlow_twins.proj_bias = False

  c.optim.name = "lars"
  c.optim.lr = 0.2
  c.optim.base_batch_size = 256
  c.optim.momentum = 0.9
  c.optim.lars_eta = 0.001
  c.optim.lars_exclude_bias_and_norm = True
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_init_fraction = 0.0
  c.optim.final_lr_fraction = 0.001

  c.train.batch_size = 2048
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 2048
  c.eval.monitor_train_examples = 50000
  c.eval.monitor_test_examples = 10000
  return c
