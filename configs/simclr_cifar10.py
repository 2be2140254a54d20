"""SimCLR on CIFAR-10: the solo-learn recipe of SPEC 6.1 (ResNet-18, 1000 epochs).

Command (CIFAR-10 as a TFDS array_record dataset in DATA_DIR, or `--config.data.source=cifar
--config.data.data_dir=DIR` for the python archive cifar-10-python.tar.gz):
  ssljax train --config configs/simclr_cifar10.py --workdir runs/simclr_cifar10 \
      --config.data.data_dir=DATA_DIR

Recipe (SPEC 6.1, solo-learn scripts/pretrain/cifar/simclr.yaml): CIFAR ResNet-18 (3x3 stem,
no max-pool), projector 512-2048-256 with BN + ReLU, temperature 0.2, LARS lr 0.4 per 256
images, eta 0.02, weight decay 1e-4, biases and BN excluded from LARS, warmup + cosine,
batch 256, 1000 epochs, `symmetric` augmentations (RRC 0.08-1, colour jitter 0.8/0.8/0.8/0.2
with p 0.8, grayscale 0.2, blur p 0.5 as SPEC lists it, flip 0.5).
Hardware / time: not run by ssljax yet (no GPU in the sessions so far). Reference: solo-learn
reports 90.74% online linear top-1 after 1000 epochs (SPEC 6 table); lightly reports kNN 0.879
after 800 epochs at batch 512 (ANCHORS 0).
"""

from ssljax.config import default_config, set_augment_preset, set_dataset


def get_config():
  c = default_config()
  set_dataset(c, "cifar10")
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
