"""The complete ssljax configuration schema, with its defaults.

Every key any part of ssljax reads is declared here, so a config file can show every setting
and nothing is defaulted out of sight. ``configs/<method>_<dataset>.py`` files start from
``default_config()``, apply the named presets below for the blocks they share (``set_dataset``,
``set_augment_preset``, ``set_cpu_job``; each docstring lists the values it sets) and override
what their recipe changes; the command line overrides further (``--config.optim.lr=0.3``). The
returned config is locked: assigning a key that does not exist raises an error naming the key,
which is how typos are caught.

Sections:
  data     where images come from and what they look like
  augment  the view policy (see ``ssljax.augment``)
  model    the encoder backbone (see ``ssljax.models``)
  method   which self-supervised method, and its hyperparameters under ``method.<name>``
  optim    optimizer and learning-rate schedule
  train    batch, length, precision, logging, checkpointing
  eval     kNN and linear-probe protocols
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def default_config() -> ml_collections.ConfigDict:
  """Returns the full schema with defaults (SimCLR on Fashion-MNIST, small ResNet)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  # One of: 'fashion_mnist_idx' (the four IDX files), 'tfds', 'cifar' (python archive
  # directory), 'image_folder', 'arrays' (an .npz file with `images`, optional `labels`).
  c.data.source = "fashion_mnist_idx"
  c.data.name = "fashion_mnist"  # TFDS dataset name, or 'cifar10'/'cifar100' for 'cifar'.
  c.data.data_dir = FASHION_MNIST_DIR  # Directory (or file for 'arrays') to read from.
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.download = False  # TFDS only: allow downloading (off: never touch the network).
  c.data.image_size = 28  # Height = width of the stored images the host delivers.
  c.data.channels = 1
  c.data.num_classes = 10
  # Per-channel statistics used by the encoder's input standardisation (of [0, 1] pixels).
  c.data.mean = (0.2860,)
  c.data.std = (0.3530,)
  c.data.prefetch = 2  # Host batches prepared ahead of the train step.

  # ---------------------------------------------------------------- augment
  c.augment = ml_collections.ConfigDict()
  c.augment.policy = "simclr"  # 'simclr' | 'moco_v2' | 'byol' | 'multicrop'
  c.augment.strength = 1.0  # DECISIONS.md convention; scales crop, jitter and grayscale.
  c.augment.crop_size = 28  # Output resolution of the (global) crops.
  c.augment.crop_scale = (0.08, 1.0)  # Area fraction range of random resized crop.
  c.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.augment.flip_prob = 0.5
  c.augment.jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue.
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.blur_prob = 0.0
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.solarize_prob = 0.0
  c.augment.num_views = 2  # 'simclr'/'moco_v2': identically drawn views per image (>= 2).
  # 'byol' policy: blur and solarize probabilities of view 1 and view 2 (BYOL paper values).
  c.augment.byol_blur_probs = (1.0, 0.1)
  c.augment.byol_solarize_probs = (0.0, 0.2)
  # Multi-crop ('multicrop' policy): number and geometry of the small crops.
  c.augment.num_small_crops = 0
  c.augment.small_crop_size = 14
  c.augment.small_crop_scale = (0.05, 0.4)

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  # 'resnet_tiny', 'resnet_small' (CPU-sized), 'resnet18', 'resnet34', 'resnet50'.
  c.model.encoder = "resnet_small"
  c.model.width = 1.0  # Width multiplier on the channel counts.
  c.model.cifar_stem = True  # 3x3 stride-1 stem without max-pool (else the 7x7/2 + pool).
  c.model.zero_init_residual = False  # Zero-init the last BN scale of each residual block.
  # > 0: a 1x1 conv + BN + ReLU to this many channels before pooling (wide representation
  # for the small CPU presets at little cost).
  c.model.expand_features = 0
  # BN without scale/bias on the pooled representation (standardised, centred features).
  c.model.output_bn = False
  c.model.sync_batchnorm = True  # BN statistics over the global batch (all devices).
  c.model.bn_momentum = 0.9  # Flax convention: decay of running stats (PyTorch 0.1).

  # ---------------------------------------------------------------- method
  c.method = ml_collections.ConfigDict()
  c.method.name = "simclr"
  c.method.simclr = ml_collections.ConfigDict()
  c.method.simclr.temperature = 0.2
  c.method.simclr.proj_hidden_dim = 512
  c.method.simclr.proj_dim = 128
  c.method.simclr.proj_layers = 2  # Linear layers in the projector (>= 1).
  c.method.simclr.proj_last_bn = False  # BN (non-affine) after the last projector layer.

  # MoCo v2 (SPEC 6.2). Defaults: solo-learn's MoCo V2+ CIFAR recipe, smaller queue.
  c.method.moco = ml_collections.ConfigDict()
  c.method.moco.temperature = 0.2
  c.method.moco.queue_size = 4096  # Keys kept; a multiple of the global batch.
  # EMA momentum of the key encoder, cosine-increased from `ema_momentum` to
  # `ema_momentum_final` over the run (equal values: constant, as in MoCo v2's 0.999).
  c.method.moco.ema_momentum = 0.99
  c.method.moco.ema_momentum_final = 0.999
  c.method.moco.symmetric = True  # Also swap the two views' roles and average.
  c.method.moco.proj_hidden_dim = 512
  c.method.moco.proj_dim = 128
  c.method.moco.proj_layers = 2  # 1: the linear head of MoCo v1 / the CIFAR demo.
  # 2: query view 0, key view 1 (and the reverse if `symmetric`). 3: CLD's three-view MoCo
  # (SPEC 5.5): queries of views 0 and 1 against the key of view 2; needs
  # augment.num_views >= 3 and symmetric = False.
  c.method.moco.num_views = 2

  # BYOL (SPEC 6.3). Defaults: solo-learn CIFAR (projector 4096 -> 256, predictor 4096).
  c.method.byol = ml_collections.ConfigDict()
  c.method.byol.proj_hidden_dim = 4096
  c.method.byol.proj_dim = 256
  c.method.byol.pred_hidden_dim = 4096
  # Target EMA momentum: cosine from `ema_momentum` to `ema_momentum_final` over the run.
  c.method.byol.ema_momentum = 0.99
  c.method.byol.ema_momentum_final = 1.0
  # True: each view goes through the networks on its own, so BN statistics are per view (the
  # DeepMind and solo-learn code); False: one forward of both views concatenated.
  c.method.byol.per_view_forward = True

  # SwAV (SPEC 6.4). Defaults: solo-learn CIFAR (no multi-crop there; use the 'multicrop'
  # augment policy for 2 global + V local crops).
  c.method.swav = ml_collections.ConfigDict()
  c.method.swav.temperature = 0.1
  c.method.swav.epsilon = 0.05  # Sinkhorn entropy regularisation.
  c.method.swav.sinkhorn_iters = 3
  c.method.swav.num_prototypes = 3000
  c.method.swav.proj_hidden_dim = 2048
  c.method.swav.proj_dim = 128
  c.method.swav.queue_size = 3840  # 0: no queue. A multiple of the global batch.
  c.method.swav.queue_start_epoch = 50.0  # The queue joins the codes from this epoch.
  c.method.swav.freeze_prototypes_epochs = 2.0  # Prototypes get no update before this.
  c.method.swav.crops_for_assign = (0, 1)  # Views whose codes are predicted (global crops).

  # Barlow Twins (SPEC 6.5). Defaults: the official ImageNet loss; solo-learn CIFAR sizes.
  c.method.barlow_twins = ml_collections.ConfigDict()
  c.method.barlow_twins.lambda_offdiag = 0.0051
  c.method.barlow_twins.scale_loss = 1.0  # Multiplies the loss (solo-learn CIFAR: 0.1).
  c.method.barlow_twins.unbiased_std = False  # MetaMask's standardisation (SPEC 4.3).
  c.method.barlow_twins.proj_hidden_dim = 2048
  c.method.barlow_twins.proj_dim = 2048
  c.method.barlow_twins.proj_layers = 3
  # Biases in the projector's linear layers (official code: none; solo-learn CIFAR: yes).
  c.method.barlow_twins.proj_bias = False

  # NPID / InstDisc (SPEC 6.6). Defaults: CLD's CIFAR setting.
  c.method.npid = ml_collections.ConfigDict()
  c.method.npid.temperature = 0.1  # Original paper: 0.07.
  c.method.npid.proj_dim = 128
  c.method.npid.bank_size = 0  # Memory-bank rows; 0 = the training-set size (must equal it).
  c.method.npid.bank_momentum = 0.5
  # 0: full softmax over the bank (CLD's nce_k = 0); > 0: NCE with this many noise samples
  # and a normalising constant Z estimated on the first batch, then fixed (original NPID).
  c.method.npid.nce_negatives = 0
  # Views per image in the loss: 1 (NPID), or 2 (CLD's --two-imgs: the loss averages both
  # views against the same bank, and each view's embedding is written into it in turn).
  c.method.npid.num_views = 1

  # DINO as in the DISSL/CISSL repository (SPEC 2.3b).
  c.method.dino = ml_collections.ConfigDict()
  c.method.dino.proj_hidden_dim = 1024
  c.method.dino.bottleneck_dim = 256
  c.method.dino.out_dim = 1000  # Outputs of the weight-normalised last layer.
  c.method.dino.student_temperature = 0.1
  c.method.dino.teacher_temperature = 0.07
  c.method.dino.teacher_temperature_warmup = 0.04  # Linear warm-up from this value ...
  c.method.dino.teacher_temperature_warmup_epochs = 50.0  # ... over these epochs.
  c.method.dino.center_momentum = 0.9
  c.method.dino.ema_momentum = 0.996
  c.method.dino.ema_momentum_final = 1.0
  c.method.dino.freeze_last_layer_epochs = 1.0
  # Head layout (DINOHead); defaults: the ISSL code, SPEC 2.3b. Official DINO / solo-learn:
  # proj_layers 3, proj_bn False, proj_bias True, normalize_before_bottleneck False.
  c.method.dino.proj_layers = 2  # Linear layers before the unit-norm one, bottleneck included.
  c.method.dino.proj_bn = True  # BN after each hidden linear layer.
  c.method.dino.proj_bias = False  # Biases in the hidden and bottleneck linear layers.
  c.method.dino.normalize_before_bottleneck = True  # ISSL: L2-normalise before the bottleneck.
  # True (ISSL code): the centre is updated after each of the two view pairs, so the second
  # pair is centred with the centre already moved by the first pair's teacher batch mean.
  # False (official DINO): one update per step with the mean over both global views.
  c.method.dino.sequential_center = True
  # True: one forward per view (solo-learn); False: views of equal resolution concatenated in
  # one forward, the head applied once to all views (official DINO, ISSL code).
  c.method.dino.per_view_forward = False
  # Evaluate the teacher encoder (official DINO) instead of the student (ISSL, solo-learn).
  c.method.dino.eval_teacher = False

  # ---------------------------------------------------------------- optim
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "lars"  # 'sgd' | 'lars' | 'adam' | 'adamw'
  # Peak learning rate = lr * global_batch / base_batch_size (linear scaling rule).
  c.optim.lr = 0.3
  c.optim.base_batch_size = 256
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 1e-6
  # Coupled decay (PyTorch SGD/Adam: wd * theta added to the gradient before the update);
  # 'adamw' always decouples.
  c.optim.lars_eta = 0.001
  c.optim.lars_exclude_bias_and_norm = True  # No LARS adaptation or decay on biases/BN.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.schedule = "warmup_cosine"  # 'warmup_cosine' | 'constant'
  c.optim.warmup_epochs = 1.0
  c.optim.warmup_init_fraction = 0.0  # Warmup starts at lr * this.
  c.optim.final_lr_fraction = 0.0  # Cosine ends at lr * this.
  c.optim.grad_clip_norm = 0.0  # 0 disables.

  # ---------------------------------------------------------------- train
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # Global batch of distinct images (each gives several views).
  c.train.epochs = 10.0
  c.train.num_steps = 0  # > 0 overrides `epochs`.
  c.train.compute_dtype = "float32"  # 'bfloat16' computes in bf16 with float32 parameters.
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.keep_checkpoints = 2
  c.train.eval_every_steps = 0  # Periodic kNN monitor (0: only at the end).
  c.train.progress_bar = True

  # ---------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1024  # Feature-extraction batch.
  c.eval.knn_k = 200
  c.eval.knn_t = 0.1
  c.eval.knn_chunk_size = 1024  # Test rows compared with the whole bank at once.
  # The periodic monitor uses subsets to stay cheap (0 = all).
  c.eval.monitor_train_examples = 10000
  c.eval.monitor_test_examples = 2000
  # > 0: before extracting features (final evaluation and monitor), replace the encoder's
  # running BN statistics by statistics of this many clean train images (ssljax.eval.precise_bn;
  # for views smaller than the images), rounded down to whole eval.batch_size batches; the
  # monitor draws them from its bank. 0: the running statistics of training.
  c.eval.precise_bn_examples = 0
  c.eval.linear_probe = True
  c.eval.probe_epochs = 100
  c.eval.probe_batch_size = 512
  c.eval.probe_holdout_fraction = 0.1
  c.eval.probe_lrs = (0.01, 0.1, 1.0)
  c.eval.probe_weight_decays = (0.0, 1e-5, 1e-4)
  c.eval.plots = True
  return c


