"""Methods are values: a record of pure functions in stages, plus registries by config name.

A `Method` says how to build and initialise the networks and how one batch of augmented views
becomes a loss, in stages that an add-on can wrap one at a time:

  views --features--> backbone features per view     ``[n, F]`` each (train or inference mode)
        --embed-----> named embeddings per view       ``{'projection': (z_1, ..., z_V), ...}``
        --objective-> `Objective`: the scalar loss, its per-(view, image) terms ``[V, n]``
                      where the objective decomposes, metrics, and the new method state.

`Method.loss` is the composition of the three stages and is what the train step
differentiates. Everything a method learns or carries lives in two pytrees that the train
state holds:

  params        what the optimiser trains (``{'encoder': ..., 'projector': ..., ...}``);
  method_state  everything else: BatchNorm statistics under ``'batch_stats'`` (one entry per
                module), EMA teachers, queues, memory banks.

Nothing is mutated in place: every function returns new pytrees.

Stages (the signatures add-ons rely on):

  features(params, method_state, views, *, train) -> (features, method_state)
      ``views``: the tuple of ``[n, h, w, c]`` views of the batch. ``features``: a tuple of
      ``[n, F]`` backbone outputs, one per view the method's online encoder sees (every view
      unless the method's docstring says otherwise). ``train=False`` uses the running BN
      statistics and leaves them unchanged (evaluation, analysis).
  embed(params, method_state, features, views, *, step) -> (embeddings, method_state)
      Training mode. ``embeddings`` maps names (``'projection'``, ``'prediction'``,
      ``'target'``, ``'query'``, ``'key'``, ...) to tuples of ``[n, d]`` arrays, one per view
      that has one. Target or key networks run here (they read ``views``).
  objective(params, method_state, outputs, batch, *, key, step, axis_name) -> Objective
      ``outputs`` is `Outputs` (features and embeddings). ``Objective.terms()`` is ``[V, n]``
      (V = the number of views in the batch; zero rows for views that are never a predicted
      side) with ``value == sum_v mean_i terms[v, i]`` up to float rounding; ``terms`` is None
      for an objective that does not decompose (Barlow Twins' batch statistics), which
      ``Method.decomposes = False`` declares.
  head_layers(params, method_state, features) -> OrderedDict {name: [n, d]}
      Inference mode (running BN statistics): the output of every layer of every head, in
      order (an ``OrderedDict``, which keeps its order through ``jit``; a plain dict would
      come back sorted), for evaluation and the geometry analysis.

Around the stages:

  init(key, views) -> (params, method_state)
  post_update(params, method_state, *, step) -> (params, method_state)
      after the optimiser step (EMA teachers, re-normalised prototypes).
  eval_variables(params, method_state) -> variables for ``encoder.apply`` in inference mode.
  update_mask(params, step) -> prefix tree of bool scalars: False leaves get neither a
      gradient nor an update at that step (frozen layers). None: all trained.
  update: None (the train step's default body: one ``value_and_grad`` of `Method.loss`, the
      gradient ``pmean``, one optimiser update, `post_update`), or a custom step body, see
      ``ssljax.train.step.UpdateFn`` (MetaMask's meta-step).
  param_groups: per top-level ``params`` entry, a `ParamGroup` (its own optimiser settings);
      entries not named use ``config.optim``.

An add-on (CLD, UOTA, MetaMask, ...) is a function from a `Method` to a `Method` that wraps
some stages (``dataclasses.replace(method, objective=...)``) and may add its own entries to
``params`` (`ssljax.methods.addons.add_params_entry`). Add-ons are registered by name with
`register_addon` and applied in the order ``config.method.addons`` lists them.

Loss values under ``axis_name``: each device returns a value whose mean over devices is the
loss of the global batch, and whose per-device gradients average (``pmean``) to the global
gradient: a share of it for losses that gather (NT-Xent), the whole value for losses built on
``psum``'ed statistics (Barlow Twins). An add-on that transforms the base loss must be affine in
it to keep that property (weighting the per-(view, image) terms is). This holds when the
per-device step runs under ``shard_map(check_vma=False)`` or ``pmap``, which is how
``ssljax.train.step`` runs it; see ``ssljax.losses`` for why ``check_vma=True`` differs.

Methods whose schedules are defined in epochs or over the whole run (EMA momentum, prototype
freezing, teacher temperature warm-up) or whose state is sized by the dataset (a memory bank)
read them from the `RunInfo` the builder receives.

``batch`` is a dict with ``views`` (tuple of float32 ``[n, h, w, c]`` arrays in [0, 1], one per
view, this device's rows), ``index`` (int32 ``[n]``, dataset index of each row) and ``label``
(int32 ``[n]``, -1 when unknown; methods must not use it for training).

Config: each method and add-on registers its own section, ``config.method.<name>``, with its
defaults (``register(name, config=...)``); ``ssljax.config.default_config`` assembles only the
sections a run uses.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

PyTree = Any
Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, tuple[Metrics, PyTree]]
Embeddings = dict[str, tuple[jax.Array, ...]]


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a method may need to know about the run it is built for.

  Attributes:
    steps_per_epoch: optimiser steps per epoch.
    total_steps: optimiser steps of the whole run.
    num_examples: training-set size (memory banks are sized by it); None if unknown.
    data_devices: devices of the data axis the train step runs on (per-device batch checks);
      None when the method is built for anything else (evaluation, export, analysis), whose
      machine may have another device count than the training run's.
  """

  steps_per_epoch: int
  total_steps: int
  num_examples: int | None = None
  data_devices: int | None = None

  @classmethod
  def nominal(cls, config: ml_collections.ConfigDict) -> "RunInfo":
    """A stand-in for building a method without a dataset (shape checks, benchmarks).

    Assumes 1000 steps per epoch and an unknown dataset size.
    """
    steps = config.train.num_steps or max(1, int(round(config.train.epochs * 1000)))
    return cls(steps_per_epoch=1000, total_steps=steps, num_examples=None)


