"""SwAV + UOTA (UOTA paper, NeurIPS 2021; official ssl-codelab/uota main_uota.py). The argument
is the setting: imagenet, cifar10, fashion_mnist (closed form), fashion_mnist_learned (the
view model in params['uota']), fashion_mnist_base (the same multi-crop SwAV without UOTA, the
comparison's baseline).

Commands:
  ssljax train --config configs/swav_uota.py:imagenet --workdir gs://BUCKET/swav_uota \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/swav_uota.py:cifar10 --workdir runs/swav_uota_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/swav_uota.py:fashion_mnist --workdir runs/swav_uota_fmnist
  ssljax train --config configs/swav_uota.py:fashion_mnist_learned --workdir runs/swav_uota_l
  ssljax train --config configs/swav_uota.py:fashion_mnist_base --workdir runs/swav_mc_fmnist

imagenet: the official README run (main_uota.py defaults): ResNet-50, projector
  2048-2048-128, 3000 prototypes re-normalised every step and frozen for 313 iterations,
  temperature 0.1, Sinkhorn eps 0.05 with 3 iterations, no queue (so Sinkhorn sees 256
  samples for 3000 prototypes: method.swav.allow_soft_codes), multi-crop 2 x 224 px (area
  0.14-1) + 6 x 96 px (area 0.05-0.14) with the `symmetric` views (jitter 0.8, grayscale 0.2,
  blur 0.5), batch 256 (64 x 4 GPUs), LARS-wrapped SGD (trust 0.001, momentum 0.9), base lr 0.6
  with cosine to 0.0006 and no warm-up, weight decay 1e-6, 200 epochs, seed 31, UOTA tau 350
  from epoch 100 (start_fraction 0.5) with the official learning-rate restart at the switch
  (optim.restart_fraction 0.5: the cosine's peak doubles). The view weights are the official
  estimator's (method.uota.max_condition = inf: Sigma + 1e-8 I solved as it is in float32; the
  Fashion-MNIST settings keep ssljax's default guard, 1e5, which raises the ridge on badly
  conditioned batches; set it here if a run stops with a non-finite loss). Deviations: the
  official LARC skips no parameter (as here) but clips nothing; apex O1 mixed precision vs
  bfloat16 compute here (the weights are computed in float32 in both).
  Published, not measured by ssljax: SwAV 72.7 -> SwAV+UOTA 73.5 linear top-1 (README;
  the dataset, ImageNet-1K or -100, is ambiguous in the source). Hardware / time: 4 V100
  GPUs, about 181 h in the paper.
  Launch (streams imagenet2012 from DATA_DIR, prepared by TFDS as array_record and readable
  on every host, e.g. a disk attached to all workers):
  TPU pod (v4-8, a slice whose devices divide batch 256; ZONE as the pod's zone):
    ZONE=ZONE ACCELERATOR_TYPE=v4-8 bash launch/tpu_pod.sh train \
        configs/swav_uota.py:imagenet gs://BUCKET/swav_uota_in1k --config.data.data_dir=DATA_DIR
  SLURM, 4 GPUs (1 node x 4; 6 decode workers per task fit the script's 8 CPUs):
    sbatch --nodes=1 --gpus-per-node=4 --ntasks-per-node=4 launch/slurm.sbatch \
        configs/swav_uota.py:imagenet /shared/runs/swav_uota_in1k \
        --config.data.data_dir=DATA_DIR --config.data.stream_workers=6
  Streaming input (a JPEG-folder copy, the host pre-crop, evaluation on seeded subsets of
  50000 train / 10000 validation images): ``ssljax.config.set_dataset``, ``imagenet``.

cifar10: no official CIFAR recipe exists; the UOTA paper's authors' setting transferred as
  their README suggests: CIFAR ResNet-18, 2 global 32 px crops (area 0.14-1) + 4 x 16 px
  crops (area 0.05-0.14), jitter strength 0.5, no blur, 500 prototypes with a queue of 3840
  from epoch 15 (the official default start; 3000 prototypes are too many for a batch of
  256), 400 epochs, UOTA tau 350 from half-way with the restart, the official estimator
  (max_condition = inf, as imagenet). Not run by ssljax; no
  published number exists for it.

fashion_mnist*: CPU-sized comparison (docs/results.md, "UOTA"): SwAV's Fashion-MNIST recipe
  (configs/swav.py:fashion_mnist: resnet_tiny + 512 expansion, projector 512-512-128, 100
  prototypes, LARS 3.0) on multi-crop views: 2 global 20 px crops (area 0.3-1) + 4 x 10 px
  crops (area 0.05-0.3), brightness/contrast jitter 0.4, batch 256, 4 epochs, UOTA tau 350
  from half-way (no learning-rate restart, so that the arms share one schedule), precise BN
  at evaluation, a 30-epoch linear probe. Learned mode: Adam at 0.05 x the schedule on
  params['uota'] (128 x 128 Cholesky factor), fitted from step 0. Measured numbers and
  commands are in docs/results.md (UOTA section); 2 CPU cores, a few minutes a run.
"""