# ---------------------------------------------------------------- presets
# Blocks that several configs/<method>_<dataset>.py files share. A preset assigns exactly the
# keys listed in its docstring and leaves every other key as it was.

DATASETS: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(
        source="fashion_mnist_idx", name="fashion_mnist", data_dir=FASHION_MNIST_DIR,
        train_split="train", test_split="test", image_size=28, channels=1, num_classes=10,
        mean=(0.2860,), std=(0.3530,)),
    "cifar10": dict(
        source="tfds", name="cifar10", data_dir="", train_split="train", test_split="test",
        image_size=32, channels=3, num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(
        source="tfds", name="cifar100", data_dir="", train_split="train", test_split="test",
        image_size=32, channels=3, num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "imagenet": dict(
        source="tfds", name="imagenet2012", data_dir="", train_split="train",
        test_split="validation", image_size=224, channels=3, num_classes=1000,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

AUGMENT_PRESETS: dict[str, dict[str, Any]] = {
    "fashion_mnist_cpu": dict(
        policy="simclr", crop_scale=(0.3, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.0, 0.0),
        jitter_prob=0.8, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0),
    "symmetric": dict(
        policy="simclr", crop_scale=(0.08, 1.0), flip_prob=0.5, jitter=(0.8, 0.8, 0.8, 0.2),
        jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
        solarize_prob=0.0),
    "symmetric_weak": dict(
        policy="moco_v2", crop_scale=(0.08, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
        solarize_prob=0.0),
    "asymmetric": dict(
        policy="byol", crop_scale=(0.08, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_prob=0.8, grayscale_prob=0.2, byol_blur_probs=(0.0, 0.0),
        byol_solarize_probs=(0.0, 0.2)),
    "byol": dict(
        policy="byol", crop_scale=(0.08, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_prob=0.8, grayscale_prob=0.2, blur_sigma=(0.1, 2.0), byol_blur_probs=(1.0, 0.1),
        byol_solarize_probs=(0.0, 0.2)),
    "moco_v2_aug_plus": dict(
        policy="moco_v2", crop_scale=(0.2, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.4, 0.1),
        jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
        solarize_prob=0.0),
    "npid": dict(
        policy="simclr", crop_scale=(0.2, 1.0), flip_prob=0.5, jitter=(0.4, 0.4, 0.4, 0.4),
        jitter_prob=1.0, grayscale_prob=0.2, blur_prob=0.0, solarize_prob=0.0),
}


def _preset(presets: Mapping[str, dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
  if name not in presets:
    raise ValueError(f"unknown {kind} preset {name!r}; valid names: {', '.join(sorted(presets))}")
  return presets[name]


def set_dataset(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets the ``data`` section of dataset `name` and ``augment.crop_size`` to its image size.

  Assigns ``data.source, name, data_dir, train_split, test_split, image_size, channels,
  num_classes, mean, std`` (``DATASETS[name]``) and ``augment.crop_size = image_size``:

    fashion_mnist  'fashion_mnist_idx' IDX files in FASHION_MNIST_DIR, splits train/test,
                   28 x 28 x 1, 10 classes, mean (0.2860,), std (0.3530,).
    cifar10        'tfds' cifar10 (data_dir '' = the TFDS default, ~/tensorflow_datasets or
                   $TFDS_DATA_DIR), splits train/test, 32 x 32 x 3, 10 classes,
                   mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).
    cifar100       'tfds' cifar100 (data_dir ''), splits train/test, 32 x 32 x 3, 100 classes,
                   mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762).
    imagenet       'tfds' imagenet2012 (data_dir ''), splits train/validation, 224 x 224 x 3,
                   1000 classes, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).

  Recipes whose reference code uses other channel statistics override ``data.mean``/``std``
  after the call.

  Raises:
    ValueError: `name` is not one of the datasets above.
  """
  for key, value in _preset(DATASETS, name, "dataset").items():
    c.data[key] = value
  c.augment.crop_size = c.data.image_size


def set_augment_preset(c: ml_collections.ConfigDict, name: str) -> None:
  """Sets the view distribution of the named preset in ``augment`` (``AUGMENT_PRESETS[name]``).

  Assigns ``policy``, ``crop_scale`` (area range of the random resized crop), ``flip_prob``
  (0.5 in every preset), ``jitter`` (brightness, contrast, saturation, hue) and ``jitter_prob``,
  ``grayscale_prob``, and the blur / solarisation keys the policy reads: ``blur_prob``
  (``blur_sigma`` (0.1, 2.0) where it blurs) and ``solarize_prob`` for 'simclr' and 'moco_v2',
  ``byol_blur_probs`` and ``byol_solarize_probs`` (view 1, view 2) for 'byol'. Crop sizes come
  from ``set_dataset``; multi-crop geometry is left to the config.

    fashion_mnist_cpu  'simclr', RRC 0.3-1, jitter 0.4/0.4/0/0 p 0.8, no grayscale, blur or
                       solarisation: crop + flip carry most of the signal on 28 x 28 grayscale
                       clothing, and colour jitter reduces to brightness/contrast on one
                       channel. The other methods' Fashion-MNIST configs use it as is; the
                       SimCLR default job strengthens it (crops 0.2-1, jitter 0.8/0.8), which
                       gave kNN +0.005 there (docs/results.md); 0.15-1 with jitter 1.0 lost.
    symmetric          solo-learn CIFAR (SimCLR, SwAV; also SimCLR's ImageNet views): 'simclr',
                       RRC 0.08-1, jitter 0.8/0.8/0.8/0.2 p 0.8, grayscale 0.2, blur p 0.5,
                       no solarisation.
    symmetric_weak     solo-learn CIFAR (MoCo V2+): 'moco_v2', RRC 0.08-1, jitter
                       0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2, blur p 0.5, no solarisation.
    asymmetric         solo-learn CIFAR (BYOL, Barlow Twins): 'byol', RRC 0.08-1, jitter
                       0.4/0.4/0.2/0.1 p 0.8, grayscale 0.2, no blur, solarisation p 0 / 0.2.
    byol               the BYOL paper's ImageNet views (also Barlow Twins'): as `asymmetric`
                       with blur p 1.0 / 0.1.
    moco_v2_aug_plus   MoCo v2's ImageNet "aug+": 'moco_v2', RRC 0.2-1, jitter 0.4/0.4/0.4/0.1
                       p 0.8, grayscale 0.2, blur p 0.5, no solarisation.
    npid               CLD's CIFAR `default` views and lemniscate's ImageNet views: 'simclr',
                       RRC 0.2-1, jitter 0.4/0.4/0.4/0.4 always applied, grayscale 0.2, no blur
                       or solarisation.

  Raises:
    ValueError: `name` is not one of the presets above.
  """
  for key, value in _preset(AUGMENT_PRESETS, name, "augment").items():
    c.augment[key] = value


def set_cpu_job(c: ml_collections.ConfigDict) -> None:
  """Sets the backbone and run length of the CPU-sized Fashion-MNIST jobs.

  Assigns ``model.encoder = 'resnet_tiny'`` (stride-2 stem, 16/32/64 channels) and
  ``model.expand_features = 512`` (a 1x1 expansion to 512 features: about 3x the throughput of
  resnet_small on 2 CPU cores, and the wide representation lifted kNN accuracy at equal epochs,
  see the README's recipe notes); ``train.batch_size = 256``, ``train.epochs = 12.0``,
  ``train.log_every_steps = 50``, ``train.checkpoint_every_steps = 500`` and
  ``train.eval_every_steps = 234`` (one epoch of Fashion-MNIST's 60,000 images).
  """
  c.model.encoder = "resnet_tiny"
  c.model.expand_features = 512
  c.train.batch_size = 256
  c.train.epochs = 12.0
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.eval_every_steps = 234


def load_config_module(path: str):
  """Executes the config file `path` and returns it as a module (``.get_config()``, docs).

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  import importlib.util
  import os

  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found (configs live in configs/)")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks `config` so that setting an unknown key is an error."""
  config.lock()
  return config


def config_to_json(config: ml_collections.ConfigDict) -> str:
  """Serialises a config (as stored in ``<workdir>/config.json``)."""
  return config.to_json(indent=2, sort_keys=True)


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from `config_to_json` output, checked against the schema.

  Keys the schema does not know are an error (the workdir was made by another ssljax
  version, or the file was edited by hand).
  """
  import json

  config = lock(default_config())
  values = _tuples(json.loads(text))

  def update(node: ml_collections.ConfigDict, items: dict, prefix: str) -> None:
    for key, value in items.items():
      if key not in node:
        raise KeyError(f"config key {prefix}{key} is not part of the ssljax config schema "
                       f"(see ssljax/config.py)")
      if isinstance(value, dict):
        update(node[key], value, f"{prefix}{key}.")
      else:
        with node.ignore_type():
          node[key] = value

  update(config, values, "")
  return config
