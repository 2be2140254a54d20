"""CISSL (Dubois et al. 2022, contrastive ISSL with asymmetric heads); the argument is the
dataset: fashion_mnist (default), tinyimagenet, cifar10, cifar100, imagenet.

Commands:
  ssljax train --config configs/cissl.py:fashion_mnist --workdir runs/cissl_fashion_mnist
  ssljax train --config configs/cissl.py:tinyimagenet --workdir runs/cissl_tin \
      --config.data.data_dir=TIN_DIR
  ssljax train --config configs/cissl.py:cifar10 --workdir runs/cissl_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/cissl.py:cifar100 --workdir runs/cissl_cifar100 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/cissl.py:imagenet --workdir gs://BUCKET/cissl_in1k \
      --config.data.data_dir=DATA_DIR
The MLP-probe variant of the official code (``cissl_mlp``) is any of these with
``--config.method.cissl.student_hidden_dims='(2048,2048)'
--config.method.cissl.teacher_hidden_dims='(2048,2048)'``. It is evaluated, as
the official code does, with an MLP probe (two Linear-BN-ReLU layers of 2048, then a linear
classifier, on frozen features): add ``--config.eval.mlp_probe=True`` to the training command,
or run ``ssljax eval --workdir DIR --config.eval.mlp_probe=True`` on a trained workdir.

fashion_mnist: CPU-sized. Everything but the method is the SimCLR default job
  (configs/simclr.py:fashion_mnist: resnet_tiny + 1x1 expansion to 512 features, 20x20 views
  of crops 0.2-1 with brightness/contrast jitter 0.8, batch 256, LARS 8.0 per 256 images,
  weight decay 1e-5, half an epoch of warmup, 26 epochs), so that CISSL and SimCLR differ only
  in the heads and the objective. Method: the official heads (student Linear(512 -> 128) -
  BN, teacher Linear(512 -> 1024) - BN - ReLU - Linear(-> 128) - BN) and loss (self-pair kept
  as a second positive); temperature 0.2, the SimCLR job's tuned value, instead of the
  official 0.07 (which was tuned with Adam on TinyImageNet), so that the temperature is not a
  second difference. No gradient clipping, as the SimCLR job.
  Measured (2026-12-02, 2-core Intel Xeon CPU, jax 0.10.2), 2 epochs (`--config.train.epochs=2`),
  seeds 0 / 1: kNN top-1 0.8107 / 0.8233 (k=200, t=0.1), linear probe 0.8701 / 0.8821,
  against SimCLR's 0.8117 / 0.8118 and 0.8806 / 0.8796 under the same budget
  (docs/results.md, "CISSL / DISSL"); the full 26 epochs were not run.
  With ``--config.model.expand_features=2048 --config.model.expand_bottleneck=64`` (2026-12-02,
  2-core AMD EPYC): kNN 0.8146 / 0.8234, probe 0.8791 / 0.8823, against SimCLR's 0.8089 /
  0.8133 and 0.8823 / 0.8766; ``cissl_mlp`` (hidden dims (2048, 2048)) with a 512-wide,
  10-epoch MLP probe: 0.8885 / 0.8940 against SimCLR's 0.8870 / 0.8925.

tinyimagenet: the official TinyImageNet Table 1 recipe (bin/tinyimagenet/base_tin.sh and
  table1 scripts, config/decodability/cissl.yaml): ResNet-18 with a 3x3 stride-1 stem followed
  by the 3x3/2 max-pool (model.stem_pool), 64 px images, z = 512; heads as above with
  temperature 0.07; batch 512; Adam lr 2e-3 with (coupled) weight decay 1e-6; 10 warmup
  epochs then cosine to 0; 300 epochs; gradients clipped element-wise at 2; views
  RandomResizedCrop(64, scale 0.2-1), flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8,
  grayscale 0.1, no blur; TinyImageNet channel statistics.
  Data: the image-folder source on a local copy of tiny-imagenet-200, as
  ``<TIN_DIR>/train/<wnid>/images/*.JPEG`` (the archive's own layout) and the validation
  images sorted into class folders ``<TIN_DIR>/val_by_class/<wnid>/`` (the archive keeps them
  flat with val/val_annotations.txt; e.g. ``cd TIN_DIR && while read f c _; do mkdir -p
  val_by_class/$c; ln -s ../../val/images/$f val_by_class/$c/$f; done <
  val/val_annotations.txt``). The official code evaluates on this validation set ("test").
  The "+ dim." cell (z = 2048 from the residual expansion block before pooling, 512 inner
  channels) adds ``--config.model.expand_features=2048 --config.model.expand_bottleneck=512``.
  The schedule is the official one, stepped per epoch (``warmup_cosine_per_epoch``: the
  first epoch trains at lr 0, the peak comes at epoch 9). Deviations: fp16 mixed precision
  (here bf16 on a GPU/TPU, float32 on a CPU: compute_dtype 'auto'); bicubic crops (ssljax
  resizes bilinearly).
  Hardware / time: one GPU in the official code; not run by ssljax (no GPU in this session).
  Published (not measured by ssljax): 45.8% TinyImageNet linear-probe accuracy (SimCLR in
  the same code: 45.2%); 47.6% with the representation widened to 2048 inside the backbone,
  48.7% with 1000 epochs, 51.2% with stronger augmentations; single seed, official README
  (YannDubs/Invariant-Self-Supervised-Learning, "Projection heads" table).

cifar10, cifar100: the TinyImageNet recipe with the official code's CIFAR settings: 32 px
  images through a 3x3 stride-1 stem without max-pool (issl/architectures/cnn.py drops it
  below 50 px), the code's CIFAR views (crops 0.2-1, jitter 0.2/0.2/0.2/0.05 with p 0.8,
  grayscale 0.1, no blur), CIFAR channel statistics. The official repository publishes no
  CIFAR result and no CIFAR script, so the length and batch are the TinyImageNet ones.
  Hardware / time: one GPU; not run by ssljax.

imagenet: ResNet-50 at 224 px, two views, batch 2560, 100 epochs, z = 2048, fp16 in the
  official runs (README). The released ImageNet models were trained with a VISSL fork whose
  optimiser settings are not in the sources ssljax was written from; this config keeps the
  TinyImageNet optimiser (Adam 2e-3) as a placeholder and the SimCLR ImageNet views.
  Published, not measured by ssljax: none; the README reports DISSL only on ImageNet (8
  A100s, no training time stated), no CISSL ImageNet number.
  Launch (streams imagenet2012 from DATA_DIR, prepared by TFDS as array_record and readable
  on every host, e.g. a disk attached to all workers):
  TPU pod (v4-32, a slice whose devices divide batch 2560; ZONE as the pod's zone):
    ZONE=ZONE ACCELERATOR_TYPE=v4-32 bash launch/tpu_pod.sh train \
        configs/cissl.py:imagenet gs://BUCKET/cissl_in1k --config.data.data_dir=DATA_DIR
  SLURM, 8 GPUs (1 node x 8; 6 decode workers per task fit the script's 8 CPUs):
    sbatch --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sbatch \
        configs/cissl.py:imagenet /shared/runs/cissl_in1k \
        --config.data.data_dir=DATA_DIR --config.data.stream_workers=6
  Streaming input (a JPEG-folder copy, the host pre-crop, evaluation on seeded subsets of
  50000 train / 10000 validation images): ``ssljax.config.set_dataset``, ``imagenet``.
"""

