"""SimCLR on CIFAR-100: the solo-learn recipe of SPEC 6.1 (ResNet-18, 1000 epochs).

Command (CIFAR-100 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-100-python.tar.gz):
  ssljax train --config configs/simclr_cifar100.py --workdir runs/simclr_cifar100 \
      --config.data.data_dir=DATA_DIR

Recipe: configs/simclr_cifar10.py (solo-learn's simclr.yaml is the same for both CIFAR
datasets) with CIFAR-100's 100 classes and channel statistics.
Hardware / time: not run by ssljax yet (no GPU in the sessions so far). Published (not
measured by ssljax): solo-learn reports 65.78% linear top-1 after 1000 epochs (SPEC 6 table).
"""

import importlib.util
import os


def _cifar10_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "simclr_cifar10.py")
  spec = importlib.util.spec_from_file_location("simclr_cifar10", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _cifar10_config()
  c.data.name = "cifar100"
  c.data.num_classes = 100
  c.data.mean = (0.5071, 0.4865, 0.4409)
  c.data.std = (0.2673, 0.2564, 0.2762)
  return c
