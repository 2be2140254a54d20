"""MetaMask (Li et al. 2022); the argument is the dataset: fashion_mnist (default),
cifar10, cifar100, imagenet.

Commands:
  ssljax train --config configs/metamask.py:fashion_mnist --workdir runs/metamask_fashion_mnist
  ssljax train --config configs/metamask.py:cifar10 --workdir runs/metamask_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/metamask.py:cifar100 --workdir runs/metamask_cifar100 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/metamask.py:imagenet --workdir gs://BUCKET/metamask_in1k \
      --config.data.data_dir=DATA_DIR
Variants: `--config.method.metamask.second_order=finite_difference` (the official estimate of
the second-order term), `=none` (first-order MetaMask), `--config.method.metamask.meta_step=
False` (Barlow Twins + SimCLR on the fixed mask 0.5, no meta step). The official kNN protocol
is `--config.eval.knn_k=5 --config.eval.knn_t=1.0` (the defaults are k=200, t=0.1).

fashion_mnist: CPU-sized, 2 epochs: the Barlow Twins Fashion-MNIST job's data, augmentation
  (`fashion_mnist_cpu`), backbone (resnet_tiny + 1x1 expansion to 512 features) and batch
  (256), with MetaMask's heads shrunk to the Barlow Twins job's width: Barlow Twins head
  512-1024-1024-1024, contrastive head 512-1024-128 (both with the final BN), lambda 5e-3
  with the unbiased std, gamma 10, temperature 0.07 as the official run. Optimiser: SGD
  (momentum 0.9, weight decay 5e-4, as the official run, which the virtual step needs) at
  0.05 per 256 images, cosine without warm-up stepped every step (2 epochs); the mask's SGD
  at the same rate. The official rate, 1e-3, barely moves a network in 2 epochs; 0.05 was
  not tuned (a 20-step smoke run showed the loss falling, 1006 -> 766).

cifar10: the official (and only released) recipe, jiangmengli/MetaMask `meta-mask.py` with
  lightly v1.0.8: CIFAR ResNet-18 (3x3 stem, no max-pool), Barlow Twins head 512-2048-2048-2048
  and contrastive head 512-2048-256 (lightly's projection MLPs: biases, BN after every layer),
  lambda 5e-3 with the unbiased std, gamma 10, temperature 0.07; SGD lr 1e-3 at batch 512,
  momentum 0.9, weight decay 5e-4 for the network and the same for the mask, cosine over 800
  epochs without warm-up stepped once per epoch, exact second-order meta-gradient (the
  official code's central difference is `second_order=finite_difference`); views: RRC 32
  (0.08-1), flip 0.5, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, no blur;
  ImageNet channel statistics.
  Deviation: the official stem has no ReLU after its BN (lightly's ResNet), ssljax's has one.
  Published (not measured by ssljax): 86.01 top-1 on CIFAR-10 for the released checkpoint
  (README; most plausibly the best-epoch kNN with k=5, t=1). Not run by ssljax yet.

cifar100: the CIFAR-10 recipe unchanged (the repository has no other setting), with
  CIFAR-100's 100 classes. Not run.

imagenet: no official recipe exists (the repository releases CIFAR-10 only). This setting is a
  proposal that builds: ResNet-50 (7x7 stem, max-pool), heads 2048-2048-2048-2048 and
  2048-2048-256, the CIFAR loss weights and optimiser at batch 512, 100 epochs, the
  `symmetric_weak` views without blur. No published ImageNet number, hardware or time
  exists for MetaMask; not measured by ssljax.
  Launch (streams imagenet2012 from DATA_DIR, prepared by TFDS as array_record and readable
  on every host, e.g. a disk attached to all workers):
  TPU pod (v4-32, a slice whose devices divide batch 512; ZONE as the pod's zone):
    ZONE=ZONE ACCELERATOR_TYPE=v4-32 bash launch/tpu_pod.sh train \
        configs/metamask.py:imagenet gs://BUCKET/metamask_in1k --config.data.data_dir=DATA_DIR
  SLURM, 8 GPUs (1 node x 8; 6 decode workers per task fit the script's 8 CPUs):
    sbatch --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sbatch \
        configs/metamask.py:imagenet /shared/runs/metamask_in1k \
        --config.data.data_dir=DATA_DIR --config.data.stream_workers=6
  Streaming input (a JPEG-folder copy, the host pre-crop, evaluation on seeded subsets of
  50000 train / 10000 validation images): ``ssljax.config.set_dataset``, ``imagenet``.
"""

from ssljax.config import (config_dataset, default_config, set_augment_preset, set_cpu_job,
                           set_dataset)


def get_config(arg=None):
  dataset = config_dataset(arg)
  c = default_config("metamask")
  set_dataset(c, dataset)
  {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
   "imagenet": _imagenet}[dataset](c)
  return c


def _official_loss_and_optimiser(c):
  hp = c.method.metamask
  hp.lambda_offdiag = 5e-3
  hp.unbiased_std = True
  hp.weight_cl = 10.0
  hp.temperature = 0.07
  hp.proj_bias = True
  hp.meta_step = True
  hp.second_order = "exact"
  hp.mask_lr_scale = 1.0
  hp.mask_weight_decay = 5e-4
  hp.mask_momentum = 0.9

  c.optim.name = "sgd"
  c.optim.lr = 1e-3
  c.optim.base_batch_size = 512
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 5e-4
  c.optim.schedule = "warmup_cosine_per_epoch"  # CosineAnnealingLR stepped once per epoch
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr_fraction = 0.0


def _fashion_mnist(c):
  set_augment_preset(c, "fashion_mnist_cpu")
  set_cpu_job(c)
  _official_loss_and_optimiser(c)
  hp = c.method.metamask
  hp.bt_hidden_dim, hp.bt_dim, hp.bt_layers = 1024, 1024, 3
  hp.cl_hidden_dim, hp.cl_dim, hp.cl_layers = 1024, 128, 2
  c.optim.lr = 0.05
  c.optim.base_batch_size = 256
  c.optim.schedule = "warmup_cosine"  # per step: 2 epochs are too few for per-epoch steps
  c.train.epochs = 2.0


def _cifar(c):
  # The official views: lightly's SimCLR collate with cj_strength 0.5 and no blur.
  set_augment_preset(c, "symmetric_weak")
  c.augment.policy = "simclr"
  c.augment.blur_prob = 0.0
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  _official_loss_and_optimiser(c)
  hp = c.method.metamask
  hp.bt_hidden_dim, hp.bt_dim, hp.bt_layers = 2048, 2048, 3
  hp.cl_hidden_dim, hp.cl_dim, hp.cl_layers = 2048, 256, 2

  c.train.batch_size = 512
  c.train.epochs = 800.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 9700  # about every 100 epochs (97 steps per epoch)


def _imagenet(c):
  set_augment_preset(c, "symmetric_weak")
  c.augment.blur_prob = 0.0

  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"

  _official_loss_and_optimiser(c)
  hp = c.method.metamask
  hp.bt_hidden_dim, hp.bt_dim, hp.bt_layers = 2048, 2048, 3
  hp.cl_hidden_dim, hp.cl_dim, hp.cl_layers = 2048, 256, 2

  c.train.batch_size = 512
  c.train.epochs = 100.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 1024
  c.eval.monitor_train_examples = 50000
  # The papers' linear evaluation on the whole splits (ssljax.eval.linear_eval), with its
  # default settings (SwAV's eval_linear.py: 100 epochs, lr 0.3 cosine, weight decay 1e-6).
  c.eval.linear_eval = True
  c.eval.monitor_test_examples = 10000
