"""The papers' linear evaluation: a linear classifier on the frozen encoder, trained on augmented
views of the whole train split and tested on centre crops of the test split.

This is the protocol behind the ImageNet top-1 numbers the papers report (and the one their
numbers in ssljax's ImageNet configs refer to), as opposed to ssljax's default probe
(`ssljax.eval.linear_probe`: features extracted once from clean images, hyperparameters chosen
on a held-out part). Per step, a batch of train images is augmented with a random resized crop
(area fraction ``eval.linear_eval_crop_scale``, torchvision's procedure) and a horizontal flip,
passed through the encoder in inference mode (BatchNorm with its running, or precise-BN,
statistics; no gradient reaches the encoder), and the linear layer ``W f + b`` takes one SGD
step on the softmax cross-entropy. The defaults are SwAV's ``eval_linear.py`` (used by UOTA,
``ssl-codelab/uota/eval_linear.py``): 100 epochs, batch 256, learning rate 0.3 cosine-decayed to
0, momentum 0.9, weight decay 1e-6. MoCo's ``main_lincls.py`` (used by CLD) is
``--config.eval.linear_eval_lr=30 --config.eval.linear_eval_weight_decay=0
--config.eval.linear_eval_schedule=steps`` (x0.1 at epochs 60 and 80). The learning rate is
given for batch 256 and scaled linearly with ``eval.linear_eval_batch_size``; the cosine decays
every step, where SwAV's ``CosineAnnealingLR`` steps once per epoch (a difference of one epoch's
worth of decay at most); ``--config.eval.linear_eval_schedule=cosine_epochs`` holds the rate
for each epoch as SwAV's does. On ImageNet the evaluation costs about ``eval.linear_eval_epochs``
forward passes of the encoder over the train split (100 epochs of inference, roughly a third of
as many training epochs).

Where the views come from:
  * an in-memory split (Fashion-MNIST, CIFAR): the crop and flip run on the device inside the
    compiled step (`ssljax.augment.ops`), at the images' own size; the test images are used
    as they are, as the other evaluations use them;
  * a streaming split (ImageNet): the host draws the crop box and resizes to
    ``data.image_size`` (`ssljax.data.streaming`'s pre-crop, with the crop scale above), the
    flip runs on the device; test images are resized so the shorter side is
    ``data.image_size / eval.linear_eval_test_crop`` (256 for 224 at the default 0.875) and
    centre-cropped to ``data.image_size``, the papers' ``Resize(256) + CenterCrop(224)``. On
    a mesh of several processes each host decodes only its own rows, of the training batches
    (the loader's sharding) and of the test split (`ssljax.eval.features.extract_features`).

The batches are a function of ``(seed, step)`` (`HostLoader` / `StreamingLoader` order), and the
flip and crop keys are folded from the step, so the classifier does not depend on the device or
host count. With a workdir, the head and its optimiser state are checkpointed every
``eval.linear_eval_checkpoint_every_steps`` steps under
``<workdir>/linear_eval/<settings>/checkpoints`` (``<settings>`` names the encoder step and a
hash of every setting that changes the result), and a rerun resumes from there bit-exactly; an
evaluation with other settings starts its own directory, and the finished one is kept (its
last checkpoint is the trained classifier).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ssljax import data
from ssljax.augment import ops
from ssljax.eval.features import extract_features

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "cosine_epochs", "steps")
_LOG_EVERY = 100  # steps between loss reads (each is a host sync)


@dataclasses.dataclass(frozen=True)
class LinearEvalSettings:
  """The ``eval.linear_eval_*`` keys (see `ssljax.config.default_config`)."""

  epochs: float = 100.0
  batch_size: int = 256
  lr: float = 0.3
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 1e-6
  schedule: str = "cosine"
  milestones: tuple[float, ...] = (60.0, 80.0)
  crop_scale: tuple[float, float] = (0.08, 1.0)
  test_crop: float = 0.875
  checkpoint_every_steps: int = 1000

  @classmethod
  def from_config(cls, ec: ml_collections.ConfigDict) -> LinearEvalSettings:
    return cls(epochs=float(ec.linear_eval_epochs), batch_size=int(ec.linear_eval_batch_size),
               lr=float(ec.linear_eval_lr), momentum=float(ec.linear_eval_momentum),
               nesterov=bool(ec.linear_eval_nesterov),
               weight_decay=float(ec.linear_eval_weight_decay),
               schedule=str(ec.linear_eval_schedule),
               milestones=tuple(float(m) for m in ec.linear_eval_milestones),
               crop_scale=tuple(float(s) for s in ec.linear_eval_crop_scale),
               test_crop=float(ec.linear_eval_test_crop),
               checkpoint_every_steps=int(ec.linear_eval_checkpoint_every_steps))

  def check(self, num_devices: int) -> None:
    """Raises ValueError naming the key and a valid value for a setting that cannot run."""
    key = "--config.eval.linear_eval_"
    if not self.epochs > 0:
      raise ValueError(f"eval.linear_eval_epochs = {self.epochs} must be > 0, e.g. "
                       f"{key}epochs=100")
    if self.batch_size < 1 or self.batch_size % num_devices:
      raise ValueError(f"eval.linear_eval_batch_size = {self.batch_size} must be a positive "
                       f"multiple of the {num_devices} devices, e.g. "
                       f"{key}batch_size={num_devices * max(1, 256 // num_devices)}")
    if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
      raise ValueError(f"eval.linear_eval_lr = {self.lr} must be > 0, _momentum = "
                       f"{self.momentum} in [0, 1) and _weight_decay = {self.weight_decay} "
                       f">= 0")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"eval.linear_eval_schedule = {self.schedule!r} is not one of "
                       f"{SCHEDULES}: 'cosine' decays to 0 every step, 'cosine_epochs' once "
                       f"per epoch (SwAV), 'steps' multiplies by 0.1 at each of "
                       f"eval.linear_eval_milestones (MoCo)")
    if self.nesterov and not self.momentum:
      raise ValueError("eval.linear_eval_nesterov = True needs eval.linear_eval_momentum > 0 "
                       "(as PyTorch's SGD); e.g. --config.eval.linear_eval_momentum=0.9")
    if self.schedule == "steps" and any(b <= a for a, b in zip(self.milestones,
                                                              self.milestones[1:])):
      raise ValueError(f"eval.linear_eval_milestones = {self.milestones} must be strictly "
                       f"increasing epochs, e.g. {key}milestones=\"(60, 80)\"")
    low, high = (self.crop_scale + (0.0, 0.0))[:2]
    if len(self.crop_scale) != 2 or not 0 < low <= high <= 1:
      raise ValueError(f"eval.linear_eval_crop_scale = {self.crop_scale} must be (min, max) "
                       f"area fractions with 0 < min <= max <= 1, e.g. "
                       f"{key}crop_scale=\"(0.08, 1.0)\"")
    if not 0 < self.test_crop <= 1:
      raise ValueError(f"eval.linear_eval_test_crop = {self.test_crop} must lie in (0, 1] "
                       f"(the centre crop's share of the resized test image; 0.875 is "
                       f"224 of 256)")
    if self.checkpoint_every_steps < 1:
      raise ValueError(f"eval.linear_eval_checkpoint_every_steps = "
                       f"{self.checkpoint_every_steps} must be >= 1")

  def describe(self) -> str:
    schedule = {"cosine": "cosine to 0",
                "cosine_epochs": "cosine to 0, stepped per epoch"}.get(
                    self.schedule,
                    "x0.1 at epochs " + ", ".join(f"{m:g}" for m in self.milestones))
    return (f"linear layer on the frozen encoder, SGD lr {self.lr:g} per 256 images "
            f"({schedule}), momentum {self.momentum:g}{' nesterov' if self.nesterov else ''}, "
            f"weight decay {self.weight_decay:g}, batch {self.batch_size}, "
            f"{self.epochs:g} epochs of random resized crops (area "
            f"{self.crop_scale[0]:g}-{self.crop_scale[1]:g}) + flips")


def lr_schedule(settings: LinearEvalSettings, steps_per_epoch: int,
                total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Learning rate per step: ``lr * batch / 256``, cosine-decayed to 0 or stepped by 0.1.

  ``cosine_epochs`` is PyTorch's ``CosineAnnealingLR(T_max=epochs)`` stepped after each epoch,
  as SwAV's ``eval_linear.py`` does: epoch ``e`` (from 0) runs at
  ``peak * (1 + cos(pi * e / epochs)) / 2``.
  """
  peak = settings.lr * settings.batch_size / 256.0
  if settings.schedule == "cosine":
    return optax.cosine_decay_schedule(peak, max(total_steps, 1))
  if settings.schedule == "cosine_epochs":
    def per_epoch(step):
      epoch = jnp.floor_divide(step, max(steps_per_epoch, 1)).astype(jnp.float32)
      return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / settings.epochs))
    return per_epoch
  boundaries: dict[int, float] = {}
  for m in settings.milestones:  # milestones that round to one step multiply, as MultiStepLR's
    step = int(round(m * steps_per_epoch))
    boundaries[step] = boundaries.get(step, 1.0) * 0.1
  return optax.piecewise_constant_schedule(peak, boundaries)


