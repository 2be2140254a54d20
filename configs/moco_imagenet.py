"""MoCo v2 on ImageNet-1k: the paper's 200-epoch ResNet-50 recipe (facebookresearch/moco).

Command (ImageNet prepared by TFDS in DATA_DIR; 8 GPUs or a TPU slice):
  ssljax train --config configs/moco_imagenet.py --workdir gs://BUCKET/moco_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.2; the README's MoCo v2 flags `--mlp --moco-t 0.2 --aug-plus --cos` on the
main_moco.py defaults): ResNet-50 (7x7 stem + max-pool), projection head 2048-2048-128
(Linear-ReLU-Linear, no BN), asymmetric loss, temperature 0.2, a queue of 65536 keys, key
encoder EMA momentum 0.999 (constant), SGD (momentum 0.9) at 0.03 per 256 images with weight
decay 1e-4, cosine schedule without warm-up, batch 256, 200 epochs; augmentations ("aug+"):
RRC 224 (0.2-1), colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, Gaussian blur
(sigma 0.1-2) with p 0.5, flip 0.5.
Deviations: the official code uses per-GPU BN with Shuffle-BN for the key encoder; ssljax
synchronises BN over the global batch for both encoders and does not shuffle (see
ssljax/methods/moco.py). The official cosine is stepped per epoch, here per step; this config
computes in bfloat16 (the official code in float32).

Published (not measured by ssljax): 67.5 +- 0.1% ImageNet linear top-1 (5 trials), 53 hours
of pre-training on 8 NVIDIA V100 GPUs (facebookresearch/moco README; SPEC 5.7 lists the same
67.5 from the CLD README).

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")
  set_augment_preset(c, "moco_v2_aug_plus")

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"

  c.method.name = "moco"
  hp = c.method.moco
  hp.temperature = 0.2
  hp.queue_size = 65536
  hp.ema_momentum = 0.999
  hp.ema_momentum_final = 0.999
  hp.symmetric = False
  hp.proj_hidden_dim = 2048
  hp.proj_dim = 128
  hp.proj_layers = 2
  hp.num_views = 2

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
