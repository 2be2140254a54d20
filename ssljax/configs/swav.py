"""SwAV (Caron et al. 2020); the argument is the dataset: fashion_mnist (default), cifar10,
cifar100, imagenet.

Commands:
  ssljax train --config configs/swav.py:fashion_mnist --workdir runs/swav_fashion_mnist
  ssljax train --config configs/swav.py:cifar10 --workdir runs/swav_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/swav.py:cifar100 --workdir runs/swav_cifar100 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/swav.py:imagenet --workdir gs://BUCKET/swav_in1k \
      --config.data.data_dir=DATA_DIR
CIFAR is read as a TFDS array_record dataset in DATA_DIR, or with `--config.data.source=cifar
--config.data.data_dir=DIR` from the python archive (cifar-10-python.tar.gz /
cifar-100-python.tar.gz); ImageNet is prepared by TFDS in DATA_DIR (a TPU pod or 64 GPUs).

fashion_mnist: CPU-sized, the same data, views and encoder as the SimCLR job.
  Measured (2026-11-23, seed 0, 2-core AMD EPYC CPU, jax 0.10.2) with
  `--config.train.epochs=6` (`python benchmarks/fashion_mnist_table.py --epochs 6`): kNN top-1
  0.8130 (k=200, t=0.1), linear probe 0.8750, 428 s wall for training + evaluation. The full 12
  epochs were not run; all baselines: docs/results.md.
  Recipe: the views, encoder and batch of the first SimCLR Fashion-MNIST recipe (two 28x28
  crops, resnet_tiny + a 1x1 expansion to 512 features, batch 256, 12 epochs), with SwAV's head
  and loss (main_swav.py): projector 512-512-128, 100 prototypes (10 per class; SwAV's 3000 are for
  ImageNet's 1000 classes), temperature 0.1, Sinkhorn eps 0.05 with 3 iterations, prototypes
  frozen for the first epoch (official: one epoch, 313 iterations at batch 4096). The batch
  (256) exceeds the prototypes, so no queue is needed (queue_size 0; the official 800-epoch
  recipe has none either). Multi-crop, SwAV's other ingredient, costs about 25% more compute
  per step with two 14x14 crops: add it with --config.augment.policy=multicrop
  --config.augment.num_small_crops=2 (small crops of 14 px, area 5-40%).
  Hardware / time: 2 CPU cores, roughly the SimCLR job's time (the Sinkhorn step is small).
  The shared settings are the first recipe of the SimCLR job (28x28 views, 12 epochs); that job
  has since moved to 20x20 views for 26 epochs (README), which was not tried here.

cifar10, cifar100: the solo-learn recipe (ResNet-18, 1000 epochs, queue; solo-learn
  scripts/pretrain/cifar/swav.yaml, the same for both datasets): CIFAR ResNet-18 (3x3 stem, no
  max-pool), projector 512-2048-128 with BN + ReLU, 3000 prototypes, temperature 0.1, Sinkhorn
  eps 0.05 with 3 iterations, a queue of 3840 projections (15 batches) that starts filling at
  epoch 50 and joins the codes once full, prototypes frozen for 2 epochs, LARS lr 0.6 per 256
  images, eta 0.02, weight decay 1e-6, biases and BN excluded from LARS, warmup (10 epochs) +
  cosine, batch 256, 1000 epochs, sync BN, `symmetric` augmentations (two 32 px crops, RRC
  0.08-1, colour jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5 as solo-learn sets it,
  flip 0.5; no multi-crop). Before the queue joins, Sinkhorn sees 256 samples for 3000
  prototypes, so the codes are soft for the first 50 epochs, as in solo-learn.
  Deviations: solo-learn's LARS clips the adaptive rate (clip_lr) and trains in 16-bit mixed
  precision; ssljax's LARS does not clip, and this config computes in float32. Prototypes
  follow the official SwAV code (re-normalised after every step) where solo-learn uses a
  weight-normalised layer (gradient through the normalisation); crops of one resolution share
  one forward (BN over both views) where solo-learn forwards each crop alone; solo-learn fills
  the queue from step 0 and uses it at epoch 50, ssljax starts filling it at epoch 50 (used 15
  steps later). The SwAV issues (#23) report that a lower eps (0.01-0.03) and
  colour-jitter strength 0.5 helped on CIFAR; the recipe here keeps solo-learn's values.
  Published (not measured by ssljax): 89.17% linear top-1 on CIFAR-10 and 64.88% on CIFAR-100
  after 1000 epochs, solo-learn README. Hardware / time: one GPU suffices
  (solo-learn's config runs on one device at batch 256); not run by ssljax yet, so no time of
  ours is quoted.

imagenet: the paper's 800-epoch multi-crop ResNet-50 recipe (facebookresearch/swav
  scripts/swav_800ep_pretrain.sh): ResNet-50 (7x7 stem + max-pool), projector
  2048-2048-128 (Linear-BN-ReLU-Linear), 3000 prototypes, temperature 0.1, Sinkhorn eps 0.05
  with 3 iterations, codes of the two global crops (crops_for_assign 0, 1), multi-crop 2 x 224
  px (area 0.14-1) + 6 x 96 px (area 0.05-0.14), colour jitter 0.8/0.8/0.8/0.2 with p 0.8,
  grayscale 0.2, blur p 0.5 (sigma 0.1-2), flip 0.5; batch 4096 (64 per GPU on 64 GPUs), no
  queue (the batch exceeds the prototypes), prototypes frozen for the first epoch (313
  iterations), LARC with trust coefficient 0.001 on every parameter, base lr 4.8 at 4096 (0.3
  per 256 images) after 10 warmup epochs from 0.3, cosine to 0.0048, weight decay 1e-6, sync
  BN, mixed precision, 800 epochs. Input statistics are SwAV's (std 0.228 for red,
  src/multicropdataset.py). Deviations: apex LARC divides by ||g|| + wd ||w|| where ssljax's
  LARS uses ||g + wd w||; the official code re-normalises the prototypes before each forward
  pass, ssljax after each update (equivalent, see ssljax/methods/swav.py). For batch 256 the
  official swav_200ep_bs256 script uses lr 0.6 per 256, final lr 0.0006, no warmup, and a queue of
  3840 from epoch 15 (--config.method.swav.queue_size=3840
  --config.method.swav.queue_start_epoch=15).
  Published, not measured by ssljax: 75.3% ImageNet top-1 linear evaluation after 800
  epochs (facebookresearch/swav README). Hardware / time: the README's running-time table
  gives 3 min 40 s per epoch at batch 4096 with this script's 64 V100 GPUs (8 nodes),
  about 49 h for 800 epochs.
  Launch (streams imagenet2012 from DATA_DIR, prepared by TFDS as array_record and readable
  on every host, e.g. a disk attached to all workers):
  TPU pod (v4-64, a slice whose devices divide batch 4096; ZONE as the pod's zone):
    ZONE=ZONE ACCELERATOR_TYPE=v4-64 bash launch/tpu_pod.sh train \
        configs/swav.py:imagenet gs://BUCKET/swav_in1k --config.data.data_dir=DATA_DIR
  SLURM, 64 GPUs (8 nodes x 8; 6 decode workers per task fit the script's 8 CPUs):
    sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sbatch \
        configs/swav.py:imagenet /shared/runs/swav_in1k \
        --config.data.data_dir=DATA_DIR --config.data.stream_workers=6
  Streaming input (a JPEG-folder copy, the host pre-crop, evaluation on seeded subsets of
  50000 train / 10000 validation images): ``ssljax.config.set_dataset``, ``imagenet``.
"""