def _optimizer(settings: LinearEvalSettings, schedule) -> optax.GradientTransformation:
  # PyTorch's SGD: the decay joins the gradient before the momentum buffer (bias included).
  return optax.chain(optax.add_decayed_weights(settings.weight_decay),
                     optax.sgd(schedule, momentum=settings.momentum or None,
                               nesterov=settings.nesterov))


def _cross_entropy(head: dict[str, jax.Array], features: jax.Array,
                   labels: jax.Array) -> jax.Array:
  logits = features @ head["kernel"] + head["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _augment(key: jax.Array, images: jax.Array, *, crop_on_device: bool,
             crop_scale: tuple[float, float]) -> jax.Array:
  """uint8 ``[B, H, W, C]`` -> float views in [0, 1]: crop (if on the device) and flip."""
  x = images.astype(jnp.float32) / 255.0
  keys = jax.random.split(key, x.shape[0])

  def one(k, image):
    crop_key, flip_key = jax.random.split(k)
    if crop_on_device:
      image = ops.random_resized_crop(crop_key, image, size=image.shape[0], scale=crop_scale)
    return ops.horizontal_flip(flip_key, image)

  return jax.vmap(one)(keys, x)


def make_train_step(encode: Callable[[Any, jax.Array], jax.Array],
                    tx: optax.GradientTransformation, *, seed: int, crop_on_device: bool,
                    crop_scale: tuple[float, float], mesh=None) -> Callable[..., Any]:
  """``(head, opt_state, variables, images, labels, step) -> (head, opt_state, loss)``, jitted.

  The loss is the batch's cross-entropy before the update, or NaN when the updated head is not
  finite, so one check of the loss catches both.

  `encode` is the encoder's inference apply ``(variables, float images) -> [B, D]``; the views'
  keys are ``fold_in(PRNGKey(seed), step)`` split over the global batch, so a step's views do
  not depend on how the batch is sharded.
  """
  base = jax.random.PRNGKey(seed)

  def step_fn(head, opt_state, variables, images, labels, step):
    views = _augment(jax.random.fold_in(base, step), images, crop_on_device=crop_on_device,
                     crop_scale=crop_scale)
    features = jax.lax.stop_gradient(encode(variables, views)).astype(jnp.float32)
    loss, grads = jax.value_and_grad(_cross_entropy)(head, features, labels)
    updates, opt_state = tx.update(grads, opt_state, head)
    head = optax.apply_updates(head, updates)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(head)]))
    return head, opt_state, jnp.where(finite, loss, jnp.nan)

  if mesh is None:
    return jax.jit(step_fn)
  rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step_fn, in_shardings=(rep, rep, rep, batch, batch, rep),
                 out_shardings=(rep, rep, rep))


