"""MoCo + CLD (CLD paper Sec. 3-4; official train_cifar_moco_cld.py,
main_imagenet_moco_cld.py, scripts/cifar/train_cifar{10,100}_moco_cld.sh,
scripts/imagenet/train_imagenet_mocov2_cld.sh); the argument is the dataset: fashion_mnist
(default), cifar10, cifar100, imagenet.

Commands:
  ssljax train --config configs/moco_cld.py:fashion_mnist --workdir runs/moco_cld_fmnist
  ssljax train --config configs/moco_cld.py:cifar10 --workdir runs/moco_cld_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/moco_cld.py:cifar100 --workdir runs/moco_cld_cifar100 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/moco_cld.py:imagenet --workdir gs://BUCKET/moco_cld_in1k \
      --config.data.data_dir=DATA_DIR
Long-tailed variant (CIFAR-10-LT construction, ratio 100): add --config.data.imbalance=100.

Three views per image (the official --three-imgs): views 0 and 1 go through the query
encoder, each contrasted with the key of view 2 (EMA key encoder) and the queue, L_inst the
mean of the two; the CLD group head runs on the two query views' features. L = L_inst +
lambda L_CLD. method.moco.num_views = 3, symmetric = False, augment.num_views = 3.

fashion_mnist: configs/moco.py:fashion_mnist (resnet_tiny + 1x1 expansion to 512, batch 256,
  LARS 3.0, 12 epochs, projector 512-512-128, temperature 0.2, queue 4096, EMA 0.99) in the
  three-view layout, with CLD at the official CIFAR-10 setting: K = 200 clusters per batch of
  256, T_c = 0.2, lambda = 0.8, NormLinear group head 512 -> 128. The instance projector is
  kept (not NormLinear), so the comparison with three-view MoCo isolates the CLD term.
  Measured at 2 epochs (2026-12-02, seeds 0 and 1, 2-core CPU shared with other jobs) next to
  three-view MoCo: docs/results.md, CLD section. The full 12 epochs were not run.
cifar10: the official script: ResNet-18 (CIFAR stem), batch 256, SGD momentum 0.9, lr 0.03 x
  256 / 128 = 0.06, weight decay 8e-4, 5 warm-up epochs from lr/100 then a per-step cosine to
  1e-6, 200 epochs; NormLinear instance head 512 -> 128 (method.moco.norm_linear,
  proj_layers 1), nce_t 0.07, queue 12288 initialised as MemoryMoCo's (method.moco.queue_init
  'uniform'), key EMA 0.999; CLD K = 200, cld_t 0.2, lambda 0.8,
  NormLinear group head; aug-plus views (RRC 0.2-1, jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale
  0.2, blur p 0.5, flip), then the script's --erasing: RandomErasing with p = 1 after
  normalisation (area 2-33%, aspect 0.3-3.3, filled with 0, i.e. the mean; augment.erasing_prob
  1 here, filled with data.mean). Deviations: no Shuffle-BN (one GPU there: no effect);
  float32 there (the script passes no --amp-opt-level, whose default is O0, although
  its save directory is named fp16), train.compute_dtype 'auto' here (bfloat16 activations on a
  GPU or TPU, float32 on a CPU); the official kNN monitor uses the 128-d instance output
  with sigma 0.07, ssljax's kNN the 512-d backbone features (k 200, t 0.1).
  Published (not measured here): kNN top-1 87.5% (paper), against 82.1% for MoCo;
  frank-xwang/CLD-UnsupervisedLearning README. One GPU; no time of ours is quoted.
cifar100: train_cifar100_moco_cld.sh: batch 128, lr 0.03, weight decay 7e-4, queue 4096,
  K = 100, lambda 0.25, CLD's `default` views (jitter 0.4/0.4/0.4/0.4 always applied,
  grayscale 0.2); otherwise as cifar10. Published (not measured here): kNN top-1 58.1%
  (paper), 59.7% (README reproduction with NormLinear) against 53.1% for MoCo.
imagenet: train_imagenet_mocov2_cld.sh: ResNet-50, batch 512, lr 0.2, cosine, 200 epochs,
  weight decay 1e-4, queue 65536, EMA 0.999, moco-t 0.2, "NormMLP" instance head (2048-2048
  then NormLinear -> 128), aug-plus, CLD K = 120, cld_t 0.4, lambda 0.25, NormMLP group head.
  Deviations: the official model shares the hidden 2048 layer between the two branches (here
  each head owns one); the official k-means runs per GPU on 64 rows with K = 120 > 64, where it
  degenerates to per-row clusters plus 56 zero centroids, which ssljax refuses: this config
  clusters the gathered global batch (method.cld.global_kmeans = True, 512 rows). Shuffle-BN
  is replaced by synchronised BN; bfloat16 compute.
  Published, not measured by ssljax: linear top-1 70.0% (NormMLP, 200 epochs; 69.2% with
  MLP) against 67.5% for MoCo v2, the CLD README; 8 GPUs there, no training time stated.
  Launch (streams imagenet2012 from DATA_DIR, prepared by TFDS as array_record and readable
  on every host, e.g. a disk attached to all workers):
  TPU pod (v4-32, a slice whose devices divide batch 512; ZONE as the pod's zone):
    ZONE=ZONE ACCELERATOR_TYPE=v4-32 bash launch/tpu_pod.sh train \
        configs/moco_cld.py:imagenet gs://BUCKET/moco_cld_in1k --config.data.data_dir=DATA_DIR
  SLURM, 8 GPUs (1 node x 8; 6 decode workers per task fit the script's 8 CPUs):
    sbatch --nodes=1 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sbatch \
        configs/moco_cld.py:imagenet /shared/runs/moco_cld_in1k \
        --config.data.data_dir=DATA_DIR --config.data.stream_workers=6
  Streaming input (a JPEG-folder copy, the host pre-crop, evaluation on seeded subsets of
  50000 train / 10000 validation images): ``ssljax.config.set_dataset``, ``imagenet``.
  The long-tailed variant (data.imbalance) is refused on a streaming source.
"""