from ssljax.config import (config_dataset, default_config, set_augment_preset, set_cpu_job,
                           set_dataset, set_issl_optimizer, set_issl_views)

TINYIMAGENET = dict(
    source="image_folder", name="tinyimagenet", data_dir="", train_split="train",
    test_split="val_by_class", image_size=64, channels=3, num_classes=200,
    mean=(0.480, 0.448, 0.398), std=(0.277, 0.269, 0.282))


def get_config(arg=None):
  if arg == "tinyimagenet":
    c = default_config("cissl")
    for key, value in TINYIMAGENET.items():
      c.data[key] = value
    c.augment.crop_size = 64
    _tinyimagenet(c)
    return c
  dataset = config_dataset(arg)
  c = default_config("cissl")
  set_dataset(c, dataset)
  {"fashion_mnist": _fashion_mnist, "cifar10": _cifar, "cifar100": _cifar,
   "imagenet": _imagenet}[dataset](c)
  return c


def _fashion_mnist(c):
  set_augment_preset(c, "fashion_mnist_cpu")
  set_cpu_job(c)
  # The SimCLR default job's data, views, length and optimiser (configs/simclr.py).
  c.augment.crop_size = 20
  c.augment.crop_scale = (0.2, 1.0)
  c.augment.jitter = (0.8, 0.8, 0.0, 0.0)
  c.train.epochs = 26.0
  c.train.eval_every_steps = 936
  c.eval.precise_bn_examples = 60000

  hp = c.method.cissl
  hp.temperature = 0.2
  hp.out_dim = 128
  hp.student_hidden_dims = ()
  hp.teacher_hidden_dims = (1024,)

  c.optim.name = "lars"
  c.optim.lr = 8.0
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 0.5
  c.optim.final_lr_fraction = 0.0
  c.optim.grad_clip_value = 0.0


def _official_heads(c):
  hp = c.method.cissl
  hp.temperature = 0.07
  hp.out_dim = 128
  hp.student_hidden_dims = ()
  hp.teacher_hidden_dims = (1024,)


def _tinyimagenet(c):
  set_issl_views(c, (0.4, 0.4, 0.4, 0.1))
  c.model.encoder = "resnet18"
  c.model.cifar_stem = True
  c.model.stem_pool = True  # 3x3 stem + max-pool: the ISSL ResNet-18 for 50-100 px images
  _official_heads(c)
  set_issl_optimizer(c, 512)
  c.train.epochs = 300.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 9800  # about every 50 epochs (195 steps per epoch)


def _cifar(c):
  set_issl_views(c, (0.2, 0.2, 0.2, 0.05))
  c.model.encoder = "resnet18"
  c.model.cifar_stem = True
  _official_heads(c)
  set_issl_optimizer(c, 512)
  c.train.epochs = 300.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 9750  # every 100 epochs (97 steps per epoch)


def _imagenet(c):
  set_augment_preset(c, "symmetric")
  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"
  _official_heads(c)
  set_issl_optimizer(c, 2560)
  c.train.epochs = 100.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 4096
  c.eval.monitor_train_examples = 50000
  # The papers' linear evaluation on the whole splits (ssljax.eval.linear_eval), with its
  # default settings (SwAV's eval_linear.py: 100 epochs, lr 0.3 cosine, weight decay 1e-6).
  c.eval.linear_eval = True
  c.eval.monitor_test_examples = 10000