class Outputs(NamedTuple):
  """What the objective receives: the features and embeddings stages' results."""

  features: tuple[jax.Array, ...]
  embeddings: Embeddings


class Objective(NamedTuple):
  """The objective stage's result.

  Attributes:
    value: scalar float32 loss (this device's share, see the module docstring).
    terms: a function of no arguments returning the ``[V, n]`` per-(view, image) terms with
      ``value = sum_v mean_i terms[v, i]``, or None when the objective does not decompose.
      A function, so that the terms are traced only by an add-on that uses them and the
      default step compiles exactly the objective's value.
    metrics: scalars to log (averaged over devices by the step).
    method_state: the state after this step's forward passes (BN statistics, queues, ...).
  """

  value: jax.Array
  terms: Callable[[], jax.Array] | None
  metrics: Metrics
  method_state: PyTree


def reduce_terms(terms: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """``sum_v mean_i w[v, i] * terms[v, i]`` (w = 1 without `weights`): an objective's value.

  A weighting add-on passes weights with mean 1 over the (global) batch to keep the loss's
  scale; the weights are constants (stop-gradient).
  """
  terms = terms.astype(jnp.float32)
  if weights is not None:
    if weights.shape != terms.shape:
      raise ValueError(f"weights of shape {weights.shape} do not match the objective's "
                       f"per-(view, image) terms {terms.shape}")
    terms = jax.lax.stop_gradient(weights).astype(jnp.float32) * terms
  return jnp.sum(jnp.mean(terms, axis=1))


@dataclasses.dataclass(frozen=True)
class ParamGroup:
  """Optimiser settings for one top-level ``params`` entry (``optax.multi_transform`` label).

  Every field left as None keeps the value of ``config.optim``.

  Attributes:
    optimizer: 'sgd', 'lars', 'adam' or 'adamw' (e.g. 'sgd' for an entry that must not get
      LARS's trust ratio).
    lr_scale: multiplies the run's learning-rate schedule for this entry.
    weight_decay: this entry's weight decay.
    momentum: SGD/LARS momentum of this entry.
    clip_value: > 0: element-wise gradient clipping to [-clip_value, clip_value] before the
      optimiser (PyTorch's ``clip_grad_value_``), for this entry only.
  """

  optimizer: str | None = None
  lr_scale: float = 1.0
  weight_decay: float | None = None
  momentum: float | None = None
  clip_value: float | None = None


FeaturesFn = Callable[..., tuple[tuple[jax.Array, ...], PyTree]]
EmbedFn = Callable[..., tuple[Embeddings, PyTree]]
ObjectiveFn = Callable[..., Objective]
HeadLayersFn = Callable[[PyTree, PyTree, tuple[jax.Array, ...]], collections.OrderedDict]


@dataclasses.dataclass(frozen=True)
class Method:
  """A self-supervised method as a record of pure functions (see the module docstring).

  Attributes:
    name: registry name (``'<base>+<add-on>'`` once wrapped).
    encoder: the backbone module; evaluation applies it in inference mode.
    init: ``(key, views) -> (params, method_state)`` from example views (shapes only matter).
    features, embed, objective, head_layers: the stages.
    post_update: after the optimiser step.
    eval_variables: ``(params, method_state) -> variables`` of the encoder to evaluate.
    num_views: views the method needs from the augmentation policy (at least).
    decomposes: whether `objective` returns per-(view, image) terms.
    update_mask: optional ``(params, step) -> prefix tree of bool scalars`` (frozen layers).
    update: optional custom step body (``ssljax.train.step.UpdateFn``); None: the default.
    param_groups: ``{params entry: ParamGroup}``.
    nonfinite_hint: a method-specific cause of a non-finite loss and its fix, appended to the
      trainer's error when the loss or gradient stops being finite ('' for none).
  """

  name: str
  encoder: nn.Module
  init: Callable[[jax.Array, tuple[jax.Array, ...]], tuple[PyTree, PyTree]]
  features: FeaturesFn
  embed: EmbedFn
  objective: ObjectiveFn
  head_layers: HeadLayersFn
  post_update: Callable[..., tuple[PyTree, PyTree]]
  eval_variables: Callable[[PyTree, PyTree], PyTree]
  num_views: int = 2
  decomposes: bool = True
  update_mask: Callable[[PyTree, jax.Array], PyTree] | None = None
  update: Callable[..., Any] | None = None
  param_groups: Mapping[str, ParamGroup] = dataclasses.field(default_factory=dict)
  nonfinite_hint: str = ""

  def forward(self, params: PyTree, method_state: PyTree, batch: dict[str, Any], *,
              step: jax.Array) -> tuple[Outputs, PyTree]:
    """The features and embed stages in training mode: ``(Outputs, method_state)``."""
    features, method_state = self.features(params, method_state, tuple(batch["views"]),
                                           train=True)
    embeddings, method_state = self.embed(params, method_state, features,
                                          tuple(batch["views"]), step=step)
    return Outputs(features, embeddings), method_state

  def loss(self, params: PyTree, method_state: PyTree, batch: dict[str, Any], *,
           key: jax.Array, step: jax.Array, axis_name: str | None) -> LossOutput:
    """The three stages composed: ``(loss, (metrics, new_method_state))``."""
    outputs, method_state = self.forward(params, method_state, batch, step=step)
    out = self.objective(params, method_state, outputs, batch, key=key, step=step,
                         axis_name=axis_name)
    return out.value, (out.metrics, out.method_state)


class LossFn(Protocol):

  def __call__(self, params: PyTree, method_state: PyTree, batch: dict[str, Any], *,
               key: jax.Array, step: jax.Array, axis_name: str | None) -> LossOutput:
    ...


def keep_state(params: PyTree, method_state: PyTree, *,
               step: jax.Array) -> tuple[PyTree, PyTree]:
  """The `post_update` of methods without EMA or other post-step state."""
  del step
  return params, method_state


def online_encoder_variables(params: PyTree, method_state: PyTree) -> PyTree:
  """The `eval_variables` of methods that evaluate the trained (online) encoder."""
  return {"params": params["encoder"], "batch_stats": method_state["batch_stats"]["encoder"]}


def method_from_loss(name: str, encoder: nn.Module, init: Callable, loss: LossFn, *,
                     post_update: Callable[..., tuple[PyTree, PyTree]] = keep_state,
                     eval_variables: Callable[[PyTree, PyTree], PyTree] | None = None,
                     **fields: Any) -> Method:
  """A `Method` from one loss function, for methods that do not split into stages.

  The features stage passes the views through (inference and training alike), the embed
  stage returns no embeddings, and the objective is ``loss(params, method_state, batch, *,
  key, step, axis_name) -> (value, (metrics, method_state))``; its terms are None
  (``decomposes=False``), and ``head_layers`` returns the views' concatenation as
  ``'encoder'``. Add-ons that need features or terms therefore refuse it; wrapping the
  objective (its value) works. `fields` sets any other `Method` field.
  """

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del outputs
    value, (metrics, new_state) = loss(params, method_state, batch, key=key, step=step,
                                       axis_name=axis_name)
    return Objective(value, None, metrics, new_state)

  return Method(
      name=name, encoder=encoder, init=init,
      features=lambda params, method_state, views, *, train: (tuple(views), method_state),
      embed=lambda params, method_state, features, views, *, step: ({}, method_state),
      objective=objective,
      head_layers=lambda params, method_state, features: collections.OrderedDict(
          encoder=jnp.concatenate(features, axis=0)),
      post_update=post_update,
      eval_variables=eval_variables or (lambda params, method_state: params),
      decomposes=False, **fields)


# ------------------------------------------------------------------- stage building blocks

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


def encoder_features(encoder: nn.Module, *, per_view: bool,
                     views_used: Callable[[int], Sequence[int]] | None = None) -> FeaturesFn:
  """The features stage of a method whose online encoder is ``params['encoder']``.

  ``per_view=True``: one forward per view (BN statistics per view); False: views of equal
  shape share a forward (see `ssljax.methods.common.apply_to_views`). `views_used` maps the
  number of views in the batch to the indices the encoder sees (default: all). In inference
  mode every view is applied on its own with the running statistics.
  """
  from ssljax.methods.common import apply_to_views  # common imports this module

  def features(params, method_state, views, *, train):
    chosen = tuple(views[i] for i in (views_used(len(views)) if views_used else
                                      range(len(views))))
    stats = method_state["batch_stats"]["encoder"]
    if not train:
      return tuple(apply_module(encoder, params["encoder"], stats, v, train=False)[0]
                   for v in chosen), method_state
    out, stats = apply_to_views(encoder, params["encoder"], stats, chosen, per_view=per_view)
    return tuple(out), {**method_state,
                        "batch_stats": {**method_state["batch_stats"], "encoder": stats}}

  return features


def layer_outputs(module: nn.Module, variables: PyTree, x: jax.Array,
                  prefix: str) -> tuple[jax.Array, collections.OrderedDict]:
  """Applies `module` in inference mode; returns (output, every submodule's output).

  The outputs of the module's direct and nested submodules (Dense, BatchNorm, ...) come in
  call order, named ``'<prefix>/<submodule path>'``; the module's own output is
  ``'<prefix>/output'``.
  """
  out, state = module.apply(variables, x, train=False, capture_intermediates=True,
                            mutable=["intermediates"])
  layers: collections.OrderedDict = collections.OrderedDict()

  def visit(node, path):
    for name, child in node.items():
      if name == "__call__":
        if path:
          layers[f"{prefix}/{'/'.join(path)}"] = child[0]
      else:
        visit(child, path + [name])

  visit(state["intermediates"], [])
  layers[f"{prefix}/output"] = out
  return out, layers


def chain_head_layers(heads: Sequence[tuple[str, nn.Module]],
                      transform: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None
                      ) -> HeadLayersFn:
  """The `head_layers` of heads applied one after the other to the features.

  `heads` lists ``(params entry, module)`` in order; head k's input is head k-1's output
  (after ``transform[entry]`` if given, e.g. an L2 normalisation). BN statistics are read from
  ``method_state['batch_stats'][entry]`` where the head has any. Features of every view are
  concatenated into one batch; the result has ``'encoder'`` (the features) and each head's
  layers (`layer_outputs`).
  """
  transform = transform or {}

  def head_layers(params, method_state, features):
    x = jnp.concatenate(features, axis=0)
    result = collections.OrderedDict(encoder=x)
    stats = method_state.get("batch_stats", {})
    for entry, module in heads:
      variables = {"params": params[entry]}
      if stats.get(entry):
        variables["batch_stats"] = stats[entry]
      x, layers = layer_outputs(module, variables, x, entry)
      result.update(layers)
      if entry in transform:
        x = transform[entry](x)
    return result

  return head_layers


# ------------------------------------------------------------------- registries

MethodBuilder = Callable[[ml_collections.ConfigDict, str | None, RunInfo], Method]
AddonBuilder = Callable[[Method, ml_collections.ConfigDict, str | None, RunInfo], Method]
SectionFn = Callable[[], ml_collections.ConfigDict]


@dataclasses.dataclass(frozen=True)
class _Entry:
  builder: Callable[..., Method]
  config: SectionFn
  report: Callable[..., dict[str, Any]] | None = None


_REGISTRY: dict[str, _Entry] = {}
_ADDONS: dict[str, _Entry] = {}


def _empty_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict()


def register(name: str, *, config: SectionFn = _empty_section
             ) -> Callable[[MethodBuilder], MethodBuilder]:
  """Registers ``builder(config, axis_name, run) -> Method`` under `name`.

  `config` returns the method's section ``config.method.<name>`` with its defaults.
  """

  def decorator(builder: MethodBuilder) -> MethodBuilder:
    if name in _REGISTRY or name in _ADDONS:
      raise ValueError(f"method {name!r} is already registered")
    _REGISTRY[name] = _Entry(builder, config)
    return builder

  return decorator


def register_addon(name: str, *, config: SectionFn = _empty_section,
                   report: Callable[..., dict[str, Any]] | None = None
                   ) -> Callable[[AddonBuilder], AddonBuilder]:
  """Registers ``builder(method, config, axis_name, run) -> Method`` as add-on `name`.

  The builder checks that it can wrap `method` (raising ValueError naming the method and the
  fix) and reads its settings from ``config.method.<name>`` (the `config` section).
  `report`, if given, is called at every evaluation of a run that uses the add-on:
  ``report(method, config, state, images, workdir, *, step) -> {name: value}`` with the train
  state and a batch of uint8 training images; it may write files (plots) into `workdir` and
  returns scalars or paths to record (``ssljax.train.loop``).
  """

  def decorator(builder: AddonBuilder) -> AddonBuilder:
    if name in _ADDONS or name in _REGISTRY:
      raise ValueError(f"add-on {name!r} is already registered")
    _ADDONS[name] = _Entry(builder, config, report)
    return builder

  return decorator


def addon_reports(config: ml_collections.ConfigDict
                  ) -> list[tuple[str, Callable[..., dict[str, Any]]]]:
  """``(name, report)`` of the add-ons of ``config.method.addons`` that have an evaluation
  report, in order."""
  return [(name, _ADDONS[name].report) for name in tuple(config.method.get("addons", ()))
          if name in _ADDONS and _ADDONS[name].report is not None]


def registered_methods() -> list[str]:
  return sorted(_REGISTRY)


def registered_addons() -> list[str]:
  return sorted(_ADDONS)


def method_section(name: str) -> ml_collections.ConfigDict:
  """A fresh copy of method `name`'s config section with its defaults."""
  if name not in _REGISTRY:
    raise ValueError(f"method.name must be one of {registered_methods()}, got {name!r}")
  return _REGISTRY[name].config()


def addon_section(name: str) -> ml_collections.ConfigDict:
  """A fresh copy of add-on `name`'s config section with its defaults."""
  if name not in _ADDONS:
    raise ValueError(f"method.addons: unknown add-on {name!r}; registered add-ons: "
                     f"{registered_addons()}")
  return _ADDONS[name].config()


def build_method(config: ml_collections.ConfigDict, *, axis_name: str | None = None,
                 run: RunInfo | None = None) -> Method:
  """Builds ``config.method.name`` wrapped by ``config.method.addons`` (in order).

  BN statistics are synchronised over `axis_name` if set; `run` gives the run's length and
  dataset size (`RunInfo.nominal` without it).
  """
  name = config.method.name
  if name not in _REGISTRY:
    raise ValueError(f"method.name must be one of {registered_methods()}, got {name!r}")
  run = run or RunInfo.nominal(config)
  method = _REGISTRY[name].builder(config, axis_name, run)
  for addon in tuple(config.method.get("addons", ())):
    if addon not in _ADDONS:
      raise ValueError(f"method.addons: unknown add-on {addon!r}; registered add-ons: "
                       f"{registered_addons()}")
    method = _ADDONS[addon].builder(method, config, axis_name, run)
  return method
