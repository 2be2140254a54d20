"""CLD (Wang, Liu, Yu, CVPR 2021): cross-level instance-group discrimination as an add-on.

CLD paper Sec. 3; official code frank-xwang/CLD-UnsupervisedLearning (train_cifar_npid_cld.py,
train_cifar_moco_cld.py, main_imagenet_moco_cld.py, models/resnet_cifar.py). The base method
keeps its instance branch and its loss L_inst; CLD forks a *group* branch from the same
backbone features:

  g_v = norm(group_head(h_v))                  for the two views v = a, b (``params['cld_head']``)
  (l_v, M_v) = batch_kmeans(g_v, K, num_iters)   per device (official) or over the global batch
  L_CLD = 1/2 [CE(g_a M_b^T / T_c, l_b) + CE(g_b M_a^T / T_c, l_a)]     (`ssljax.losses.cld`)
  L = L_inst + lambda * L_CLD

Which two views, per base method (``method.name``):

  npid  ``method.npid.num_views = 2`` (the official ``--two-imgs``): L_inst is the mean of the
        two views' full softmax over the memory bank; the group branch runs on both views.
  moco  ``method.moco.num_views = 3``, ``symmetric = False`` (the official ``--three-imgs``):
        views 0 and 1 are queries against the key of view 2; the group branch runs on the two
        query views. (A symmetric two-view MoCo also has two query views and is accepted.)
  byol  the group head runs on the online encoder's features of the two views; no target
        network and no stop-gradient in the CLD term (the authors' answer in the official
        repository's issue #6).

The official code has no CLD for SimCLR, SwAV, Barlow Twins or DINO (InfoMin+CLD is not in
ssljax), so the add-on refuses them, and a method without backbone features to fork
(``method_from_loss``) or a view layout that does not give two online views.

The group head (``method.cld.head``): 'linear' (nn.Linear with bias, the NPID+CLD CIFAR
scripts), 'norm_linear' (`ssljax.models.heads.NormLinear`, the MoCo+CLD CIFAR scripts'
``--normlinear``), 'mlp' (Linear - ReLU - Linear) or 'norm_mlp' (Linear - ReLU - NormLinear,
the ImageNet "NormMLP"). Deviation: the official ImageNet model shares the hidden Linear - ReLU
layer between the instance and the group branch; here the group head owns its hidden layer.
The official MoCo+CLD CIFAR scripts also switch the *instance* head to NormLinear; that is the
base method's setting (``method.moco.proj_layers = 1``, ``method.moco.norm_linear = True``).

K at least the rows clustered (per device, or the global batch with ``global_kmeans``) is an
error: with K = rows every row is its own group and CLD becomes cross-view instance
discrimination, and the official ImageNet script silently degenerates with K > rows (64 rows
per GPU, K = 120).

Stages: ``embed`` adds ``'group'`` (the two normalised group features); ``objective`` adds
lambda * L_CLD to the base value, with the metrics ``cld_loss``, ``group_acc`` (the official
"CLD acc"), ``nonempty_clusters`` and ``instance_loss`` (the base value). The objective no
longer decomposes into per-(view, image) terms (k-means couples the rows), so ``terms`` is
None. ``head_layers`` adds the group head's layers (``cld_head/...``). Evaluation is the base
method's encoder.

Config: ``method.cld.{num_clusters, temperature, weight, num_iters, head, head_dim,
head_hidden_dim, global_kmeans}``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import cld, l2_normalize
from ssljax.methods.addons import add_params_entry
from ssljax.methods.base import Method, Objective, RunInfo, layer_outputs, register_addon
from ssljax.methods.moco import MocoProjector
from ssljax.models import compute_dtype
from ssljax.models.heads import NormLinear, NormMLP

_ENTRY = "cld_head"
_SUPPORTED = ("npid", "moco", "byol")
_HEADS = ("linear", "norm_linear", "mlp", "norm_mlp")


def default_section() -> ml_collections.ConfigDict:
  """``config.method.cld`` with its defaults (the NPID+CLD CIFAR-10 script)."""
  s = ml_collections.ConfigDict()
  s.num_clusters = 128  # K, k-means clusters per batch (<= rows clustered).
  s.temperature = 0.2  # T_c, the official cld_t.
  s.weight = 1.0  # lambda, the official Lambda: L = L_inst + lambda * L_CLD.
  s.num_iters = 5  # k-means (Lloyd) rounds.
  s.head = "linear"  # 'linear' | 'norm_linear' | 'mlp' | 'norm_mlp'
  s.head_dim = 128  # Group feature width (the official low_dim).
  s.head_hidden_dim = 2048  # Hidden width of 'mlp' / 'norm_mlp'.
  # False: k-means on each device's rows (the official code). True: on the batch gathered over
  # devices (the centroids and labels of the single-device run on the global batch).
  s.global_kmeans = False
  return s


class _LinearHead(nn.Module):
  """nn.Linear with bias (the official group head without --normlinear); float32 output."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    del train
    return nn.Dense(self.features, dtype=self.dtype, name="dense1")(
        x.astype(self.dtype)).astype(jnp.float32)


def _group_head(hp: ml_collections.ConfigDict, dtype) -> nn.Module:
  if hp.head == "linear":
    return _LinearHead(hp.head_dim, dtype=dtype)
  if hp.head == "norm_linear":
    return NormLinear(hp.head_dim, dtype=dtype)
  if hp.head == "mlp":
    return MocoProjector(hidden_dim=hp.head_hidden_dim, out_dim=hp.head_dim, num_layers=2,
                         dtype=dtype)
  return NormMLP(hidden_dim=hp.head_hidden_dim, out_dim=hp.head_dim, dtype=dtype)


