"""NPID + CLD (CLD paper Sec. 3-4; official train_cifar_npid_cld.py and
scripts/cifar/train_cifar{10,100}_npid_cld.sh); the argument is the dataset: fashion_mnist
(default), cifar10, cifar100.

Commands:
  ssljax train --config configs/npid_cld.py:fashion_mnist --workdir runs/npid_cld_fmnist
  ssljax train --config configs/npid_cld.py:cifar10 --workdir runs/npid_cld_cifar10 \
      --config.data.data_dir=DATA_DIR
  ssljax train --config configs/npid_cld.py:cifar100 --workdir runs/npid_cld_cifar100 \
      --config.data.data_dir=DATA_DIR
Long-tailed variant (CIFAR-10-LT construction, ratio 100): add --config.data.imbalance=100.

The instance branch is configs/npid.py's recipe for the dataset with two views per image
(method.npid.num_views = 2, the official --two-imgs: the full-softmax loss averaged over both
views, each view written into the memory bank); the group branch (method.cld) is a linear head
512 -> 128 with bias, L2-normalised, per-device batch k-means (first K rows as init, 5 rounds),
cld_t 0.2, lambda 1.0: L = L_NPID + L_CLD.

fashion_mnist: the CPU-sized NPID recipe of configs/npid.py:fashion_mnist (resnet_tiny + 1x1
  expansion to 512, batch 256, LARS 3.0, 12 epochs) with two views and CLD at the official
  CIFAR-10 setting (K = 128 clusters per batch of 256, T_c = 0.2, lambda = 1.0, linear head).
  Measured at 2 epochs (2026-12-02, seeds 0 and 1, 2-core CPU shared with other jobs) next to
  NPID with the same two views: docs/results.md, CLD section. The full 12 epochs were not run.
cifar10: the official script: ResNet-18 (CIFAR stem), batch 256, SGD momentum 0.9, lr 0.03 x
  256 / 128 = 0.06, weight decay 7e-4, 5 warm-up epochs from lr/100 then a per-step cosine to
  1e-6, 200 epochs; full softmax over the 50,000-row bank (nce_k 0), nce_t 0.1, bank momentum
  0.5; K = 128, cld_t 0.2, lambda 1.0; CLD's `default` views (RRC 0.2-1, colour jitter
  0.4/0.4/0.4/0.4 always applied, grayscale 0.2, flip). Deviations: apex AMP O1 there,
  train.compute_dtype 'auto' here (bfloat16 activations on a GPU or TPU, float32 parameters;
  float32 on a CPU); the official kNN monitor uses the 128-d instance-head output with
  sigma = 0.1, ssljax's kNN the 512-d backbone features (k 200, t 0.1).
  Published (not measured here): kNN top-1 86.7% (paper) / 86.8% (README reproduction, mean of
  3 runs), against 80.8% for NPID; frank-xwang/CLD-UnsupervisedLearning README. One GPU; the
  official script runs on one; no time of ours is quoted.
cifar100: as cifar10 with K = 200 (train_cifar100_npid_cld.sh). Published (not measured here):
  kNN top-1 57.5% (paper) / 58.8% (README reproduction) against 51.6% for NPID.
"""

import os

from ssljax.config import check_method_sections, load_config_module, with_method

_HERE = os.path.dirname(os.path.abspath(__file__))
_CLUSTERS = {"fashion_mnist": 128, "cifar10": 128, "cifar100": 200}
SETTINGS = tuple(_CLUSTERS)


def get_config(arg=None):
  dataset = arg or "fashion_mnist"
  if dataset not in SETTINGS:
    raise ValueError(f"configs/npid_cld.py: unknown setting {dataset!r}; valid: "
                     f"{', '.join(SETTINGS)}")
  c = load_config_module(os.path.join(_HERE, "npid.py")).get_config(dataset)
  c = with_method(c, "npid", addons=("cld",))
  c.method.npid.num_views = 2
  hp = c.method.cld
  hp.num_clusters = _CLUSTERS[dataset]
  hp.temperature = 0.2
  hp.weight = 1.0
  hp.num_iters = 5
  hp.head = "linear"
  hp.head_dim = 128
  hp.global_kmeans = False
  check_method_sections(c)
  return c