import os

from ssljax.config import (check_method_sections, default_config, load_config_module,
                           set_augment_preset, set_dataset, with_method)

_HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ("fashion_mnist", "cifar10", "cifar100", "imagenet")


def get_config(arg=None):
  dataset = arg or "fashion_mnist"
  if dataset not in SETTINGS:
    raise ValueError(f"configs/moco_cld.py: unknown setting {dataset!r}; valid: "
                     f"{', '.join(SETTINGS)}")
  if dataset == "fashion_mnist":
    c = load_config_module(os.path.join(_HERE, "moco.py")).get_config(dataset)
    c = with_method(c, "moco", addons=("cld",))
    _three_views(c)
    _cld(c, clusters=200, weight=0.8, head="norm_linear")
  else:
    c = default_config("moco", ("cld",))
    set_dataset(c, dataset)
    {"cifar10": _cifar10, "cifar100": _cifar100, "imagenet": _imagenet}[dataset](c)
  check_method_sections(c)
  return c


def _three_views(c):
  c.method.moco.num_views = 3
  c.method.moco.symmetric = False
  c.augment.num_views = 3


def _cld(c, *, clusters, weight, head, temperature=0.2, global_kmeans=False):
  hp = c.method.cld
  hp.num_clusters = clusters
  hp.temperature = temperature
  hp.weight = weight
  hp.num_iters = 5
  hp.head = head
  hp.head_dim = 128
  hp.head_hidden_dim = 2048
  hp.global_kmeans = global_kmeans


def _cifar(c, *, batch, weight_decay, queue):
  c.data.mean = (0.4914, 0.4822, 0.4465)  # the CLD code's CIFAR statistics
  c.data.std = (0.2023, 0.1994, 0.2010)
  c.model.encoder = "resnet18"
  c.model.cifar_stem = True
  _three_views(c)
  hp = c.method.moco
  hp.temperature = 0.07
  hp.queue_size = queue
  hp.queue_init = "uniform"  # lib/NCEAverage.py MemoryMoCo
  hp.ema_momentum = 0.999
  hp.ema_momentum_final = 0.999
  hp.proj_dim = 128
  hp.proj_layers = 1
  hp.norm_linear = True
  c.optim.name = "sgd"
  c.optim.lr = 0.03
  c.optim.base_batch_size = 128
  c.optim.momentum = 0.9
  c.optim.weight_decay = weight_decay
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_init_fraction = 0.01
  c.optim.final_lr_fraction = 1e-6 / (0.03 * batch / 128)
  c.train.batch_size = batch
  c.train.epochs = 200.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 50000 // batch * 20  # every 20 epochs


def _cifar10(c):
  set_augment_preset(c, "moco_v2_aug_plus")
  c.augment.num_views = 3
  c.augment.erasing_prob = 1.0  # the script's --erasing (torchvision RandomErasing(p=1.0))
  _cifar(c, batch=256, weight_decay=8e-4, queue=12288)
  _cld(c, clusters=200, weight=0.8, head="norm_linear")


def _cifar100(c):
  set_augment_preset(c, "npid")  # CLD's `default` CIFAR views
  c.augment.num_views = 3
  _cifar(c, batch=128, weight_decay=7e-4, queue=4096)
  _cld(c, clusters=100, weight=0.25, head="norm_linear")


def _imagenet(c):
  set_augment_preset(c, "moco_v2_aug_plus")
  c.augment.num_views = 3
  c.model.encoder = "resnet50"
  c.model.cifar_stem = False
  c.train.compute_dtype = "bfloat16"
  _three_views(c)
  hp = c.method.moco
  hp.temperature = 0.2
  hp.queue_size = 65536
  hp.ema_momentum = 0.999
  hp.ema_momentum_final = 0.999
  hp.proj_hidden_dim = 2048
  hp.proj_dim = 128
  hp.proj_layers = 2
  hp.norm_linear = True
  c.optim.name = "sgd"
  c.optim.lr = 0.2
  c.optim.base_batch_size = 512
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.0
  c.optim.final_lr_fraction = 0.0
  c.train.batch_size = 512
  c.train.epochs = 200.0
  c.train.checkpoint_every_steps = 2500
  c.eval.batch_size = 1024
  c.eval.monitor_train_examples = 50000
  # The papers' linear evaluation on the whole splits (ssljax.eval.linear_eval), with MoCo's
  # main_lincls.py settings: lr 30 at batch 256, x0.1 at epochs 60 and 80, no weight decay.
  c.eval.linear_eval = True
  c.eval.linear_eval_lr = 30.0
  c.eval.linear_eval_weight_decay = 0.0
  c.eval.linear_eval_schedule = "steps"
  c.eval.monitor_test_examples = 10000
  _cld(c, clusters=120, weight=0.25, head="norm_mlp", temperature=0.4, global_kmeans=True)