import os

from ssljax.config import (check_method_sections, default_config, load_config_module,
                           with_method)

SETTINGS = ("imagenet", "cifar10", "fashion_mnist", "fashion_mnist_learned",
             "fashion_mnist_base")


def fashion_mnist_multicrop(c):
  """The multi-crop views and short budget that every Fashion-MNIST UOTA comparison shares."""
  c.augment.policy = "multicrop"
  c.augment.crop_size = 20
  c.augment.crop_scale = (0.3, 1.0)
  c.augment.num_small_crops = 4
  c.augment.small_crop_size = 10
  c.augment.small_crop_scale = (0.05, 0.3)
  c.train.epochs = 4.0
  c.train.eval_every_steps = 0
  c.eval.precise_bn_examples = 60000
  c.eval.probe_epochs = 30


def _base(method, dataset):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{method}.py")
  return load_config_module(path).get_config(dataset)


def get_config(arg=None):
  setting = arg or "fashion_mnist"
  if setting not in SETTINGS:
    raise ValueError(f"configs/swav_uota.py: unknown setting {setting!r}; valid: "
                     f"{', '.join(SETTINGS)}")
  dataset = setting.split("_learned")[0].split("_base")[0]
  c = _base("swav", "imagenet" if dataset == "imagenet" else
            "cifar10" if dataset == "cifar10" else "fashion_mnist")
  if not setting.endswith("_base"):
    c = with_method(c, "swav", addons=("uota",))
  {"imagenet": _imagenet, "cifar10": _cifar10}.get(dataset, fashion_mnist_multicrop)(c)
  if setting.endswith("_learned"):
    c.method.uota.mode = "learned"
  check_method_sections(c)
  return c


def _imagenet(c):
  c.model.encoder = "resnet50"
  c.augment.crop_scale = (0.14, 1.0)
  c.augment.small_crop_scale = (0.05, 0.14)
  c.method.swav.num_prototypes = 3000
  c.method.swav.queue_size = 0
  c.method.swav.allow_soft_codes = True  # 256 samples for 3000 prototypes, as the official run
  c.method.swav.freeze_prototypes_epochs = 313 * 256 / 1281167  # 313 iterations at batch 256
  c.train.batch_size = 256
  c.train.epochs = 200.0
  c.seed = 31
  c.optim.name = "lars"
  c.optim.lr = 0.6
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.001
  c.optim.lars_exclude_bias_and_norm = False
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 0.0
  c.optim.warmup_init_fraction = 0.0
  c.optim.final_lr_fraction = 0.001  # 0.0006 / 0.6
  c.optim.restart_fraction = 0.5
  c.optim.restart_peak_scale = 2.0
  c.method.uota.temperature = 350.0
  c.method.uota.start_fraction = 0.5
  c.method.uota.max_condition = float("inf")  # the official estimator (no ridge guard)


def _cifar10(c):
  c.augment.policy = "multicrop"
  c.augment.crop_scale = (0.14, 1.0)
  c.augment.jitter = (0.4, 0.4, 0.4, 0.1)  # strength 0.5
  c.augment.blur_prob = 0.0
  c.augment.num_small_crops = 4
  c.augment.small_crop_size = 16
  c.augment.small_crop_scale = (0.05, 0.14)
  c.method.swav.num_prototypes = 500
  c.method.swav.queue_size = 3840  # 15 batches, from epoch 15 (the official default start)
  c.method.swav.queue_start_epoch = 15.0
  c.train.epochs = 400.0
  c.optim.restart_fraction = 0.5
  c.method.uota.start_fraction = 0.5
  c.method.uota.max_condition = float("inf")  # the official estimator (no ridge guard)
