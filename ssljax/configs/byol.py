"""BYOL (Grill et al. 2020); the argument is the dataset: fashion_mnist (default), cifar10,
cifar100, imagenet.

Commands:
  ssljax train --config configs/byol.py:fashion_mnist --workdir runs/byol_fashion_mnist
  ssljax train --config configs/byol.py:cifar10 --workdir runs/byol_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/byol.py:cifar100 --workdir runs/byol_cifar100 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/byol.py:imagenet --workdir gs://BUCKET/byol_in1k \
      --config.data.data_dir=DATA_DIR
CIFAR is read as a TFDS array_record dataset in DATA_DIR, or with `--config.data.source=cifar
--config.data.data_dir=DIR` from the python archive (cifar-10-python.tar.gz /
cifar-100-python.tar.gz); ImageNet is prepared by TFDS in DATA_DIR (a TPU pod).

fashion_mnist: CPU-sized, the SimCLR default job with BYOL's networks and loss. Same data,
  crops, backbone, batch and length as the first SimCLR Fashion-MNIST recipe (resnet_tiny + 1x1
  expansion to 512 features, batch 256, 12 epochs), so the methods are compared on equal terms.
  Augmentation: the 'byol' policy with solo-learn's CIFAR `asymmetric` choice (no blur,
  solarisation p 0.2 on the second view only); colour jitter reduces to brightness/contrast on
  one channel. Method: projector 512-1024-256 and predictor 256-1024-256 (Linear-BN-ReLU-
  Linear; the published 4096-wide hidden layers shrunk for a 2-core CPU), each view through the
  networks separately (per-view BN, as the DeepMind and solo-learn code), target EMA momentum
  cosine from 0.99 to 1 (solo-learn CIFAR). Optimiser: solo-learn's CIFAR LARS (lr 1.0 per 256
  images, eta 0.02, weight decay 1e-5, biases and BN excluded), warmup half an epoch as in the
  SimCLR job.
  Measured (2026-11-23, seed 0, 2-core AMD EPYC CPU, jax 0.10.2) with
  `--config.train.epochs=6` (`python benchmarks/fashion_mnist_table.py --epochs 6`): kNN top-1
  0.8065 (k=200, t=0.1), linear probe 0.8656, 476 s wall for training + evaluation. The full 12
  epochs were not run; all baselines: docs/results.md. The shared settings are the first recipe
  of the SimCLR job (28x28 views, 12 epochs); that job has since moved to 20x20 views for 26
  epochs (README), which was not tried here.

cifar10, cifar100: the solo-learn recipe (ResNet-18, 1000 epochs; scripts/pretrain/cifar/
  byol.yaml; CIFAR-100 runs the CIFAR-10 recipe unchanged, with CIFAR-100's channel
  statistics): CIFAR ResNet-18 (3x3 stem, no max-pool), projector 512-4096-256 and predictor
  256-4096-256 (Linear-BN-ReLU-Linear), each view through the networks separately (per-view
  BN, synchronised across devices), target EMA momentum cosine from 0.99 to 1, LARS lr 1.0 per
  256 images, eta 0.02, weight decay 1e-5, biases and BN excluded from LARS, warmup (10 epochs)
  + cosine, batch 256, 1000 epochs; `asymmetric` augmentations (solo-learn): RRC 0.08-1, colour
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, flip 0.5, no blur, solarisation p 0.2 on
  the second view only.
  Deviations: solo-learn's LARS also clips the adaptive rate (`clip_lr`) and its warmup starts
  at 3e-5 rather than 0; solo-learn trains in fp16 (here bf16 activations on a GPU/TPU,
  float32 on a CPU: train.compute_dtype = 'auto').
  Published (not measured by ssljax): 92.58% (CIFAR-10) and 70.46% (CIFAR-100) linear top-1
  after 1000 epochs, solo-learn README. Hardware / time: one GPU suffices
  (solo-learn's config runs on one device at batch 256); not run by ssljax yet, so no time of
  ours is quoted.

imagenet: the paper's ResNet-50 recipe (google-deepmind/deepmind-research/byol,
  byol/configs/byol.py, 1000-epoch preset): ResNet-50 (7x7 stem + max-pool), projector
  2048-4096-256 and predictor 256-4096-256 (Linear-BN-ReLU-Linear), cross-replica BN (decay
  0.9, eps 1e-5) with each view forwarded separately, target EMA base 0.996 raised to 1 by the
  cosine schedule, batch 4096, LARS (momentum 0.9, eta 0.001) at 0.2 per 256 images (3.2 at
  4096), weight decay 1.5e-6, biases and BN excluded from decay and LARS adaptation, 10 warmup
  epochs then cosine to 0, 1000 epochs; augmentations: RRC 224 (0.08-1), flip 0.5, colour
  jitter 0.4/0.4/0.2/0.1 with p 0.8, grayscale 0.2, blur (sigma 0.1-2) with p 1.0 / 0.1 and
  solarisation with p 0.0 / 0.2 for the two views. Shorter presets of the same file: 300
  epochs lr 0.3, wd 1e-6, EMA 0.99; 100 epochs lr 0.45, wd 1e-6, EMA 0.99.
  Deviation: the DeepMind code draws the target's initial weights from a second seed; ssljax
  starts the target as a copy of the online network (as solo-learn).
  Published, not measured by ssljax: "between 74.0% and 74.5%" top-1 linear evaluation
  "after about 8h of training using 512 Cloud TPU v3" (deepmind-research/byol README; the
  released ResNet-50 checkpoint "should evaluate to ~74.4%").
  Launch (streams imagenet2012 from DATA_DIR, prepared by TFDS as array_record and readable
  on every host, e.g. a disk attached to all workers):
  TPU pod (v3-512, the README's 512 v3 cores; ZONE as the pod's zone):
    ZONE=ZONE ACCELERATOR_TYPE=v3-512 bash launch/tpu_pod.sh train \
        configs/byol.py:imagenet gs://BUCKET/byol_in1k --config.data.data_dir=DATA_DIR
  SLURM, 64 GPUs (8 nodes x 8; 6 decode workers per task fit the script's 8 CPUs):
    sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sbatch \
        configs/byol.py:imagenet /shared/runs/byol_in1k \
        --config.data.data_dir=DATA_DIR --config.data.stream_workers=6
  Streaming input (a JPEG-folder copy, the host pre-crop, evaluation on seeded subsets of
  50000 train / 10000 validation images): ``ssljax.config.set_dataset``, ``imagenet``.
  (64 GPUs is 8x less hardware than the README's; expect correspondingly longer runs.)
"""

