"""The papers' linear evaluation (`ssljax.eval.linear_eval`, issue 20): its SGD equals PyTorch's
SGD written out by hand, 8 devices equal 1, the schedules, a classifier that learns, a resume
after an interruption that is bit-exact, the streamed test views and the errors."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from ssljax import data
from ssljax.config import default_config
from ssljax.data.sources import resize_centre_crop
from ssljax.eval import linear_eval as le
from ssljax.train.checkpoint import Checkpointer

from tests.util import write_tiny_dataset

SIZE, CLASSES = 12, 4


def _project(variables, x):
  """A stand-in encoder: every pixel's channels through a fixed matrix, then flattened."""
  return (x @ variables["w"]).reshape(x.shape[0], -1)


def _mesh(n: int) -> Mesh:
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def _settings(**overrides) -> le.LinearEvalSettings:
  return le.LinearEvalSettings(**{"epochs": 1.0, "batch_size": 16, "lr": 0.5,
                                  "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3,
                                  "checkpoint_every_steps": 4, **overrides})


def _config(directory: str, **eval_overrides):
  os.makedirs(directory, exist_ok=True)
  write_tiny_dataset(directory, num_train=64, num_test=32, size=SIZE, channels=1,
                     num_classes=CLASSES)
  c = default_config("simclr")
  c.data.source, c.data.name, c.data.data_dir = "arrays", "tiny", directory
  c.data.image_size, c.data.channels, c.data.num_classes = SIZE, 1, CLASSES
  c.eval.batch_size = 16
  c.eval.update({"linear_eval_epochs": 6.0, "linear_eval_batch_size": 16,
                 "linear_eval_lr": 0.5, "linear_eval_checkpoint_every_steps": 4,
                 **eval_overrides})
  return c


@pytest.mark.parametrize("nesterov", [True, False])
def test_a_step_is_pytorch_sgd_with_momentum_and_decay_on_the_cross_entropy(nesterov):
  rng = np.random.default_rng(0)
  # Left-right symmetric images and a full-image crop: the views are the images themselves.
  half = rng.integers(0, 256, (8, 4, 2, 1), dtype=np.uint8)
  images = np.concatenate([half, half[:, :, ::-1]], axis=2)
  labels = rng.integers(0, 3, 8).astype(np.int32)
  variables = {"w": rng.normal(size=(1, 2)).astype(np.float32)}
  s = _settings(lr=0.4, batch_size=8, crop_scale=(1.0, 1.0), nesterov=nesterov)
  schedule = le.lr_schedule(s, steps_per_epoch=10, total_steps=3)
  tx = le._optimizer(s, schedule)
  step = le.make_train_step(_project, tx, seed=0, crop_on_device=True, crop_scale=(1.0, 1.0))
  head = {"kernel": jnp.zeros((16 * 2, 3)), "bias": jnp.zeros((3,))}
  opt_state = tx.init(head)

  f = (images.astype(np.float64) / 255.0 @ variables["w"]).reshape(8, -1)
  w, b = np.zeros((32, 3)), np.zeros(3)
  buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
  peak = 0.4 * 8 / 256
  for t in range(3):
    head, opt_state, loss = step(head, opt_state, variables, images, labels, jnp.int32(t))
    logits = f @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected_loss = -np.mean(np.log(p[np.arange(8), labels]))
    p[np.arange(8), labels] -= 1
    grads = [f.T @ p / 8 + 1e-3 * w, p.mean(0) + 1e-3 * b]  # torch: decay joins the gradient
    lr = peak * 0.5 * (1 + np.cos(np.pi * t / 3))
    new = []
    for param, grad, buf in ((w, grads[0], buf_w), (b, grads[1], buf_b)):
      buf *= 0.9
      buf += grad
      new.append(param - lr * ((grad + 0.9 * buf) if nesterov else buf))
    w, b = new
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(head["kernel"]), w, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(head["bias"]), b, rtol=1e-4, atol=1e-7)


def test_eight_devices_give_the_one_device_classifier(num_devices):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (16, SIZE, SIZE, 1), dtype=np.uint8)
  labels = rng.integers(0, CLASSES, 16).astype(np.int32)
  variables = {"w": rng.normal(size=(1, 3)).astype(np.float32)}
  s = _settings(crop_scale=(0.2, 1.0))
  heads = []
  for n in (1, num_devices):
    mesh = _mesh(n)
    tx = le._optimizer(s, le.lr_schedule(s, 4, 4))
    step = le.make_train_step(_project, tx, seed=5, crop_on_device=True,
                              crop_scale=s.crop_scale, mesh=mesh)
    head = {"kernel": jnp.zeros((SIZE * SIZE * 3, CLASSES)), "bias": jnp.zeros((CLASSES,))}
    opt_state = tx.init(head)
    batch = NamedSharding(mesh, P("data"))
    for t in range(3):
      head, opt_state, _ = step(head, opt_state, variables, jax.device_put(images, batch),
                                jax.device_put(labels, batch), jnp.int32(t))
    heads.append(jax.device_get(head))
  assert np.abs(heads[0]["kernel"]).max() > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), *heads)


