"""BYOL on ImageNet-1k: the paper's ResNet-50 recipe (google-deepmind/deepmind-research/byol).

Command (ImageNet prepared by TFDS in DATA_DIR; a TPU pod):
  ssljax train --config configs/byol_imagenet.py --workdir gs://BUCKET/byol_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.3, byol/configs/byol.py, 1000-epoch preset): ResNet-50 (7x7 stem + max-pool),
projector 2048-4096-256 and predictor 256-4096-256 (Linear-BN-ReLU-Linear), cross-replica BN
(decay 0.9, eps 1e-5) with each view forwarded separately, target EMA base 0.996 raised to 1
by the cosine schedule, batch 4096, LARS (momentum 0.9, eta 0.001) at 0.2 per 256 images
(3.2 at 4096), weight decay 1.5e-6, biases and BN excluded from decay and LARS adaptation, 10
warmup epochs then cosine to 0, 1000 epochs; augmentations: RRC 224 (0.08-1), flip 0.5, colour
jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur (sigma 0.1-2) with p 1.0 / 0.1 and
solarisation with p 0.0 / 0.2 for the two views. Shorter presets of the same file: 300 epochs
lr 0.3, wd 1e-6, EMA 0.99; 100 epochs lr 0.45, wd 1e-6, EMA 0.99.
Deviation: the DeepMind code draws the target's initial weights from a second seed; ssljax
starts the target as a copy of the online network (as solo-learn).

Published (not measured by ssljax): "between 74.0% and 74.5%" top-1 linear evaluation "after
about 8h of training using 512 Cloud TPU v3" (deepmind-research/byol README; the released
ResNet-50 checkpoint "should evaluate to ~74.4%").

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")
  set_augment_preset(c, "byol")

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.model.bn_momentum = 0.9
  c.train.compute_dtype = "bfloat16"

  c.method.name = "byol"
  c.method.byol.proj_hidden_dim = 4096
  c.method.byol.proj_dim = 256
  c.method.byol.pred_hidden_dim = 4096
  c.method.byol.ema_momentum = 0.996
  c.method.byol.ema_momentum_final = 1.0
  c.method.byol.per_view_forward = True

  c.optim.name = "lars"
  c.optim.lr = 0.2
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.001
  c.optim.weight_decay = 1.5e-6
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 4096
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 4096
  c.eval.monitor_train_examples = 50000
  c.eval.monitor_test_examples = 10000
  return c