from ssljax.config import (config_dataset, default_config, set_augment_preset, set_cpu_job,
                           set_dataset)


def get_config(arg=None):
  dataset = config_dataset(arg)
  c = default_config("byol")
  set_dataset(c, dataset)
  {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
   "imagenet": _imagenet}[dataset](c)
  return c


def _fashion_mnist(c):
  # The CPU views with BYOL's asymmetric second view (solarisation).
  set_augment_preset(c, "fashion_mnist_cpu")
  c.augment.policy = "byol"
  c.augment.byol_blur_probs = (0.0, 0.0)
  c.augment.byol_solarize_probs = (0.0, 0.2)

  set_cpu_job(c)

  c.method.byol.proj_hidden_dim = 1024
  c.method.byol.proj_dim = 256
  c.method.byol.pred_hidden_dim = 1024
  c.method.byol.ema_momentum = 0.99
  c.method.byol.ema_momentum_final = 1.0
  c.method.byol.per_view_forward = True

  c.optim.name = "lars"
  c.optim.lr = 1.0
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0


def _cifar(c):
  set_augment_preset(c, "asymmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.byol.proj_hidden_dim = 4096
  c.method.byol.proj_dim = 256
  c.method.byol.pred_hidden_dim = 4096
  c.method.byol.ema_momentum = 0.99
  c.method.byol.ema_momentum_final = 1.0
  c.method.byol.per_view_forward = True

  c.optim.name = "lars"
  c.optim.lr = 1.0
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs


def _imagenet(c):
  set_augment_preset(c, "byol")

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.model.bn_momentum = 0.9
  c.train.compute_dtype = "bfloat16"

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
  # The papers' linear evaluation on the whole splits (ssljax.eval.linear_eval), with its
  # default settings (SwAV's eval_linear.py: 100 epochs, lr 0.3 cosine, weight decay 1e-6).
  c.eval.linear_eval = True
  c.eval.monitor_test_examples = 10000
