"""MoCo v2 (He et al. 2020; Chen et al. 2020): queries against an EMA key encoder and a queue.

He et al. 2020, Sec. 3.2 (queue, momentum update Eq. 2); v2's MLP head and recipe: Chen et al.
2020; official code: facebookresearch/moco ``moco/builder.py`` and its CIFAR-10 demo
(``colab-notebook`` branch, ``colab/moco_cifar10_demo.ipynb``). The query encoder + projector
are trained (``params``); the key encoder + projector are an EMA copy of their parameters
(``method_state['key_params']``) that keeps its own BatchNorm statistics
(``method_state['batch_stats']['key_encoder']``: as in ``builder.py``, the key encoder's
forward runs in train mode and so updates its own running statistics).
``method_state['queue']`` ``[queue_size, proj_dim]`` holds L2-normalised keys of earlier
batches and ``method_state['queue_pointer']`` the row the next keys are written to. Before the
first ``queue_size`` keys have replaced them, its rows are ``method.moco.queue_init``:
'normal', Gaussian vectors normalised to unit length (``builder.py``), or 'uniform', entries
uniform in [-s, s] with s = 1/sqrt(proj_dim / 3), not normalised (the ``MemoryMoCo`` queue of
CLD's CIFAR code, ``lib/NCEAverage.py``, shared with CMC). One step:

  1. each query view -> encoder -> projector -> q; each key view -> key encoder -> key
     projector -> k = sg(norm(.)). Every view is a forward pass of its own, so BN statistics
     are per view, as in the official code;
  2. loss = mean over the (query, key) pairs of ``moco_infonce(q, k, queue, t)``;
  3. the keys of every device are gathered (global batch order) and written into the queue
     after the loss, oldest rows first (FIFO), so every device holds the same queue;
  4. after the optimiser step (`post_update`): theta_k <- m theta_k + (1 - m) theta_q, with m
     rising from ``ema_momentum`` to ``ema_momentum_final`` on BYOL's cosine schedule over
     the run (equal values: constant, MoCo v2's 0.999).

View layouts (``method.moco.symmetric`` and ``method.moco.num_views``):
  * asymmetric (MoCo v2): query view 0, key view 1; the keys of view 1 are enqueued.
  * symmetric (the official CIFAR-10 demo; solo-learn's MoCo V2+): also query view 1 against
    key view 0; the loss is the mean of the two terms, and both keys go into the one queue,
    those of view 0 first (the demo's ``cat([k1, k2])``): 2 x global batch rows per step.
  * three views (CLD's MoCo instance branch, frank-xwang/CLD-UnsupervisedLearning
    ``train_cifar_moco_cld.py`` ``--three-imgs``): the queries of views 0 and 1 against the
    key of view 2; the loss is the mean of the two terms; the key is enqueued once.

Deliberate deviations, each a choice where the sources differ or cannot be copied:
  * No Shuffle-BN. The key encoder's BN uses the same setting as the query encoder's
    (``model.sync_batchnorm``): with synchronised BN the statistics of both span the global
    batch, which removes the per-device statistics that Shuffle-BN was designed to decouple;
    without sync BN the per-device leak Shuffle-BN prevents is present.
  * Symmetric loss: the official demo sums the two terms, solo-learn
    (``solo/methods/mocov2plus.py``) averages them; ssljax averages. The demo's SGD update is
    reproduced exactly with twice its learning rate and half its weight decay
    (``configs/moco.py:cifar10``).
  * Symmetric queue: solo-learn keeps one queue per view (q1 meets only past keys of view 2);
    ssljax keeps the official demo's single queue fed with the keys of both views.
  * Projector: (Linear - ReLU) x (layers - 1) - Linear with no BatchNorm, MoCo v2's and
    solo-learn's head (`MocoProjector`); ``proj_layers = 1`` is MoCo v1's / the CIFAR demo's
    linear head. ``norm_linear`` makes the last layer CLD's cosine layer (NormLinear /
    NormMLP, the official MoCo+CLD scripts' ``--normlinear``).

Stages: ``features`` are the query encoder's outputs for the query views (in the order of the
layout's query views); ``embed`` gives ``'query'`` (projector outputs, one per query view) and
``'key'`` (normalised key-network outputs under stop-gradient, one per key view); the objective's
terms put each query view's InfoNCE rows (divided by the number of pairs) at that view's index.
Evaluation uses the query encoder.

Config: ``method.moco.{temperature, queue_size, queue_init, ema_momentum, ema_momentum_final,
symmetric, proj_hidden_dim, proj_dim, proj_layers, norm_linear, num_views}``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import gather_rows, l2_normalize, moco_infonce, moco_infonce_terms
from ssljax.methods.base import (Method, Objective, RunInfo, apply_module, chain_head_layers,
                                 encoder_features, init_module, online_encoder_variables,
                                 register)
from ssljax.methods.common import (check_ema_momenta, check_queue_length,
                                   cosine_ema_momentum, ema_update, fifo_enqueue)
from ssljax.models import build_encoder, compute_dtype
from ssljax.models.heads import NormLinear, NormMLP

# The trained modules the key encoder copies by EMA (a wrapper may add other params).
_QUERY_MODULES = ("encoder", "projector")


class MocoProjector(nn.Module):
  """MoCo v2's projection head: (Linear - ReLU) x (num_layers - 1), then Linear; no BN.

  Attributes:
    hidden_dim: width of the hidden layers.
    out_dim: output width.
    num_layers: linear layers (>= 1); 1 is a single linear map (MoCo v1, the CIFAR demo).
    dtype: computation dtype; the output is float32.
  """

  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    del train  # no BatchNorm or dropout
    if self.num_layers < 1:
      raise ValueError(f"MocoProjector needs num_layers >= 1, got {self.num_layers}")
    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"dense{i + 1}")(x))
    x = nn.Dense(self.out_dim, dtype=self.dtype, name=f"dense{self.num_layers}")(x)
    return x.astype(jnp.float32)


_QUEUE_INITS = ("normal", "uniform")


def initial_queue(key: jax.Array, rows: int, dim: int, init: str = "normal") -> jax.Array:
  """The queue before any key is written: ``[rows, dim]`` float32 (see the module docstring).

  'uniform' rows have unit expected squared norm (each entry's variance is s^2 / 3 = 1 / dim)
  but are not normalised, so their scores with a unit query spread around 0 with standard
  deviation ~1/sqrt(dim), as 'normal''s do.
  """
  if init == "normal":
    return l2_normalize(jax.random.normal(key, (rows, dim), jnp.float32))
  if init == "uniform":
    bound = 1.0 / math.sqrt(dim / 3.0)
    return jax.random.uniform(key, (rows, dim), jnp.float32, -bound, bound)
  raise ValueError(f"queue init {init!r} is not one of {', '.join(map(repr, _QUEUE_INITS))}")


def _view_layout(hp: ml_collections.ConfigDict):
  """(query_views, key_views, pairs) of the configured layout (see the module docstring)."""
  if hp.num_views == 2:
    if hp.symmetric:
      # Key forwards in the demo's order (k of view 1, then of view 0).
      return (0, 1), (1, 0), ((0, 0), (1, 1))
    return (0,), (1,), ((0, 0),)
  if hp.num_views == 3:
    if hp.symmetric:
      raise ValueError("moco: method.moco.symmetric = True needs method.moco.num_views = 2; "
                       "the three-view layout (views 0 and 1 against the key of view 2) is "
                       "already two-sided: set --config.method.moco.symmetric=False")
    return (0, 1), (2,), ((0, 0), (1, 0))
  raise ValueError(f"moco: method.moco.num_views must be 2 or 3, got {hp.num_views}")


def build_moco(config: ml_collections.ConfigDict, axis_name: str | None,
               run: RunInfo) -> Method:
  """The MoCo method from ``config.method.moco`` (errors on an invalid setting)."""
  hp = config.method.moco
  query_views, key_views, pairs = _view_layout(hp)
  rows_per_image = len(key_views)
  global_batch = config.train.batch_size
  if rows_per_image == 1:
    check_queue_length("moco", hp.queue_size, global_batch, "method.moco.queue_size")
  elif hp.queue_size <= 0 or hp.queue_size % (rows_per_image * global_batch):
    step_rows = rows_per_image * global_batch
    lower = max(step_rows, hp.queue_size // step_rows * step_rows)
    raise ValueError(
        f"moco: method.moco.queue_size = {hp.queue_size} must be a positive multiple of "
        f"{step_rows} = {rows_per_image} x train.batch_size ({global_batch}), because each "
        f"symmetric step enqueues the keys of both views of the global batch; use e.g. "
        f"--config.method.moco.queue_size={lower}")
  check_ema_momenta("moco", hp.ema_momentum, hp.ema_momentum_final)
  if hp.queue_init not in _QUEUE_INITS:
    raise ValueError(f"moco: method.moco.queue_init = {hp.queue_init!r} is not one of "
                     f"{', '.join(map(repr, _QUEUE_INITS))}: 'normal' is MoCo's unit-length "
                     f"Gaussian rows, 'uniform' the un-normalised uniform rows of CLD's CIFAR "
                     f"code")

  encoder = build_encoder(config, axis_name=axis_name)
  dtype = compute_dtype(config.train.compute_dtype)
  if hp.norm_linear:
    if hp.proj_layers not in (1, 2):
      raise ValueError(f"moco: method.moco.norm_linear needs proj_layers 1 (NormLinear) or 2 "
                       f"(NormMLP), got {hp.proj_layers}")
    projector = (NormLinear(hp.proj_dim, dtype=dtype) if hp.proj_layers == 1 else
                 NormMLP(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, dtype=dtype))
  else:
    projector = MocoProjector(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim,
                              num_layers=hp.proj_layers, dtype=dtype)

  def init(key, views):
    k_enc, k_proj, k_queue = jax.random.split(key, 3)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    proj_params, _ = init_module(projector, k_proj, h)
    params = {"encoder": enc_params, "projector": proj_params}
    queue = initial_queue(k_queue, hp.queue_size, hp.proj_dim, hp.queue_init)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return params, {
        "batch_stats": {"encoder": enc_stats, "key_encoder": copy(enc_stats)},
        "key_params": copy(params),
        "queue": queue,
        "queue_pointer": jnp.zeros((), jnp.int32),
    }

  def embed(params, method_state, features, views, *, step):
    del step
    queries = tuple(projector.apply({"params": params["projector"]}, h) for h in features)
    key_params = method_state["key_params"]
    stats = method_state["batch_stats"]["key_encoder"]
    keys = []
    for v in key_views:
      h, stats = apply_module(encoder, key_params["encoder"], stats, views[v])
      k = l2_normalize(projector.apply({"params": key_params["projector"]}, h))
      keys.append(jax.lax.stop_gradient(k))
    new_state = {**method_state,
                 "batch_stats": {**method_state["batch_stats"], "key_encoder": stats}}
    return {"query": queries, "key": tuple(keys)}, new_state

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, key
    queries, keys = outputs.embeddings["query"], outputs.embeddings["key"]
    queue = method_state["queue"]
    terms = [moco_infonce(queries[i], keys[j], queue, temperature=hp.temperature,
                          axis_name=axis_name) for i, j in pairs]
    loss = sum(value for value, _ in terms) / len(terms)
    metrics = {name: sum(m[name] for _, m in terms) / len(terms) for name in terms[0][1]}
    metrics["ema_momentum"] = momentum(step)

    def per_view_terms():
      per_view = jnp.zeros((len(batch["views"]), queries[0].shape[0]), jnp.float32)
      for i, j in pairs:
        rows, _ = moco_infonce_terms(queries[i], keys[j], queue, temperature=hp.temperature)
        per_view = per_view.at[query_views[i]].add(rows / len(pairs))
      return per_view

    # The keys of the whole global batch, view by view in view order.
    order = sorted(range(len(key_views)), key=lambda j: key_views[j])
    new_keys = jnp.concatenate([gather_rows(keys[j], axis_name)[0] for j in order])
    new_queue, pointer = fifo_enqueue(queue, method_state["queue_pointer"], new_keys)
    new_state = {**method_state, "queue": new_queue, "queue_pointer": pointer}
    return Objective(loss, per_view_terms, metrics, new_state)

  def momentum(step):
    return cosine_ema_momentum(step, run.total_steps, hp.ema_momentum, hp.ema_momentum_final)

  def post_update(params, method_state, *, step):
    online = {name: params[name] for name in _QUERY_MODULES}
    key_params = ema_update(method_state["key_params"], online, momentum(step))
    return params, {**method_state, "key_params": key_params}

  return Method(name="moco", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=True,
                                          views_used=lambda num_views: query_views),
                embed=embed, objective=objective,
                head_layers=chain_head_layers([("projector", projector)]),
                post_update=post_update, eval_variables=online_encoder_variables,
                num_views=hp.num_views)


def default_section() -> ml_collections.ConfigDict:
  """``config.method.moco`` with its defaults."""
  s = ml_collections.ConfigDict()
  # MoCo v2. Defaults: solo-learn's MoCo V2+ CIFAR recipe (mocov2plus.yaml), smaller queue.
  s.temperature = 0.2
  s.queue_size = 4096  # Keys kept; a multiple of the global batch.
  # Rows before the first queue_size keys arrive: 'normal' (MoCo's unit-length Gaussian rows)
  # or 'uniform' (CLD's CIFAR MemoryMoCo: uniform in +-1/sqrt(proj_dim / 3), unnormalised).
  s.queue_init = "normal"
  # EMA momentum of the key encoder, cosine-increased from `ema_momentum` to
  # `ema_momentum_final` over the run (equal values: constant, as in MoCo v2's 0.999).
  s.ema_momentum = 0.99
  s.ema_momentum_final = 0.999
  s.symmetric = True  # Also swap the two views' roles and average.
  s.proj_hidden_dim = 512
  s.proj_dim = 128
  s.proj_layers = 2  # 1: the linear head of MoCo v1 / the CIFAR demo.
  # CLD's --normlinear (CLD paper Sec. 3.3): the projector's last layer is a cosine layer,
  # `NormLinear` (proj_layers 1) or Linear - ReLU - NormLinear, "NormMLP" (proj_layers 2).
  s.norm_linear = False
  # 2: query view 0, key view 1 (and the reverse if `symmetric`). 3: CLD's three-view MoCo
  # (train_cifar_moco_cld.py): queries of views 0 and 1 against the key of view 2; needs
  # augment.num_views >= 3 and symmetric = False.
  s.num_views = 2
  return s


@register("moco", config=default_section)
def moco(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  return build_moco(config, axis_name, run)
