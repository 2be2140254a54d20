"""SwAV on ImageNet-1k: the paper's 800-epoch multi-crop ResNet-50 recipe.

Command (ImageNet prepared by TFDS in DATA_DIR; a TPU pod or 64 GPUs):
  ssljax train --config configs/swav_imagenet.py --workdir gs://BUCKET/swav_in1k \
      --config.data.data_dir=DATA_DIR

Recipe (facebookresearch/swav scripts/swav_800ep_pretrain.sh; SPEC 6.4): ResNet-50 (7x7
stem + max-pool), projector 2048-2048-128 (Linear-BN-ReLU-Linear), 3000 prototypes,
temperature 0.1, Sinkhorn eps 0.05 with 3 iterations, codes of the two global crops
(crops_for_assign 0, 1), multi-crop 2 x 224 px (area 0.14-1) + 6 x 96 px (area 0.05-0.14),
colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5 (sigma 0.1-2), flip 0.5;
batch 4096 (64 per GPU on 64 GPUs), no queue (the batch exceeds the prototypes), prototypes
frozen for the first epoch (313 iterations), LARC with trust coefficient 0.001 on every
parameter, base lr 4.8 at 4096 (0.3 per 256 images) after 10 warmup epochs from 0.3, cosine
to 0.0048, weight decay 1e-6, sync BN, mixed precision, 800 epochs. Input statistics are
SwAV's (std 0.228 for red, SPEC 1.9).
Deviations: apex LARC divides by ||g|| + wd ||w|| where ssljax's LARS uses ||g + wd w||; the
official code re-normalises the prototypes before each forward pass, ssljax after each
update (equivalent, see ssljax/methods/swav.py). For batch 256 the official
swav_200ep_bs256 script uses lr 0.6 per 256, final lr 0.0006, no warmup, and a queue of
3840 from epoch 15 (--config.method.swav.queue_size=3840
--config.method.swav.queue_start_epoch=15).

Published (not measured by ssljax): 75.3% ImageNet top-1 linear evaluation after 800 epochs
(facebookresearch/swav README). Hardware / time: the README's running-time table gives 3 min
40 s per epoch at batch 4096 with this script's 64 GPUs (8 nodes), about 49 h for 800 epochs.

Status: ImageNet's images have varying sizes, so the host must decode and pre-crop them; the
in-memory sources of ssljax.data refuse that with a clear error. This config holds the recipe
for the streaming TFDS source that comes with the TPU-pod launcher; it does not run yet.
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "imagenet")
  c.data.std = (0.228, 0.224, 0.225)  # SwAV's statistics (SPEC 1.9)

  # The `symmetric` views on SwAV's multi-crop: 2 x 224 px (area 0.14-1) + 6 x 96 px
  # (area 0.05-0.14).
  set_augment_preset(c, "symmetric")
  c.augment.policy = "multicrop"
  c.augment.crop_scale = (0.14, 1.0)
  c.augment.num_small_crops = 6
  c.augment.small_crop_size = 96
  c.augment.small_crop_scale = (0.05, 0.14)

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"

  c.method.name = "swav"
  c.method.swav.temperature = 0.1
  c.method.swav.epsilon = 0.05
  c.method.swav.sinkhorn_iters = 3
  c.method.swav.num_prototypes = 3000
  c.method.swav.proj_hidden_dim = 2048
  c.method.swav.proj_dim = 128
  c.method.swav.queue_size = 0
  c.method.swav.queue_start_epoch = 15.0
  c.method.swav.freeze_prototypes_epochs = 1.0
  c.method.swav.crops_for_assign = (0, 1)

  c.optim.name = "lars"
  c.optim.lr = 0.3
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.001
  c.optim.lars_exclude_bias_and_norm = False
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0
  c.optim.warmup_init_fraction = 0.0625  # 0.3 / 4.8
  c.optim.final_lr_fraction = 0.001  # 0.0048 / 4.8

  c.train.batch_size = 4096
  c.train.epochs = 800.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 4096
  c.eval.monitor_train_examples = 50000
  c.eval.monitor_test_examples = 10000
  return c