def test_the_schedules():
  cosine = le.lr_schedule(_settings(lr=0.3, batch_size=512), steps_per_epoch=10,
                          total_steps=100)
  assert float(cosine(0)) == pytest.approx(0.6)  # 0.3 per 256 images
  assert float(cosine(50)) == pytest.approx(0.3, rel=1e-5)
  assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
  steps = le.lr_schedule(_settings(lr=30.0, batch_size=256, schedule="steps",
                                   milestones=(6.0, 8.0)), steps_per_epoch=10, total_steps=100)
  assert [float(steps(t)) for t in (0, 59, 60, 79, 80, 99)] == pytest.approx(
      [30.0, 30.0, 3.0, 3.0, 0.3, 0.3])
  # SwAV's CosineAnnealingLR(T_max=3) stepped per epoch: (1 + cos(pi e / 3)) / 2 = 1, 3/4, 1/4.
  per_epoch = le.lr_schedule(_settings(lr=0.3, batch_size=256, schedule="cosine_epochs",
                                       epochs=3.0), steps_per_epoch=4, total_steps=12)
  assert [float(per_epoch(t)) for t in range(12)] == pytest.approx(
      [0.3] * 4 + [0.225] * 4 + [0.075] * 4, rel=1e-6)


class _Preempted(Exception):
  pass


def _interrupt_after(batches: int, monkeypatch):
  """Makes the next linear_eval's loader fail after `batches` batches (a preemption)."""
  real = le._train_loader

  def loader(*args, **kwargs):
    inner = real(*args, **kwargs)

    class Failing:
      served = 0

      def __next__(self):
        if Failing.served == batches:
          raise _Preempted("preempted")
        Failing.served += 1
        return next(inner)

      def close(self):
        inner.close()

    return Failing()

  monkeypatch.setattr(le, "_train_loader", loader)


def test_it_learns_and_resumes_bit_exactly(tmp_path, monkeypatch):
  c = _config(str(tmp_path / "data"))
  train, test = data.build_source(c.data, "train"), data.build_source(c.data, "test")
  variables = {"w": np.ones((1, 1), np.float32)}  # the raw pixels
  mesh = _mesh(2)
  kwargs = dict(train_source=train, test_source=test, encoder_step=7)

  whole = le.linear_eval(c, _project, variables, mesh, workdir=str(tmp_path / "a"), **kwargs)
  assert whole["linear_eval/steps"] == 24  # 6 epochs of 64 // 16
  assert whole["linear_eval/test_examples"] == 32
  # Blobs whose position is the class, through crops of 8-100% and flips: well above chance.
  assert whole["linear_eval/top1"] >= 0.6 and whole["linear_eval/train_loss"] < np.log(4)
  assert whole["linear_eval/top5"] == 1.0  # four classes
  assert "random resized crops (area 0.08-1)" in whole["linear_eval/protocol"]

  _interrupt_after(10, monkeypatch)  # checkpoints at 4 and 8, then the interruption
  with pytest.raises(_Preempted):
    le.linear_eval(c, _project, variables, mesh, workdir=str(tmp_path / "b"), **kwargs)
  [run] = os.listdir(tmp_path / "b" / "linear_eval")
  assert run.startswith("step7-")
  assert Checkpointer(str(tmp_path / "b" / "linear_eval" / run)).all_steps() == [8]
  monkeypatch.undo()
  resumed = le.linear_eval(c, _project, variables, mesh, workdir=str(tmp_path / "b"), **kwargs)
  assert resumed == whole

  def final_head(root):
    [name] = os.listdir(root / "linear_eval")
    head = {"kernel": jnp.zeros((SIZE * SIZE, CLASSES)), "bias": jnp.zeros(CLASSES)}
    s = le.LinearEvalSettings.from_config(c.eval)
    like = {"head": head, "opt_state": le._optimizer(s, le.lr_schedule(s, 4, 24)).init(head)}
    tree, meta = Checkpointer(str(root / "linear_eval" / name)).restore(24, like)
    assert meta["position"] == 24
    return jax.device_get(tree["head"])

  jax.tree.map(np.testing.assert_array_equal, final_head(tmp_path / "a"),
               final_head(tmp_path / "b"))
  # Rerunning a finished evaluation trains nothing and reports the same numbers.
  assert le.linear_eval(c, _project, variables, mesh, workdir=str(tmp_path / "a"),
                        **kwargs) == whole
  # The checkpoint cadence and the test crop do not change the head: same directory.
  c.eval.linear_eval_checkpoint_every_steps, c.eval.linear_eval_test_crop = 6, 0.5
  assert le.linear_eval(c, _project, variables, mesh, workdir=str(tmp_path / "a"),
                        **kwargs) == whole
  assert len(os.listdir(tmp_path / "a" / "linear_eval")) == 1
  # Other training settings, or other encoder variables (e.g. BN statistics), start their own.
  c.eval.linear_eval_lr = 0.25
  le.linear_eval(c, _project, variables, mesh, workdir=str(tmp_path / "a"), **kwargs)
  other = {"w": np.full((1, 1), 0.5, np.float32)}
  le.linear_eval(c, _project, other, mesh, workdir=str(tmp_path / "a"), **kwargs)
  assert len(os.listdir(tmp_path / "a" / "linear_eval")) == 3