def _fingerprint(settings: LinearEvalSettings, encoder_step: int, config,
                 variables: Any, num_train: int) -> str:
  """``step<encoder step>-<hash>`` of everything that changes the trained head, and nothing
  else: the training settings (not the checkpoint cadence or the test crop), the seed, the data
  that feed the training views (not where they are stored or how many threads decode them),
  the train split's size and every array of the encoder variables (so re-estimated BatchNorm
  statistics, or another checkpoint, start their own directory)."""
  from ssljax.train.checkpoint import state_checksums

  train = dataclasses.asdict(settings)
  for key in ("checkpoint_every_steps", "test_crop"):
    del train[key]
  if settings.schedule != "steps":
    del train["milestones"]
  dc = config.data
  data_keys = {k: dc.get(k) for k in ("source", "name", "train_split", "image_size", "channels",
                                        "num_classes", "precrop_ratio")}
  text = json.dumps({"settings": train, "seed": config.seed, "data": data_keys,
                     "num_train": num_train, "encoder": state_checksums(variables)},
                    sort_keys=True, default=str)
  digest = hashlib.sha256(text.encode()).hexdigest()[:10]
  return f"step{encoder_step}-{digest}"


def _topk(features: np.ndarray, labels: np.ndarray, head: dict[str, np.ndarray],
          chunk: int = 4096) -> tuple[float, float]:
  """Top-1 and top-5 accuracy of ``features @ W + b`` (top-5 is top-1 with < 5 classes)."""
  hits1 = hits5 = 0
  kernel, bias = np.asarray(head["kernel"]), np.asarray(head["bias"])
  k = min(5, kernel.shape[1])
  for start in range(0, len(labels), chunk):
    logits = features[start:start + chunk] @ kernel + bias
    y = labels[start:start + chunk]
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    hits1 += int((logits.argmax(1) == y).sum())
    hits5 += int((top == y[:, None]).any(1).sum())
  return hits1 / len(labels), hits5 / len(labels)


