"""The ssljax configuration schema, with its defaults.

Every key any part of ssljax reads is declared here or in the config section its method or
add-on registers, so a config file can show every setting and nothing is defaulted out of
sight. ``configs/<method>.py`` files start from ``default_config(method)``, apply the named
presets below for the blocks they share (``set_dataset``, ``set_augment_preset``,
``set_cpu_job``; each docstring lists the values it sets) and override what their recipe
changes, per dataset (the file's argument: ``configs/swav.py:cifar100``); the command line
overrides further (``--config.optim.lr=0.3``). The config is locked when used: assigning a key
that does not exist raises an error naming the key, which is how typos are caught.

Sections:
  data     where images come from and what they look like
  augment  the view policy (see ``ssljax.augment``)
  model    the encoder backbone (see ``ssljax.models``)
  method   ``name``, ``addons`` (applied in order) and one section per component used:
           ``method.<name>`` and ``method.<addon>`` for each add-on, with the defaults their
           modules register (``ssljax.methods.base.register``/``register_addon``). Other
           methods' sections are not part of the config, so a run's ``config.json`` holds only
           what it uses.
  optim    optimizer and learning-rate schedule
  train    batch, length, precision, logging, checkpointing
  eval     kNN, linear-probe and MLP-probe protocols
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_collections

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def default_config(method: str = "simclr",
                   addons: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Returns the schema with defaults for `method` wrapped by `addons` (in order).

  Base sections: Fashion-MNIST, a small ResNet, LARS; ``method.<method>`` and
  ``method.<addon>`` hold the registered defaults of the method and of each add-on.

  Raises:
    ValueError: `method` or an add-on is not registered (the message lists the registered
      names), or an add-on is named twice.
  """
  import ssljax.methods  # noqa: F401  (registers every built-in method and add-on)
  from ssljax.methods import base

  addons = tuple(addons)
  if len(set(addons)) != len(addons):
    raise ValueError(f"method.addons names an add-on twice: {addons}")
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  # One of: 'fashion_mnist_idx' (the four IDX files), 'tfds', 'cifar' (python archive
  # directory), 'image_folder', 'arrays' (an .npz file with `images`, optional `labels`), or
  # a streaming source for ImageNet-scale data, read and pre-cropped per batch and never held
  # in memory (ssljax.data.streaming): 'tfds_stream' (data.name prepared as ArrayRecord, e.g.
  # 'imagenet2012') or 'folder_stream' (<data_dir>/<split>/<class>/<image>).
  c.data.source = "fashion_mnist_idx"
  c.data.name = "fashion_mnist"  # TFDS dataset name, or 'cifar10'/'cifar100' for 'cifar'.
  c.data.data_dir = FASHION_MNIST_DIR  # Directory (or file for 'arrays') to read from.
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.download = False  # TFDS only: allow downloading (off: never touch the network).
  c.data.image_size = 28  # Height = width of the stored images the host delivers.
  c.data.channels = 1
  c.data.num_classes = 10  # 0: unlabelled (pretraining only; evaluation is skipped).
  # Per-channel statistics used by the encoder's input standardisation (of [0, 1] pixels).
  c.data.mean = (0.2860,)
  c.data.std = (0.3530,)
  # 'image_folder' only: image_size, channels, num_classes 0 and mean, std () are read from
  # the folder before the run starts (ssljax.data.folder; the `folder` preset sets them so);
  # mean and std from this many train images drawn with `seed`.
  c.data.stats_examples = 1000
  c.data.prefetch = 2  # Host batches prepared ahead of the train step.
  # Streaming sources only: the host's random-resized-crop box (area fraction, aspect range)
  # cut from each image and resized to data.image_size; (1.0, 1.0) keeps the whole image (its
  # centre crop of clamped aspect), so the device crop's scale range keeps its meaning.
  c.data.precrop_scale = (1.0, 1.0)
  c.data.precrop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  # Streaming sources only: grain worker processes decoding batches (0: in the trainer's
  # process) and read threads in each; sized for a TPU VM host (dozens of cores). Evaluation
  # decodes its views in workers x threads threads of the trainer (at most one per core).
  c.data.stream_workers = 16
  c.data.stream_threads = 2
  # > 0: train on the long-tailed subset of the train split (CIFAR-10-LT construction,
  # ssljax.data.sources.long_tailed_subset): exponential class sizes with this ratio between
  # the largest and the smallest class (100: CIFAR-10-LT). The test split stays balanced.
  c.data.imbalance = 0.0

  # ---------------------------------------------------------------- augment
  c.augment = ml_collections.ConfigDict()
  c.augment.policy = "simclr"  # 'simclr' | 'moco_v2' | 'byol' | 'multicrop'
  c.augment.strength = 1.0  # Scales crop, jitter and grayscale (ISSL code's convention).
  c.augment.crop_size = 28  # Output resolution of the (global) crops; 0: data.image_size.
  c.augment.crop_scale = (0.08, 1.0)  # Area fraction range of random resized crop.
  c.augment.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.augment.flip_prob = 0.5
  c.augment.jitter = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue.
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.2
  c.augment.blur_prob = 0.0
  c.augment.blur_sigma = (0.1, 2.0)
  c.augment.solarize_prob = 0.0
  # Random erasing at the end of every view (torchvision RandomErasing; 0: off). The fill is
  # erasing_value in [0, 1], or data.mean when it is empty (torchvision's 0 after Normalize).
  c.augment.erasing_prob = 0.0
  c.augment.erasing_scale = (0.02, 0.33)
  c.augment.erasing_ratio = (0.3, 3.3)
  c.augment.erasing_value = ()
  c.augment.num_views = 2  # 'simclr'/'moco_v2': identically drawn views per image (>= 2).
  # 'byol' policy: blur and solarize probabilities of view 1 and view 2 (BYOL paper values).
  c.augment.byol_blur_probs = (1.0, 0.1)
  c.augment.byol_solarize_probs = (0.0, 0.2)
  # Multi-crop ('multicrop' policy): number and geometry of the small crops.
  c.augment.num_small_crops = 0
  c.augment.small_crop_size = 14  # 0: half of data.image_size.
  c.augment.small_crop_scale = (0.05, 0.4)
  # The last num_ood_crops small crops are out-of-distribution on purpose: tiny crops of area
  # ood_crop_scale that mostly miss the object (the UOTA premise, measured).
  c.augment.num_ood_crops = 0
  c.augment.ood_crop_scale = (0.005, 0.02)

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
  # With expand_features: > 0 makes that expansion the residual BottleneckExpand block of the
  # DISSL/CISSL code with this many inner channels (their "+ dim.": 512 -> 2048 with 512).
  c.model.expand_bottleneck = 0
  # With cifar_stem: a 3x3 stride-2 max-pool after the stem (DISSL/CISSL TinyImageNet ResNet).
  c.model.stem_pool = False
  # BN without scale/bias on the pooled representation (standardised, centred features).
  c.model.output_bn = False
  c.model.sync_batchnorm = True  # BN statistics over the global batch (all devices).
  c.model.bn_momentum = 0.9  # Flax convention: decay of running stats (PyTorch 0.1).

  # ---------------------------------------------------------------- method
  # The method's and add-ons' own sections, `method.<name>`, come from their registrations
  # (ssljax/methods/<name>.py, `default_section`).
  c.method = ml_collections.ConfigDict()
  c.method.name = method
  c.method.addons = tuple(addons)
  c.method[method] = base.method_section(method)
  for addon in addons:
    c.method[addon] = base.addon_section(addon)

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
  # 'warmup_cosine' | 'constant' | 'warmup_cosine_per_epoch' (the DISSL/CISSL code's: the
  # rate changes once per epoch; the first epoch runs at the warmup start, see train/optim.py).
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_epochs = 1.0
  c.optim.warmup_init_fraction = 0.0  # Warmup starts at lr * this.
  c.optim.final_lr_fraction = 0.0  # Cosine ends at lr * this.
  # > 0: from this fraction of the run on, the cosine's peak is restart_peak_scale x lr (the
  # official UOTA code's restart at its switch-on epoch: x2 at 0.5). 0: no restart.
  c.optim.restart_fraction = 0.0
  c.optim.restart_peak_scale = 2.0
  c.optim.grad_clip_norm = 0.0  # 0 disables.
  # > 0: clip every gradient entry to [-v, v] first (PyTorch clip_grad_value_, ISSL code).
  c.optim.grad_clip_value = 0.0

  # ---------------------------------------------------------------- train
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 256  # Global batch of distinct images (each gives several views).
  c.train.epochs = 10.0
  c.train.num_steps = 0  # > 0 overrides `epochs`.
  # 'auto': bf16 activations on a GPU/TPU, float32 on a CPU (ssljax.models.resolve_compute_dtype);
  # 'bfloat16' or 'float32' force one. Parameters and loss reductions are float32 always.
  c.train.compute_dtype = "auto"
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.keep_checkpoints = 2
  # Resuming a checkpoint with another train.batch_size changes what optim.lr (linear scaling)
  # and an epoch mean; it is refused unless this is True.
  c.train.allow_batch_size_change = False
  c.train.eval_every_steps = 0  # Periodic kNN monitor (0: only at the end).
  # Order of the devices along the one 'data' mesh axis: 'devices' (jax.devices()) or
  # 'topology' (jax.experimental.mesh_utils, the TPU interconnect's order). ssljax.parallel.
  c.train.mesh_device_order = "devices"
  # A tqdm bar when stderr is a terminal; off a terminal (log files, nohup, clusters) or when
  # False, one log line per log_every_steps (step, epoch, loss, images/s, ETA) instead.
  c.train.progress_bar = True

  # ---------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  # False: no kNN monitor, kNN or linear probe (results.json still records the run). They are
  # also skipped, with the reason logged and in results.json, when the train or test split has
  # no labels or an image folder has no test split.
  c.eval.enabled = True
  c.eval.batch_size = 1024  # Feature-extraction batch.
  c.eval.knn_k = 200
  c.eval.knn_t = 0.1
  c.eval.knn_chunk_size = 1024  # Test rows compared with the whole bank at once.
  # The periodic monitor uses subsets to stay cheap (0 = all); on a streaming source they also
  # size the final kNN and linear probe (a whole split, 0, is skipped there).
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
  # True: also an MLP probe (ssljax.eval.mlp_probe; the DISSL/CISSL `_mlp` evaluation) on the
  # same features, standardised, with the linear probe's held-out selection, batch size and
  # holdout fraction: Linear-BN-ReLU hidden layers of these widths, then a linear classifier.
  # Off by default: at 512 features, 10 classes, one epoch of one grid point is ~1000x the
  # linear probe's arithmetic: on 2 shared CPU cores one epoch of the defaults on 54k x 512
  # features took ~250 s (30 epochs: ~2 h); hidden (512, 512) and 10 epochs is ~30x less.
  c.eval.mlp_probe = False
  c.eval.mlp_probe_hidden_dims = (2048, 2048)
  c.eval.mlp_probe_epochs = 30
  c.eval.mlp_probe_lrs = (0.01, 0.1)  # Grid: lrs x weight decays (on weight matrices only).
  c.eval.mlp_probe_weight_decays = (1e-5, 1e-4)
  # True: also the papers' linear evaluation (ssljax.eval.linear_eval): a linear layer trained
  # on the frozen encoder over augmented views (random resized crop + flip) of the whole train
  # split, tested on centre crops of the whole test split; reported as linear_eval/*. Defaults:
  # SwAV's eval_linear.py (UOTA); MoCo's main_lincls.py (CLD) is _lr=30, _weight_decay=0,
  # _schedule='steps'. Checkpointed under <workdir>/linear_eval/ and resumed from there.
  c.eval.linear_eval = False
  c.eval.linear_eval_epochs = 100.0
  c.eval.linear_eval_batch_size = 256
  c.eval.linear_eval_lr = 0.3  # per 256 images, scaled linearly with the batch
  c.eval.linear_eval_momentum = 0.9
  c.eval.linear_eval_nesterov = False
  c.eval.linear_eval_weight_decay = 1e-6  # on the weights and the bias, as PyTorch's SGD
  # 'cosine' to 0, decayed every step; 'cosine_epochs' to 0, once per epoch (SwAV's exactly);
  # or 'steps': x0.1 at each milestone.
  c.eval.linear_eval_schedule = "cosine"
  c.eval.linear_eval_milestones = (60.0, 80.0)  # epochs (schedule 'steps')
  c.eval.linear_eval_crop_scale = (0.08, 1.0)  # area fractions of the random resized crop
  # Streamed test images: shorter side resized to data.image_size / this, then the centre
  # data.image_size square (0.875: ImageNet's Resize(256) + CenterCrop(224)).
  c.eval.linear_eval_test_crop = 0.875
  c.eval.linear_eval_checkpoint_every_steps = 1000
  c.eval.plots = True
  return c


