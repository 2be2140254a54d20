"""BYOL + CLD (CLD paper Sec. 3: CLD as an add-on to BYOL; no official BYOL+CLD code: the
authors' answer in frank-xwang/CLD-UnsupervisedLearning issue #6 is that the CLD term needs no
target network); the argument is the dataset: fashion_mnist (default) only.

Command:
  ssljax train --config configs/byol_cld.py:fashion_mnist --workdir runs/byol_cld_fmnist
Long-tailed variant (CIFAR-10-LT construction, ratio 100): add --config.data.imbalance=100.

fashion_mnist: configs/byol.py:fashion_mnist (resnet_tiny + 1x1 expansion to 512, batch 256,
  LARS 1.0, 12 epochs, BYOL's asymmetric views) with a CLD group head on the online encoder's
  features of the two views: linear 512 -> 128 with bias, L2-normalised, per-device k-means
  with K = 128 clusters per batch of 256 (5 rounds), T_c = 0.2, lambda = 1.0 (the NPID+CLD
  CIFAR-10 values; the paper's BYOL+CLD settings are not published). L = L_BYOL + L_CLD.
  Measured at 2 epochs (2026-12-02, 2-core CPU shared with other jobs) next to BYOL:
  docs/results.md, CLD section. The full 12 epochs were not run. No published number exists
  for this setting.
"""

import os

from ssljax.config import check_method_sections, load_config_module, with_method

_HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ("fashion_mnist",)


def get_config(arg=None):
  dataset = arg or "fashion_mnist"
  if dataset not in SETTINGS:
    raise ValueError(f"configs/byol_cld.py: unknown setting {dataset!r}; only fashion_mnist "
                     f"has a BYOL+CLD recipe (no official one exists)")
  c = load_config_module(os.path.join(_HERE, "byol.py")).get_config(dataset)
  c = with_method(c, "byol", addons=("cld",))
  hp = c.method.cld
  hp.num_clusters = 128
  hp.temperature = 0.2
  hp.weight = 1.0
  hp.num_iters = 5
  hp.head = "linear"
  hp.head_dim = 128
  hp.global_kmeans = False
  check_method_sections(c)
  return c