def _test_images(test_source, image_size: int, test_crop: float):
  """(images, labels) of the whole test split; a stream's labels fill in as its images are read
  (`ssljax.eval.evaluate._StreamedSplit`, with the resize before the centre crop)."""
  if not isinstance(test_source, data.StreamingSource):
    return test_source.images, np.asarray(test_source.labels)
  from ssljax.eval.evaluate import _StreamedSplit  # deferred: evaluate imports this module

  split = _StreamedSplit(test_source, np.arange(len(test_source)),
                         resize_side=int(round(image_size / test_crop)))
  return split.images, split.labels


def _train_loader(train_source, settings: LinearEvalSettings, config, start_step: int,
                  end_step: int):
  batch, seed = settings.batch_size, config.seed + 3
  kwargs = dict(global_batch=batch, seed=seed, start_step=start_step,
                process_index=jax.process_index(), process_count=jax.process_count())
  if isinstance(train_source, data.StreamingSource):
    cropping = data.StreamingSource(
        train_source.records, image_size=train_source.image_size,
        channels=train_source.channels, scale=settings.crop_scale, ratio=train_source.ratio,
        num_classes=train_source.num_classes, eval_threads=train_source.eval_threads)
    dc = config.data
    return data.StreamingLoader(cropping, end_step=end_step,
                                workers=int(dc.get("stream_workers", 0)),
                                threads=int(dc.get("stream_threads", 2)),
                                prefetch=int(dc.get("prefetch", 2)), **kwargs)
  return data.HostLoader(train_source, **kwargs)


