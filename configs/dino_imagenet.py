"""DINO on ImageNet-1k: the official ResNet-50 recipe (facebookresearch/dino).

Command (ImageNet prepared by TFDS in DATA_DIR; 8+ GPUs or a TPU pod):
  ssljax train --config configs/dino_imagenet.py --workdir gs://BUCKET/dino_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (the README's ResNet-50 command, 8 GPUs, 100 epochs: `--arch resnet50 --optimizer sgd
--lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1
--local_crops_scale 0.05 0.14`, every other setting at main_dino.py's default): ResNet-50
(7x7 stem + max-pool); head 2048-2048-2048-256 (Linear-GELU, no BN in the head, biases) ->
L2-normalise -> unit-norm layer to K = 65536; student temperature 0.1, teacher temperature
0.04 (no warm-up); centre momentum 0.9, one update per step from both global crops; teacher
EMA cosine from 0.996 to 1; last layer frozen for the first epoch; the teacher is evaluated;
2 global crops 224 (scale 0.14-1) + 8 small crops 96 (scale 0.05-0.14), crops of one
resolution concatenated in one forward; batch 64 per GPU x 8 = 512; SGD (momentum 0.9) at
0.03 per 256 images with weight decay 1e-4, 10 warmup epochs, cosine to 1e-6.
Deviations: official DINO clips each parameter's gradient to norm 3 (ssljax clips the global
norm only; off here) and exempts biases and BN parameters from weight decay (ssljax's 'sgd'
decays every parameter); its augmentations differ per crop (blur p 1.0 / 0.1 / 0.5 for global 1,
global 2 and small crops, solarisation 0.2 on global 2), while ssljax's 'multicrop' policy
gives every crop the same settings (blur p 0.5, no solarisation here).

Published (not measured by ssljax): ResNet-50 75.3% top-1 linear and 67.5% k-NN on ImageNet,
facebookresearch/dino README (released checkpoint). Hardware / time: the README's command
runs on one node with 8 GPUs for 100 epochs (its time is not stated).

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")

  c.augment.policy = "multicrop"
  c.augment.crop_scale = (0.14, 1.0)
  c.augment.num_small_crops = 8
  c.augment.small_crop_size = 96
  c.augment.small_crop_scale = (0.05, 0.14)
  c.augment.jitter = (0.4, 0.4, 0.2, 0.1)
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.blur_prob = 0.5
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.solarize_prob = 0.0

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"

  c.method.name = "dino"
  hp = c.method.dino
  hp.proj_hidden_dim = 2048
  hp.bottleneck_dim = 256
  hp.out_dim = 65536
  hp.proj_layers = 3
  hp.proj_bn = False
  hp.proj_bias = True
  hp.normalize_before_bottleneck = False
  hp.student_temperature = 0.1
  hp.teacher_temperature = 0.04
  hp.teacher_temperature_warmup = 0.04
  hp.teacher_temperature_warmup_epochs = 0.0
  hp.center_momentum = 0.9
  hp.sequential_center = False
  hp.ema_momentum = 0.996
  hp.ema_momentum_final = 1.0
  hp.freeze_last_layer_epochs = 1.0
  hp.per_view_forward = False
  hp.eval_teacher = True

  c.optim.name = "sgd"
  c.optim.lr = 0.03
  c.optim.base_batch_size = 256
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 10.0
  c.optim.final_lr_fraction = 1e-6 / 0.06  # min_lr 1e-6 at the peak 0.03 * 512 / 256

  c.train.batch_size = 512
  c.train.epochs = 100.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 1024
  c.eval.monitor_train_examples = 50000
  c.eval.monitor_test_examples = 10000
  return c