def _check(config: ml_collections.ConfigDict, method: Method, run: RunInfo) -> None:
  """Raises ValueError naming the method and the fix when CLD cannot wrap `method`."""
  hp = config.method.cld
  base = config.method.name
  if base not in _SUPPORTED:
    raise ValueError(
        f"add-on 'cld' wraps npid, moco or byol (the combinations of the official CLD code and "
        f"the authors' BYOL answer), not {method.name!r}: run it with configs/npid_cld.py, "
        f"configs/moco_cld.py or configs/byol_cld.py (--config npid_cld:cifar10 etc.), or drop "
        f"'cld' from method.addons")
  if base == "npid" and config.method.npid.num_views != 2:
    raise ValueError(
        f"add-on 'cld' on npid needs two views per image (the official --two-imgs), but "
        f"method.npid.num_views = {config.method.npid.num_views}: set "
        f"--config.method.npid.num_views=2")
  if base == "moco" and config.method.moco.num_views == 2 and not config.method.moco.symmetric:
    raise ValueError(
        "add-on 'cld' on moco needs two query views, but the asymmetric two-view layout has one "
        "(view 0): set --config.method.moco.num_views=3 --config.method.moco.symmetric=False "
        "--config.augment.num_views=3 (the official three-view MoCo+CLD)")
  if hp.head not in _HEADS:
    raise ValueError(f"method.cld.head must be one of {_HEADS}, got {hp.head!r}")
  if hp.temperature <= 0:
    raise ValueError(f"method.cld.temperature must be > 0, got {hp.temperature}")
  if hp.num_iters < 1:
    raise ValueError(f"method.cld.num_iters must be >= 1, got {hp.num_iters}")
  # Built to train on several devices (run.data_devices), each device clusters its own rows
  # unless global_kmeans: batch_size / devices of them. (The step's trace checks the rows it
  # sees too: `cld_terms`.)
  devices = run.data_devices if run.data_devices and not hp.global_kmeans else 1
  rows = config.train.batch_size // devices
  where = (f"train.batch_size = {config.train.batch_size}" if devices == 1 else
           f"train.batch_size / {devices} devices = {rows} per device")
  if not 1 <= hp.num_clusters < rows:
    raise ValueError(
        f"method.cld.num_clusters = {hp.num_clusters} must be at least 1 and below the rows "
        f"k-means clusters ({where}; with as many clusters as rows every row is its own group "
        f"and CLD turns into instance discrimination); lower "
        f"--config.method.cld.num_clusters, raise train.batch_size"
        + (", or cluster the gathered batch: --config.method.cld.global_kmeans=True"
           if devices > 1 else ""))


@register_addon("cld", config=default_section)
def cld_addon(method: Method, config: ml_collections.ConfigDict, axis_name: str | None,
              run: RunInfo) -> Method:
  """`method` (npid, moco or byol) with CLD's group branch and loss (module docstring)."""
  _check(config, method, run)
  hp = config.method.cld
  head = _group_head(hp, compute_dtype(config.train.compute_dtype))
  kmeans_axis = axis_name if hp.global_kmeans else None

  def init(key, views):
    params, state = jax.eval_shape(method.init, key, views)
    features, _ = jax.eval_shape(
        lambda p, s: method.features(p, s, tuple(views), train=False), params, state)
    if len(features) < 2 or any(f.ndim != 2 for f in features):
      shapes = [tuple(f.shape) for f in features]
      raise ValueError(
          f"add-on 'cld' forks its group head from two [n, F] backbone features, but "
          f"{method.name!r} gives {shapes}: a method built with method_from_loss (or one whose "
          f"online encoder sees one view) has no features to fork; use npid, moco or byol")
    return head.init(key, jnp.zeros((1, features[0].shape[1]), jnp.float32))["params"]

  wrapped = add_params_entry(method, _ENTRY, init=init)

  def group_features(params, features):
    return tuple(l2_normalize(head.apply({"params": params[_ENTRY]}, h)) for h in features[:2])

  def embed(params, method_state, features, views, *, step):
    embeddings, method_state = wrapped.embed(params, method_state, features, views, step=step)
    if len(features) < 2:
      raise ValueError(f"add-on 'cld' needs two online views, but {method.name!r} gives "
                       f"{len(features)} (see the view layouts in ssljax/methods/cld.py)")
    return {**embeddings, "group": group_features(params, features)}, method_state

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    out = wrapped.objective(params, method_state, outputs, batch, key=key, step=step,
                            axis_name=axis_name)
    g_a, g_b = outputs.embeddings["group"]
    loss, metrics = cld(g_a, g_b, num_clusters=hp.num_clusters, temperature=hp.temperature,
                        num_iters=hp.num_iters, axis_name=kmeans_axis)
    metrics = {**out.metrics, "instance_loss": out.value, "cld_loss": loss, **metrics}
    return Objective(out.value + hp.weight * loss, None, metrics, out.method_state)

  def head_layers(params, method_state, features):
    layers = wrapped.head_layers(params, method_state, features)
    _, group = layer_outputs(head, {"params": params[_ENTRY]}, jnp.concatenate(features, 0),
                             _ENTRY)
    return collections.OrderedDict(list(layers.items()) + list(group.items()))

  return dataclasses.replace(wrapped, name=f"{method.name}+cld", embed=embed,
                             objective=objective, head_layers=head_layers, decomposes=False)