# ---------------------------------------------------------------- presets
# Blocks that several configs/<method>.py recipes share. A preset assigns exactly the keys
# listed in its docstring and leaves every other key as it was.

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
        source="tfds_stream", name="imagenet2012", data_dir="", train_split="train",
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
    imagenet       'tfds_stream' imagenet2012 (data_dir ''; prepared as array_record),
                   splits train/validation, 224 x 224 x 3, 1000 classes,
                   mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225). ImageNet's images
                   vary in size and do not fit in a host's memory, so it streams
                   (ssljax.data.streaming): the host decodes each image and resizes it
                   whole (its 4:3 centre if it is longer than that either way) to 224 x 224,
                   the default ``data.precrop_scale = (1.0, 1.0)``, so the recipe's
                   random-resized crop on the device keeps its area range relative to the
                   whole image. The other streaming keys (``precrop_ratio``,
                   ``stream_workers``, ``stream_threads``) keep their defaults. A copy as
                   JPEG folders (DIR/train/<wnid>/*.JPEG) streams with
                   ``--config.data.source=folder_stream --config.data.data_dir=DIR``
                   (``data.test_split`` names the validation folder). The crops are cut
                   from the 224 px copy, not the full-size JPEG; a larger
                   ``data.image_size`` (e.g. 256) gives small crops more pixels at more
                   host work. Evaluation (kNN monitor, kNN, linear probe) runs on seeded
                   subsets of ``eval.monitor_train_examples`` / ``monitor_test_examples``
                   images read a batch at a time (the recipes: 50000 / 10000).

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


def set_issl_optimizer(c: ml_collections.ConfigDict, batch_size: int) -> None:
  """The ISSL code's optimiser (configs/cissl.py, configs/dissl.py): Adam 2e-3, weight decay
  1e-6, per-epoch warmup 10 + cosine, element-wise clip 2, at the recipe's batch."""
  c.optim.name = "adam"
  c.optim.lr = 2e-3
  c.optim.base_batch_size = batch_size  # the lr is for the recipe's batch as given
  c.optim.weight_decay = 1e-6
  c.optim.schedule = "warmup_cosine_per_epoch"
  c.optim.warmup_epochs = 10.0
  c.optim.final_lr_fraction = 0.0
  c.optim.grad_clip_value = 2.0
  c.train.batch_size = batch_size


def set_issl_views(c: ml_collections.ConfigDict, jitter: tuple[float, ...]) -> None:
  """The ISSL code's views (SimCLR policy, crops 0.2-1, the given jitter with p 0.8, grayscale
  0.1, no blur or solarisation), shared by configs/cissl.py and configs/dissl.py."""
  c.augment.policy = "simclr"
  c.augment.strength = 1.0
  c.augment.crop_scale = (0.2, 1.0)
  c.augment.flip_prob = 0.5
  c.augment.jitter = jitter
  c.augment.jitter_prob = 0.8
  c.augment.grayscale_prob = 0.1
  c.augment.blur_prob = 0.0
  c.augment.solarize_prob = 0.0


def set_cpu_job(c: ml_collections.ConfigDict) -> None:
  """Sets the backbone and run length of the CPU-sized Fashion-MNIST jobs.

  Assigns ``model.encoder = 'resnet_tiny'`` (stride-2 stem, 16/32/64 channels) and
  ``model.expand_features = 512`` (a 1x1 expansion to 512 features: about 3x the throughput of
  resnet_small on 2 CPU cores, and the wide representation lifted kNN accuracy at equal epochs,
  see the README's recipe notes); ``train.batch_size = 256``, ``train.epochs = 12.0``,
  ``train.log_every_steps = 50``, ``train.checkpoint_every_steps = 500`` and
  ``train.eval_every_steps = 234`` (one epoch of Fashion-MNIST's 60,000 images), and
  ``train.compute_dtype = 'float32'``: these jobs' accuracies were measured in float32, so they
  stay float32 on a GPU too, where the default 'auto' would compute in bf16.
  """
  c.model.encoder = "resnet_tiny"
  c.model.expand_features = 512
  c.train.batch_size = 256
  c.train.epochs = 12.0
  c.train.log_every_steps = 50
  c.train.checkpoint_every_steps = 500
  c.train.eval_every_steps = 234
  c.train.compute_dtype = "float32"


IMAGE_FOLDER = "folder"  # The config argument of the image-folder preset (``FILE:folder``).


def set_image_folder(c: ml_collections.ConfigDict) -> None:
  """Points the ``data`` section at your own images and leaves their shape to the folder.

  Assigns ``data.source = 'image_folder'``, ``data.name = 'folder'``, ``data.data_dir = ''``
  (to be given: ``--config.data.data_dir=DIR``), ``data.train_split = 'train'``,
  ``data.test_split = 'test'``, ``data.image_size = data.channels = data.num_classes = 0`` and
  ``data.mean = data.std = ()`` (read from DIR before the run: ``ssljax.data.folder``), and
  ``augment.crop_size = augment.small_crop_size = 0`` (the image size and half of it). The
  folder is ``DIR/train/<class>/<image>`` (labelled) or ``DIR/train/<image>`` (unlabelled:
  pretraining only), with an optional ``DIR/test/<class>/<image>`` for evaluation.

  ``load_config('configs/<method>.py:folder')`` (``ssljax train --config
  configs/<method>.py:folder``) applies it to the file's default recipe, the CPU-sized one.
  """
  c.data.source = "image_folder"
  c.data.name = "folder"
  c.data.data_dir = ""
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.image_size = 0
  c.data.channels = 0
  c.data.num_classes = 0
  c.data.mean = ()
  c.data.std = ()
  c.augment.crop_size = 0
  c.augment.small_crop_size = 0


def config_dataset(arg: str | None) -> str:
  """The dataset a ``configs/<method>.py`` file is asked for (its ``get_config`` argument).

  None (no ``:arg`` after the path) is 'fashion_mnist', the CPU-sized job.

  Raises:
    ValueError: `arg` is not one of `DATASETS` (the message lists them).
  """
  if arg is None or arg == "":
    return "fashion_mnist"
  if arg == IMAGE_FOLDER:
    raise ValueError(f"the {IMAGE_FOLDER!r} argument is applied by ssljax.config.load_config "
                     f"('configs/<method>.py:{IMAGE_FOLDER}'): it calls get_config() and then "
                     f"set_image_folder on the result")
  if arg not in DATASETS:
    raise ValueError(f"unknown dataset {arg!r} in the config argument (configs/<method>.py:"
                     f"<dataset>); valid datasets: {', '.join(DATASETS)}, or {IMAGE_FOLDER!r} "
                     f"for your own images")
  return arg


def with_method(config: ml_collections.ConfigDict, name: str,
                addons: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """A copy of `config` that runs method `name` wrapped by `addons`.

  The method section and add-on sections become those of `name` and `addons`: a section the
  old config also had keeps its values (e.g. the same method with an add-on added), the others
  get their registered defaults. Every other section keeps its values. The copy is locked if
  `config` was.

  Raises:
    ValueError: `name` or an add-on is not registered.
  """
  new = default_config(name, addons)

  def copy(src: ml_collections.ConfigDict, dst: ml_collections.ConfigDict) -> None:
    for key in src.keys():
      if key not in dst:
        continue
      if isinstance(src[key], ml_collections.ConfigDict):
        copy(src[key], dst[key])
      else:
        with dst.ignore_type():
          dst[key] = src[key]

  for key in config.keys():
    if key == "method" or key not in new:
      continue
    if isinstance(config[key], ml_collections.ConfigDict):
      copy(config[key], new[key])
    else:
      new[key] = config[key]
  for key in (name, *addons):
    if key in config.method:
      copy(config.method[key], new.method[key])
  if config.is_locked:
    new.lock()
  return new


def check_method_sections(config: ml_collections.ConfigDict) -> None:
  """Checks that ``config.method`` holds the sections of its method and add-ons, no others.

  Raises:
    ValueError: naming the missing or extra section and how to get a consistent config (the
      method is chosen by the config file, ``configs/<method>.py``; an add-on's section is
      added by naming it in ``method.addons``, see `ssljax.cli`).
  """
  import ssljax.methods  # noqa: F401
  from ssljax.methods import base

  name, addons = config.method.name, tuple(config.method.get("addons", ()))
  if name not in base.registered_methods():
    raise ValueError(f"method.name must be one of {base.registered_methods()}, got {name!r}")
  for addon in addons:
    if addon not in base.registered_addons():
      raise ValueError(f"method.addons: unknown add-on {addon!r}; registered add-ons: "
                       f"{base.registered_addons()}")
  sections = [k for k in config.method.keys() if k not in ("name", "addons")]
  if name not in sections:
    held = [k for k in sections if k in base.registered_methods()]
    raise ValueError(
        f"method.name is {name!r} but the config has no method.{name} section (it holds "
        f"{', '.join('method.' + k for k in held) or 'no method section'}): a config runs the "
        f"method it was built for; to run {name}, use configs/{name}.py (e.g. --config "
        f"configs/{name}.py:fashion_mnist) or ssljax.config.default_config({name!r})")
  for addon in addons:
    if addon not in sections:
      raise ValueError(f"add-on {addon!r} is in method.addons but the config has no "
                       f"method.{addon} section; build the config with "
                       f"ssljax.config.with_method(config, {name!r}, addons={addons!r})")
  extra = [k for k in sections if k != name and k not in addons]
  if extra:
    raise ValueError(f"config sections {', '.join('method.' + k for k in extra)} belong to "
                     f"neither method {name!r} nor the add-ons {addons}")


def load_config_module(path: str):
  """Executes the config file `path` and returns it as a module (``.get_config()``, docs).

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  import importlib.util
  import os

  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found (shipped configs load by name, "
                            f"e.g. --config simclr:fashion_mnist; see ssljax.configs)")
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of ``path[:arg]`` as ``ssljax train --config`` loads it (before overrides).

  The text after the first ':' is passed to the file's ``get_config`` (the dataset for
  ``configs/<method>.py``); without it ``get_config()`` is called with no argument. The
  argument ``folder`` (`IMAGE_FOLDER`) works with every config file: ``get_config()`` (the
  file's default recipe) followed by `set_image_folder`.

  ``path`` is a config file or the name of a config shipped in ``ssljax.configs``
  (``simclr:cifar10``, or ``simclr_cifar10``; see `ssljax.configs.resolve`).

  Raises:
    FileNotFoundError: neither a file nor a shipped name (the message lists the names).
    ValueError: the file rejects the argument (e.g. an unknown dataset).
  """
  from ssljax import configs

  path, has_arg, arg = configs.resolve(spec).partition(":")
  module = load_config_module(path)
  if arg == IMAGE_FOLDER:
    config = module.get_config()
    set_image_folder(config)
    return config
  return module.get_config(arg) if has_arg else module.get_config()


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

  The schema is ``default_config(method.name, method.addons)`` of the stored values. Keys it
  does not know are an error (the workdir was made by another ssljax version, or the file was
  edited by hand), except in a ``config.json`` written before configs held only the sections
  they use: its sections of other registered methods are dropped (and a missing
  ``method.addons`` means none).
  """
  import json

  import ssljax.methods  # noqa: F401
  from ssljax.methods import base

  values = _tuples(json.loads(text))
  method = values.get("method", {})
  name = method.get("name", "simclr")
  addons = tuple(method.get("addons", ()))
  config = lock(default_config(name, addons))
  for other in base.registered_methods():
    if other != name:
      method.pop(other, None)

  def update(node: ml_collections.ConfigDict, items: dict, prefix: str) -> None:
    for key, value in items.items():
      if key not in node:
        raise KeyError(f"config key {prefix}{key} is not part of the ssljax config schema "
                       f"for method {name!r} with add-ons {addons} (see ssljax/config.py and "
                       f"ssljax/methods/)")
      if isinstance(value, dict):
        update(node[key], value, f"{prefix}{key}.")
      else:
        with node.ignore_type():
          node[key] = value

  update(config, values, "")
  return config
