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

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar100")
  set_augment_preset(c, "symmetric")

  c.model.encoder = "resnet18"
  c.model.cifar_stem = True

  c.method.name = "simclr"
  c.method.simclr.temperature = 0.2
  c.method.simclr.proj_hidden_dim = 2048
  c.method.simclr.proj_dim = 256

  c.optim.name = "lars"
  c.optim.lr = 0.4
  c.optim.base_batch_size = 256
  c.optim.lars_eta = 0.02
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 10.0

  c.train.batch_size = 256
  c.train.epochs = 1000.0
  c.train.checkpoint_every_steps = 5000
  c.train.eval_every_steps = 19500  # every 100 epochs
  return c