from ssljax.config import (config_dataset, default_config, set_augment_preset, set_cpu_job,
                           set_dataset)


def get_config(arg=None):
  dataset = config_dataset(arg)
  c = default_config("swav")
  set_dataset(c, dataset)
  {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
   "imagenet": _imagenet}[dataset](c)
  return c


def _fashion_mnist(c):
  set_augment_preset(c, "fashion_mnist_cpu")
  set_cpu_job(c)

  c.method.swav.temperature = 0.1
  c.method.swav.epsilon = 0.05
  c.method.swav.sinkhorn_iters = 3
  c.method.swav.num_prototypes = 100
  c.method.swav.proj_hidden_dim = 512
  c.method.swav.proj_dim = 128
  c.method.swav.queue_size = 0
  c.method.swav.freeze_prototypes_epochs = 1.0
  c.method.swav.crops_for_assign = (0, 1)

  c.optim.name = "lars"
  c.optim.lr = 3.0  # per 256 images, as the SimCLR CPU job
  c.optim.weight_decay = 1e-6  # SwAV's
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0


def _cifar(c):
  set_augment_preset(c, "symmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

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


def _imagenet(c):
  c.data.std = (0.228, 0.224, 0.225)  # SwAV's statistics (src/multicropdataset.py)

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
  # The papers' linear evaluation on the whole splits (ssljax.eval.linear_eval), with its
  # default settings (SwAV's eval_linear.py: 100 epochs, lr 0.3 cosine, weight decay 1e-6).
  c.eval.linear_eval = True
  c.eval.monitor_test_examples = 10000
