"""Methods are values: a small record of pure functions, plus a registry by config name.

A `Method` says how to build and initialise the networks, how to compute the loss from a
batch of augmented views, and how to update the non-gradient state after the optimiser step.
Everything a method learns or carries lives in two pytrees that the train state holds:

  params        what the optimiser trains (``{'encoder': ..., 'projector': ..., ...}``);
  method_state  everything else: BatchNorm statistics under ``'batch_stats'`` (one entry per
                module), EMA teachers, queues, memory banks.

Nothing is mutated in place: every function returns new pytrees. An add-on (CLD, UOTA,
MetaMask, ...) is a function from a `Method` to a `Method` that wraps some of these functions
and adds its own entries to ``params``/``method_state`` (see `ssljax.methods.wrappers`).

The per-device train step (``ssljax.train.step``) calls, in order:
  1. ``loss(params, method_state, batch, key=..., step=..., axis_name=...)``
     -> ``(loss, (metrics, new_method_state))``, differentiated w.r.t. ``params``;
  2. the optimiser update of ``params`` (gradients averaged over ``axis_name``);
  3. ``post_update(new_params, new_method_state, step=...)`` -> method_state (EMA updates).

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
    post_update: ``(params, method_state, *, step) -> method_state`` after the optimiser step.
    eval_variables: ``(params, method_state) -> variables`` for ``encoder.apply`` in
      inference mode (which weights to evaluate: online by default, a teacher for some methods).
    num_views: views the method needs from the augmentation policy (at least).
  """

  name: str
  encoder: nn.Module
  init: Callable[[jax.Array, tuple[jax.Array, ...]], tuple[PyTree, PyTree]]
  loss: LossFn
  post_update: Callable[..., PyTree]
  eval_variables: Callable[[PyTree, PyTree], PyTree]
  num_views: int = 2


def keep_state(params: PyTree, method_state: PyTree, *, step: jax.Array) -> PyTree:
  """The `post_update` of methods without EMA or other post-step state."""
  del params, step
  return method_state


def online_encoder_variables(params: PyTree, method_state: PyTree) -> PyTree:
  """The `eval_variables` of methods that evaluate the trained (online) encoder."""
  return {"params": params["encoder"], "batch_stats": method_state["batch_stats"]["encoder"]}


MethodBuilder = Callable[[ml_collections.ConfigDict, str | None], Method]
_REGISTRY: dict[str, MethodBuilder] = {}


def register(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
  """Registers ``builder(config, axis_name) -> Method`` under `name`."""

  def decorator(builder: MethodBuilder) -> MethodBuilder:
    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = builder
    return builder

  return decorator


def registered_methods() -> list[str]:
  return sorted(_REGISTRY)


def build_method(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> Method:
  """Builds ``config.method.name`` (BN statistics synchronised over `axis_name` if set)."""
  name = config.method.name
  if name not in _REGISTRY:
    raise ValueError(f"method.name must be one of {registered_methods()}, got {name!r}")
  return _REGISTRY[name](config, axis_name)


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
