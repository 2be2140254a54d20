"""SIMCLR + UOTA on Fashion-MNIST (UOTA paper Sec. 3, generalised to other losses as the paper
proposes). The argument: fashion_mnist (closed-form weights) or fashion_mnist_base (the same
multi-crop simclr without UOTA, the comparison's baseline).

Commands:
  ssljax train --config configs/simclr_uota.py:fashion_mnist --workdir runs/simclr_uota_fmnist
  ssljax train --config configs/simclr_uota.py:fashion_mnist_base --workdir runs/simclr_mc_fmnist

The simclr Fashion-MNIST recipe (configs/simclr.py:fashion_mnist) on the multi-crop views and
budget of configs/swav_uota.py (2 x 20 px + 4 x 10 px crops, 4 epochs, precise BN, 30-epoch
probe), with SimCLR's multi-view NT-Xent (every other view of the image a positive; the weight
of a view multiplies its anchor terms). UOTA tau 350.0 (350 at d = 128, scaled with the
projection width), from
half-way, no learning-rate restart.
Measured numbers and commands: docs/results.md (UOTA section); 2 CPU cores, a few minutes a run.
"""

import os

from ssljax.config import check_method_sections, load_config_module, with_method

_HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ("fashion_mnist", "fashion_mnist_base")


def get_config(arg=None):
  setting = arg or "fashion_mnist"
  if setting not in SETTINGS:
    raise ValueError(f"configs/simclr_uota.py: unknown setting {setting!r}; valid: "
                     f"{', '.join(SETTINGS)}")
  c = load_config_module(os.path.join(_HERE, "simclr.py")).get_config("fashion_mnist")
  if setting == "fashion_mnist":
    c = with_method(c, "simclr", addons=("uota",))
    c.method.uota.temperature = 350.0
  load_config_module(os.path.join(_HERE, "swav_uota.py")).fashion_mnist_multicrop(c)
  check_method_sections(c)
  return c
