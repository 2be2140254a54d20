"""Methods are values: a small record of pure functions, plus a registry by config name.

A `Method` says how to build and initialise the networks, how to compute the loss from a
batch of augmented views, and how to update the non-gradient state after the optimiser step.
Everything a method learns or carries lives in two pytrees that the train state holds:

  params        what the optimiser trains (``{'encoder': ..., 'projector': ..., ...}``);
  method_state  everything else: BatchNorm statistics under ``'batch_stats'`` (one entry per
                module), EMA teachers, queues, memory banks.

Nothing is mutated in place: every function returns new pytrees. An add-on (CLD, UOTA,
MetaMask, ...) is a function from a `Method` to a `Method` that wraps some of these functions
and adds its own entries to ``params``/``method_state`` (``dataclasses.replace(method,
loss=...)``, or `ssljax.methods.addons.add_params_entry` for an add-on with parameters of its
own; ``tests/methods/test_addons.py`` shows a learned loss-weighting add-on).

Loss values under ``axis_name``: each device returns a value whose mean over devices is the
loss of the global batch, and whose per-device gradients average (``pmean``) to the global
gradient: a share of it for losses that gather (NT-Xent), the whole value for losses built
on ``psum``'ed statistics (Barlow Twins). An add-on that transforms the base loss must be
affine in it to keep that property.

The per-device train step (``ssljax.train.step``) calls, in order:
  1. ``loss(params, method_state, batch, key=..., step=..., axis_name=...)``
     -> ``(loss, (metrics, new_method_state))``, differentiated w.r.t. ``params``;
  2. the optimiser update of ``params`` (gradients averaged over ``axis_name``), with the
     leaves that ``update_mask(params, step)`` marks False left unchanged (frozen layers);
  3. ``post_update(new_params, new_method_state, step=...)`` -> ``(params, method_state)``
     (EMA teachers, re-normalised prototypes).

Methods whose schedules are defined in epochs or over the whole run (EMA momentum, prototype
freezing, teacher temperature warm-up) or whose state is sized by the dataset (a memory bank)
read them from the `RunInfo` the builder receives.

``batch`` is a dict with ``views`` (tuple of float32 ``[n, h, w, c]`` arrays in [0, 1], one per
view, this device's rows), ``index`` (int32 ``[n]``, dataset index of each row) and ``label``
(int32 ``[n]``, -1 when unknown; methods must not use it for training).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import ml_collections

PyTree = Any
Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, tuple[Metrics, PyTree]]


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a method may need to know about the run it is built for.

  Attributes:
    steps_per_epoch: optimiser steps per epoch.
    total_steps: optimiser steps of the whole run.
    num_examples: training-set size (memory banks are sized by it); None if unknown.
  """

  steps_per_epoch: int
  total_steps: int
  num_examples: int | None = None

  @classmethod
  def nominal(cls, config: ml_collections.ConfigDict) -> "RunInfo":
    """A stand-in for building a method without a dataset (shape checks, benchmarks).

    Assumes 1000 steps per epoch and an unknown dataset size.
    """
    steps = config.train.num_steps or max(1, int(round(config.train.epochs * 1000)))
    return cls(steps_per_epoch=1000, total_steps=steps, num_examples=None)


class LossFn(Protocol):

  def __call__(self, params: PyTree, method_state: PyTree, batch: dict[str, Any], *,
               key: jax.Array, step: jax.Array, axis_name: str | None) -> LossOutput:
    ...


@dataclasses.dataclass(frozen=True)
class Method:
  """A self-supervised method as a record of pure functions.

  Attributes:
    name: registry name.
    encoder: the backbone module; evaluation applies it in inference mode.
    init: ``(key, views) -> (params, method_state)`` from example views (shapes only matter).
    loss: see `LossFn`.
    post_update: ``(params, method_state, *, step) -> (params, method_state)`` after the
      optimiser step (EMA teachers, queues' bookkeeping, re-normalised prototypes).
    eval_variables: ``(params, method_state) -> variables`` for ``encoder.apply`` in
      inference mode (which weights to evaluate: online by default, a teacher for some methods).
    num_views: views the method needs from the augmentation policy (at least).
    update_mask: optional ``(params, step) -> pytree of bool scalars`` (the structure of
      ``params``, or a prefix of it); False leaves get neither a gradient nor an update at
      that step (SwAV's frozen prototypes, DINO's frozen last layer). None: all trained.
  """

  name: str
  encoder: nn.Module
  init: Callable[[jax.Array, tuple[jax.Array, ...]], tuple[PyTree, PyTree]]
  loss: LossFn
  post_update: Callable[..., tuple[PyTree, PyTree]]
  eval_variables: Callable[[PyTree, PyTree], PyTree]
  num_views: int = 2
  update_mask: Callable[[PyTree, jax.Array], PyTree] | None = None


def keep_state(params: PyTree, method_state: PyTree, *,
               step: jax.Array) -> tuple[PyTree, PyTree]:
  """The `post_update` of methods without EMA or other post-step state."""
  del step
  return params, method_state


def online_encoder_variables(params: PyTree, method_state: PyTree) -> PyTree:
  """The `eval_variables` of methods that evaluate the trained (online) encoder."""
  return {"params": params["encoder"], "batch_stats": method_state["batch_stats"]["encoder"]}


MethodBuilder = Callable[[ml_collections.ConfigDict, str | None, RunInfo], Method]
_REGISTRY: dict[str, MethodBuilder] = {}


def register(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
  """Registers ``builder(config, axis_name, run) -> Method`` under `name`."""

  def decorator(builder: MethodBuilder) -> MethodBuilder:
    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder

  return decorator


def registered_methods() -> list[str]:
  return sorted(_REGISTRY)


def build_method(config: ml_collections.ConfigDict, *, axis_name: str | None = None,
                 run: RunInfo | None = None) -> Method:
  """Builds ``config.method.name`` (BN statistics synchronised over `axis_name` if set).

  `run` gives the run's length and dataset size; without it `RunInfo.nominal` is used.
  """
  name = config.method.name
  if name not in _REGISTRY:
    raise ValueError(f"method.name must be one of {registered_methods()}, got {name!r}")
  return _REGISTRY[name](config, axis_name, run or RunInfo.nominal(config))


def apply_module(module: nn.Module, params: PyTree, batch_stats: PyTree, x: jax.Array,
                 *, train: bool = True) -> tuple[jax.Array, PyTree]:
  """Applies a Linen module with BatchNorm; returns (output, updated batch_stats)."""
  variables = {"params": params, "batch_stats": batch_stats}
  if not train:
    return module.apply(variables, x, train=False), batch_stats
  out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
  return out, updates["batch_stats"]


def init_module(module: nn.Module, key: jax.Array, x: jax.Array) -> tuple[PyTree, PyTree]:
  """Initialises a Linen module; returns (params, batch_stats) (empty dict if it has no BN)."""
  variables = module.init(key, x, train=False)
  return variables["params"], variables.get("batch_stats", {})