def test_a_non_finite_step_keeps_the_last_finite_checkpoint(tmp_path):
  from ssljax.data.pipeline import global_batch_indices
  from ssljax.data.sources import ArraySource

  c = _config(str(tmp_path / "data"))
  train, test = data.build_source(c.data, "train"), data.build_source(c.data, "test")
  # 70 images in batches of 16: each epoch drops 6, so an image dropped in epoch 0 first
  # appears in epoch 1 (steps 4-7), after the checkpoint of step 4. Made black, it makes the
  # stand-in encoder below divide by zero: that batch's loss, and the head after it, are NaN.
  images = np.concatenate([train.images, train.images[:6]]).clip(1, 255)
  labels = np.concatenate([train.labels, train.labels[:6]])
  dropped = np.random.default_rng((c.seed + 3, 0)).permutation(70)[64:]
  epoch1 = np.concatenate([global_batch_indices(70, 16, c.seed + 3, s) for s in range(4, 8)])
  black = int(np.intersect1d(dropped, epoch1)[0])
  assert black not in np.concatenate([global_batch_indices(70, 16, c.seed + 3, s)
                                      for s in range(4)])
  images[black] = 0
  poisoned = ArraySource(images, labels)
  encode = lambda v, x: x.reshape(x.shape[0], -1) / x.sum((1, 2, 3))[:, None]
  with pytest.raises(FloatingPointError) as error:
    le.linear_eval(c, encode, {}, _mesh(1), train_source=poisoned, test_source=test,
                   workdir=str(tmp_path / "w"))
  assert "not finite by step 8" in str(error.value)
  assert "last finite checkpoint, step 4" in str(error.value)
  assert "Lower --config.eval.linear_eval_lr" in str(error.value)
  [run] = os.listdir(tmp_path / "w" / "linear_eval")
  assert Checkpointer(str(tmp_path / "w" / "linear_eval" / run)).all_steps() == [4]


def test_a_non_finite_loss_stops_with_the_fix(tmp_path):
  c = _config(str(tmp_path / "data"), linear_eval_epochs=2.0)
  train, test = data.build_source(c.data, "train"), data.build_source(c.data, "test")
  with pytest.raises(FloatingPointError, match="Lower --config.eval.linear_eval_lr"):
    le.linear_eval(c, lambda v, x: _project(v, x) * jnp.inf, {"w": np.ones((1, 1), np.float32)},
                   _mesh(1), train_source=train, test_source=test)


@pytest.mark.parametrize("overrides, message", [
    ({"schedule": "linear"}, "is not one of"),
    ({"batch_size": 12}, "multiple of the 8 devices"),
    ({"crop_scale": (0.5, 0.2)}, "area fractions"),
    ({"test_crop": 1.5}, "must lie in \\(0, 1\\]"),
    ({"schedule": "steps", "milestones": (8.0, 6.0)}, "increasing"),
    ({"epochs": 0.0}, "must be > 0"),
    ({"lr": 0.0}, "_lr = 0.0 must be > 0"),
    ({"nesterov": True, "momentum": 0.0}, "needs eval.linear_eval_momentum > 0"),
    ({"schedule": "steps", "milestones": (6.0, 6.0)}, "strictly increasing"),
])
def test_settings_that_cannot_run_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    _settings(**overrides).check(8)


def test_streamed_test_views_are_resized_then_centre_cropped(tmp_path):
  rng = np.random.default_rng(3)
  for c in range(2):
    (tmp_path / "test" / f"n{c}").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(
        tmp_path / "test" / f"n{c}" / "0.png")
  cfg = default_config("simclr")
  cfg.data.source, cfg.data.data_dir, cfg.data.image_size = "folder_stream", str(tmp_path), 16
  cfg.data.channels, cfg.data.num_classes = 3, 2
  source = data.build_source(cfg.data, "test")
  images, labels = le._test_images(source, 16, 0.8)  # shorter side 20, centre 16
  got = images.rows(0, 2)
  for i, path in enumerate(sorted(tmp_path.glob("test/*/0.png"))):
    with Image.open(path) as image:
      expected = resize_centre_crop(image, 16, 3, resize_side=20)
    np.testing.assert_array_equal(got[i], expected)
    assert not np.array_equal(expected, resize_centre_crop(Image.open(path), 16, 3))
  np.testing.assert_array_equal(labels, [0, 1])


def test_a_bad_setting_fails_before_pretraining():
  from ssljax.train.validate import ConfigError, validate_config

  c = default_config("simclr")
  c.eval.linear_eval_schedule = "linear"
  validate_config(c)  # off: not checked
  c.eval.linear_eval = True
  with pytest.raises(ConfigError,
                     match="(?s)nothing was written.*linear_eval_schedule = 'linear'"):
    validate_config(c)