def linear_eval(config: ml_collections.ConfigDict, encode: Callable[[Any, jax.Array], jax.Array],
                variables: Any, mesh, *, train_source, test_source, workdir: str | None = None,
                encoder_step: int = 0) -> dict[str, Any]:
  """Trains and tests the linear classifier of the papers' protocol (module docstring).

  Args:
    config: the run's config (``eval.linear_eval_*``, ``data``, ``seed``).
    encode: the encoder's inference apply ``(variables, float images [B, H, W, C]) -> [B, D]``.
    variables: the encoder's variables (frozen), replicated over `mesh`.
    mesh: the ``('data',)`` mesh; every process must call this with the same arguments.
    train_source, test_source: labelled in-memory sources or streaming sources (whole splits).
    workdir: where the classifier is checkpointed and resumed from; None keeps nothing.
    encoder_step: the encoder checkpoint's step, part of the checkpoint directory's name.

  Returns:
    ``linear_eval/top1``, ``/top5`` (test split), ``/train_loss`` (mean of the last logged
    stretch), ``/steps``, ``/test_examples`` and ``/protocol``.

  Raises:
    ValueError: a setting that cannot run, a non-square in-memory image, a split smaller than
      one batch; FloatingPointError: a non-finite loss (the last checkpoint is kept).
  """
  from ssljax.data.pipeline import to_global_array
  from ssljax.train.checkpoint import Checkpointer

  settings = LinearEvalSettings.from_config(config.eval)
  settings.check(mesh.size)
  streamed = isinstance(train_source, data.StreamingSource)
  height, width = train_source.image_shape[:2] if streamed else train_source.images.shape[1:3]
  if height != width:
    raise ValueError(f"linear evaluation crops square views at the images' size, but the "
                     f"train images are {height}x{width}; resize them to a square "
                     f"(data.image_size)")
  if len(train_source) < settings.batch_size:
    raise ValueError(f"eval.linear_eval_batch_size = {settings.batch_size} exceeds the "
                     f"{len(train_source)} train images; lower it")
  num_classes = config.data.num_classes
  steps_per_epoch = len(train_source) // settings.batch_size
  total_steps = max(1, int(round(settings.epochs * steps_per_epoch)))
  schedule = lr_schedule(settings, steps_per_epoch, total_steps)
  tx = _optimizer(settings, schedule)

  rep = NamedSharding(mesh, P())
  features_dim = jax.eval_shape(
      encode, variables, jax.ShapeDtypeStruct((1, height, width, train_source.image_shape[2]
                                               if streamed else train_source.images.shape[3]),
                                              jnp.float32)).shape[1]
  head = {"kernel": jnp.zeros((features_dim, num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}
  head = jax.device_put(head, rep)
  opt_state = jax.device_put(tx.init(head), rep)
  variables = jax.device_put(variables, rep)

  ckpt, start_step, logged_loss = None, 0, float("nan")
  if workdir is not None:
    name = _fingerprint(settings, encoder_step, config, variables, len(train_source))
    ckpt = Checkpointer(f"{str(workdir).rstrip('/')}/linear_eval/{name}", max_to_keep=1)
    restored = ckpt.restore_latest_intact({"head": head, "opt_state": opt_state})
    if restored is not None:
      start_step, tree, meta = restored
      if meta.get("total_steps") != total_steps:
        ckpt.close()
        raise ValueError(f"the linear-evaluation checkpoint in {ckpt.directory} was written "
                         f"for {meta.get('total_steps')} steps, this evaluation has "
                         f"{total_steps}; move that directory aside to start again")
      head, opt_state = tree["head"], tree["opt_state"]
      logged_loss = float(meta.get("train_loss", float("nan")))
      log.info("linear evaluation: resumed from its checkpoint of step %d of %d in %s",
               start_step, total_steps, ckpt.directory)

  step_fn = make_train_step(encode, tx, seed=config.seed + 3, crop_on_device=not streamed,
                            crop_scale=settings.crop_scale, mesh=mesh)
  log.info("linear evaluation: %d steps (%d per epoch): %s", total_steps, steps_per_epoch,
           settings.describe())
  losses: list[jax.Array] = []
  try:
    if start_step < total_steps:
      loader = _train_loader(train_source, settings, config, start_step, total_steps)
      try:
        for step in range(start_step, total_steps):
          batch = next(loader)
          images = to_global_array(batch["image"], mesh, P("data"))
          labels = to_global_array(batch["label"], mesh, P("data"))
          head, opt_state, loss = step_fn(head, opt_state, variables, images, labels,
                                          jnp.int32(step))
          losses.append(loss)
          done = step + 1
          if done % _LOG_EVERY == 0 or done == total_steps or (
              ckpt is not None and done % settings.checkpoint_every_steps == 0):
            logged_loss = float(np.mean([float(v) for v in losses]))
            losses.clear()
            if not math.isfinite(logged_loss):
              saved = ckpt.all_steps() if ckpt is not None else []
              kept = (f"; its last finite checkpoint, step {saved[-1]} in {ckpt.directory}, "
                      f"is kept (a rerun with these settings resumes there and meets the same "
                      f"loss)" if saved else "")
              raise FloatingPointError(
                  f"linear evaluation: the loss or the classifier is not finite by step "
                  f"{done}{kept}. Lower --config.eval.linear_eval_lr (now {settings.lr:g} per "
                  f"256 images), which starts a new evaluation.")
            log.info("linear evaluation step %d/%d: loss %.4f", done, total_steps, logged_loss)
            if ckpt is not None and (done % settings.checkpoint_every_steps == 0
                                     or done == total_steps):
              ckpt.save(done, {"head": head, "opt_state": opt_state},
                        {"position": done, "total_steps": total_steps,
                         "train_loss": logged_loss})
      finally:
        loader.close()
  except BaseException:
    if ckpt is not None:  # its own error must not hide the one being raised
      try:
        ckpt.wait()
        ckpt.close()
      except Exception as e:  # noqa: BLE001
        log.warning("linear evaluation: closing its checkpointer failed too: %s", e)
    raise
  if ckpt is not None:
    ckpt.wait()
    ckpt.close()

  test_images, test_labels = _test_images(test_source, height, settings.test_crop)
  from ssljax.eval.evaluate import eval_batch_size  # deferred: evaluate imports this module
  features = extract_features(encode, variables, test_images,
                              batch_size=eval_batch_size(config, mesh), mesh=mesh)
  if (test_labels < 0).any():
    raise ValueError(f"linear evaluation: {(test_labels < 0).sum()} test images have no label")
  top1, top5 = _topk(features, test_labels, jax.device_get(head))
  protocol = settings.describe()
  if streamed:
    protocol += (f"; test: shorter side {int(round(height / settings.test_crop))}, centre "
                 f"{height} crop")
  log.info("linear evaluation top-1 %.4f", top1)
  return {"linear_eval/top1": top1, "linear_eval/top5": top5,
          "linear_eval/train_loss": logged_loss, "linear_eval/steps": total_steps,
          "linear_eval/test_examples": int(len(test_labels)), "linear_eval/protocol": protocol}


__all__ = ["LinearEvalSettings", "SCHEDULES", "linear_eval", "lr_schedule", "make_train_step"]
