"""MetaMask (Li et al., NeurIPS 2022): a per-dimension mask on the representation, learned by
a second-order meta-gradient (official code: jiangmengli/MetaMask, ``meta-mask.py``).

Model (``models/simsiam.py``, ``models/mask_generator.py``): the backbone features ``h`` of
each view are multiplied by ``m = sigmoid(alpha)``, one logit per feature dimension, shared by
every image (``params['mask']['alpha']``, initialised to 0, so ``m = 0.5`` at the start). Two
heads read the masked features: a Barlow Twins head (Linear-BN-ReLU, Linear-BN-ReLU,
Linear-BN; 2048 wide in the official CIFAR run) and a contrastive head (Linear-BN-ReLU,
Linear-BN; 2048 -> 256). Each view goes through backbone and heads in its own forward pass, as
the official model calls the backbone once per view. The official model also builds two
SimSiam predictors whose outputs no loss reads; they are left out.

Losses (``loss.py``, ``contrastive_loss`` in ``meta-mask.py``): Barlow Twins with the unbiased
standard deviation and lambda 5e-3 on the first head, NT-Xent (2N - 2 negatives, temperature
0.07) on the second; the network's loss is ``L_BT + gamma * L_CL`` (gamma 10).

One step (``training_step``, ``unrolled_backward``, ``_hessian_vector_product``), all inside
the one compiled train step (`Method.update`):

1. the network theta (backbone and both heads) takes an SGD-with-momentum step on
   ``L_BT + gamma * L_CL`` with the mask fixed; the mask's gradient from this loss is
   discarded;
2. from the updated theta_{t+1}, the meta-gradient of the contrastive loss through one virtual
   SGD step: ``theta' = theta_{t+1} - lr * (mu * buf + grad_theta L_CL(theta_{t+1}, alpha) +
   wd * theta_{t+1})`` with the optimiser's momentum buffer ``buf`` (after step 1) and its
   current learning rate, and ``d alpha = d/d alpha L_CL(theta'(alpha), alpha)`` (`meta_gradient`;
   exact with nested ``jax.grad`` by default, or the official central-difference estimate);
3. the mask takes its own SGD-with-momentum step with ``d alpha`` (its own parameter group:
   the official mask optimiser is a second SGD with the same settings, coupled weight decay
   included, which pulls alpha towards 0).

The meta passes run the network in training mode (batch statistics) but their BatchNorm
running statistics are dropped: only the real pass of step 1 updates them.

Evaluation: ``Method.encoder`` is `MaskedEncoder`, the backbone followed by the mask, so kNN
and the linear probe see ``h * sigmoid(alpha)`` as the official kNN monitor does.

Config: ``method.metamask.{lambda_offdiag, unbiased_std, weight_cl, temperature,
bt_hidden_dim, bt_dim, bt_layers, cl_hidden_dim, cl_dim, cl_layers, proj_bias, meta_step,
second_order, mask_lr_scale, mask_weight_decay, mask_momentum, remat_backbone}``.
The network's optimiser must be ``optim.name = 'sgd'`` without Nesterov momentum (the
virtual step is an SGD step).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssljax.losses import barlow_twins as barlow_twins_loss
from ssljax.losses import nt_xent
from ssljax.methods.base import (Method, Objective, ParamGroup, RunInfo, apply_module,
                                 init_module, keep_state, layer_outputs, register)
from ssljax.models import MLPHead, build_encoder, compute_dtype

PyTree = Any
SECOND_ORDER_MODES = ("exact", "finite_difference", "none")


# ------------------------------------------------------------------- the meta-gradient

def _pmean(tree: PyTree, axis_name: str | None) -> PyTree:
  return jax.lax.pmean(tree, axis_name) if axis_name else tree


def _tree_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def meta_gradient(loss_fn: Callable[[PyTree, PyTree], jax.Array], theta: PyTree, alpha: PyTree,
                  *, lr: jax.Array | float, momentum: float = 0.0,
                  momentum_buffer: PyTree | None = None, weight_decay: float = 0.0,
                  second_order: str = "exact", axis_name: str | None = None
                  ) -> tuple[jax.Array, PyTree]:
  """The gradient with respect to `alpha` of the loss after one virtual SGD step of `theta`.

  With ``g(theta, alpha) = grad_theta loss_fn(theta, alpha)``, the virtual step is

      theta'(alpha) = theta - lr * (momentum * buf + g(theta, alpha) + weight_decay * theta)

  (PyTorch's SGD with coupled weight decay and an existing momentum buffer ``buf``; without a
  buffer the momentum term is 0), and the outer objective is ``loss_fn(theta'(alpha), alpha)``.
  Its gradient is the first-order term ``d_alpha loss_fn(theta', alpha)`` (theta' held fixed)
  minus ``lr * grad^2_{alpha, theta} loss_fn(theta, alpha) . v`` with
  ``v = grad_theta loss_fn(theta', alpha)`` (DARTS, Liu et al. 2019, eq. 7).

  Args:
    loss_fn: ``(theta, alpha) -> scalar``; pure (state it changes, e.g. BatchNorm statistics,
      must be dropped inside it).
    theta: the network's parameters (any pytree); the virtual step starts here.
    alpha: the meta-parameters (any pytree).
    lr: the virtual step's learning rate (may be traced).
    momentum, momentum_buffer, weight_decay: the rest of the SGD step; the buffer (shaped like
      `theta`) is a constant.
    second_order: ``'exact'``: differentiate through the virtual step with nested
      ``jax.grad`` (the second-order term exactly); ``'finite_difference'``: the official
      MetaMask / DARTS estimate, the Hessian-vector product as the central difference
      ``(d_alpha loss_fn(theta + r v) - d_alpha loss_fn(theta - r v)) / (2 r)`` with
      ``r = 0.01 / ||v||``; ``'none'``: the first-order term alone.
    axis_name: if given, `loss_fn` returns this device's share of a loss whose mean over
      devices is the global one (``ssljax.losses``); the gradients with respect to theta are
      averaged over the axis before the virtual step, and the returned value and gradient are
      the averages over devices too.

  Returns:
    ``(outer_value, grad_alpha)``: ``loss_fn(theta', alpha)`` and the gradient (shaped like
    `alpha`).

  Raises:
    ValueError: an unknown `second_order`, or a buffer without the theta structure.
  """
  if second_order not in SECOND_ORDER_MODES:
    raise ValueError(f"second_order must be one of {SECOND_ORDER_MODES}, got {second_order!r}")
  theta = jax.lax.stop_gradient(theta)
  if momentum_buffer is not None:
    if jax.tree.structure(momentum_buffer) != jax.tree.structure(theta):
      raise ValueError("momentum_buffer must have the structure of theta")
    momentum_buffer = jax.lax.stop_gradient(momentum_buffer)
  grad_theta = lambda th, a: _pmean(jax.grad(loss_fn, argnums=0)(th, a), axis_name)

  def virtual_step(a):
    g = grad_theta(theta, a)
    if momentum_buffer is None or momentum == 0.0:
      direction = jax.tree.map(lambda gi, p: gi + weight_decay * p, g, theta)
    else:
      direction = jax.tree.map(lambda gi, p, b: momentum * b + gi + weight_decay * p,
                               g, theta, momentum_buffer)
    return jax.tree.map(lambda p, d: p - lr * d, theta, direction)

  if second_order == "exact":
    value, grad = jax.value_and_grad(lambda a: loss_fn(virtual_step(a), a))(alpha)
    return _pmean(value, axis_name), _pmean(grad, axis_name)

  theta_v = jax.lax.stop_gradient(virtual_step(alpha))
  value, (v, first) = jax.value_and_grad(loss_fn, argnums=(0, 1))(theta_v, alpha)
  value, first = _pmean(value, axis_name), _pmean(first, axis_name)
  if second_order == "none":
    return value, first
  v = _pmean(v, axis_name)
  r = 0.01 / _tree_norm(v)
  grad_alpha = lambda th: _pmean(jax.grad(loss_fn, argnums=1)(th, alpha), axis_name)
  plus = grad_alpha(jax.tree.map(lambda p, vi: p + r * vi, theta, v))
  minus = grad_alpha(jax.tree.map(lambda p, vi: p - r * vi, theta, v))
  grad = jax.tree.map(lambda f, gp, gm: f - lr * (gp - gm) / (2.0 * r), first, plus, minus)
  return value, grad


# ------------------------------------------------------------------- the masked encoder

class MaskedEncoder(nn.Module):
  """The backbone followed by the learned mask: ``encoder(x) * sigmoid(alpha)``.

  Its variables are ``{'params': {'encoder': ..., 'alpha': [F]}, 'batch_stats': {'encoder':
  ...}}``; MetaMask's ``eval_variables`` builds them from the trained ``params['encoder']``,
  ``params['mask']['alpha']`` and the encoder's BN statistics, so evaluation (kNN, linear
  probe, precise BN) sees the masked features.
  """

  encoder: nn.Module

  @property
  def num_features(self) -> int:
    return self.encoder.num_features

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    h = self.encoder(x, train=train)
    alpha = self.param("alpha", nn.initializers.zeros, (h.shape[-1],), jnp.float32)
    return h * jax.nn.sigmoid(alpha)


def mask_statistics(alpha: jax.Array, bins: int = 10) -> dict[str, jax.Array]:
  """Scalars that describe ``m = sigmoid(alpha)``: mean, min, max, the fractions of
  dimensions below 0.1 and above 0.9, and a histogram of `bins` equal bins on [0, 1]
  (``mask_hist_k``: fraction of dimensions in bin k)."""
  m = jax.nn.sigmoid(alpha.astype(jnp.float32))
  stats = {"mask_mean": jnp.mean(m), "mask_min": jnp.min(m), "mask_max": jnp.max(m),
           "mask_below_0.1": jnp.mean(m < 0.1), "mask_above_0.9": jnp.mean(m > 0.9)}
  index = jnp.clip(jnp.floor(m * bins).astype(jnp.int32), 0, bins - 1)
  counts = jnp.zeros((bins,), jnp.float32).at[index].add(1.0) / m.shape[0]
  stats.update({f"mask_hist_{k}": counts[k] for k in range(bins)})
  return stats


# ------------------------------------------------------------------- the method

def default_section() -> ml_collections.ConfigDict:
  """``config.method.metamask`` with its defaults (the official CIFAR-10 run)."""
  s = ml_collections.ConfigDict()
  # Losses: L_BT + weight_cl * L_CL (Barlow Twins with MetaMask's unbiased std).
  s.lambda_offdiag = 5e-3
  s.unbiased_std = True
  s.weight_cl = 10.0
  s.temperature = 0.07
  # Heads on the masked features (lightly's projection MLPs: biases, BN after the last layer).
  s.bt_hidden_dim = 2048
  s.bt_dim = 2048
  s.bt_layers = 3
  s.cl_hidden_dim = 2048
  s.cl_dim = 256
  s.cl_layers = 2
  s.proj_bias = True
  # The meta step: False trains theta alone with the mask fixed at 0.5 (Barlow Twins +
  # SimCLR on one backbone, the ablation without the meta-gradient).
  s.meta_step = True
  s.second_order = "exact"  # 'exact' | 'finite_difference' (official) | 'none' (first order)
  # The mask's optimiser: SGD; its lr is mask_lr_scale x the network's schedule.
  s.mask_lr_scale = 1.0
  s.mask_weight_decay = 5e-4
  s.mask_momentum = 0.9
  # jax.checkpoint on the backbone forward (recompute activations in the backward passes).
  s.remat_backbone = False
  return s


def _build_head(config, hidden: int, out: int, layers: int, bias: bool,
                axis_name: str | None) -> MLPHead:
  return MLPHead(hidden_dim=hidden, out_dim=out, num_layers=layers, use_bias=bias,
                 last_bn=True, last_bn_affine=True, bn_momentum=config.model.bn_momentum,
                 axis_name=axis_name if config.model.sync_batchnorm else None,
                 dtype=compute_dtype(config.train.compute_dtype))


def _check(config: ml_collections.ConfigDict) -> None:
  hp = config.method.metamask
  if hp.second_order not in SECOND_ORDER_MODES:
    raise ValueError(f"method.metamask.second_order must be one of {SECOND_ORDER_MODES}, got "
                     f"{hp.second_order!r}")
  if hp.bt_layers < 1 or hp.cl_layers < 1:
    raise ValueError("method.metamask.bt_layers and cl_layers must be >= 1")
  if hp.lambda_offdiag < 0 or hp.weight_cl < 0 or hp.temperature <= 0:
    raise ValueError("method.metamask: lambda_offdiag and weight_cl must be >= 0 and "
                     "temperature > 0")
  if hp.meta_step and (config.optim.name != "sgd" or config.optim.nesterov):
    raise ValueError(
        f"metamask's meta step takes a virtual SGD step with the network optimiser's momentum "
        f"buffer, so it needs optim.name = 'sgd' without Nesterov momentum (got "
        f"{config.optim.name!r}, nesterov={config.optim.nesterov}); use "
        f"--config.optim.name=sgd, or --config.method.metamask.meta_step=False")


def momentum_buffer(opt_state: PyTree, params: PyTree) -> PyTree | None:
  """The SGD momentum buffer shaped like `params`, read from an optax state.

  Collects every ``optax.TraceState`` whose trace is shaped like `params` (with
  ``optax.MaskedNode`` in place of other parameter groups' leaves) and takes each leaf from
  the trace that holds it; None if no trace holds a leaf of `params`.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  is_trace = lambda x: isinstance(x, optax.TraceState)
  leaves, treedef = jax.tree.flatten(params)
  chosen: list[Any] = [None] * len(leaves)
  for node in jax.tree.leaves(opt_state, is_leaf=is_trace):
    if not is_trace(node):
      continue
    trace_leaves, trace_def = jax.tree.flatten(node.trace, is_leaf=is_masked)
    if len(trace_leaves) != len(leaves):
      continue
    for i, leaf in enumerate(trace_leaves):
      if not is_masked(leaf) and chosen[i] is None:
        chosen[i] = leaf
  if all(c is None for c in chosen):
    return None
  return jax.tree.unflatten(treedef, [jnp.zeros_like(p) if c is None else c
                                      for p, c in zip(leaves, chosen)])


@register("metamask", config=default_section)
def metamask(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  """Builds MetaMask from ``config.method.metamask`` (see the module docstring).

  Raises:
    ValueError: an invalid setting, or a meta step with an optimiser other than plain SGD.
  """
  del run
  _check(config)
  hp = config.method.metamask
  backbone = build_encoder(config, axis_name=axis_name)
  bt_head = _build_head(config, hp.bt_hidden_dim, hp.bt_dim, hp.bt_layers, hp.proj_bias,
                        axis_name)
  cl_head = _build_head(config, hp.cl_hidden_dim, hp.cl_dim, hp.cl_layers, hp.proj_bias,
                        axis_name)
  encoder = MaskedEncoder(backbone)

  def backbone_train(enc_params, stats, x):
    return apply_module(backbone, enc_params, stats, x)

  if hp.remat_backbone:
    backbone_train = jax.checkpoint(backbone_train)

  def init(key, views):
    k_enc, k_bt, k_cl = jax.random.split(key, 3)
    enc_params, enc_stats = init_module(backbone, k_enc, views[0])
    h = backbone.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    bt_params, bt_stats = init_module(bt_head, k_bt, h)
    cl_params, cl_stats = init_module(cl_head, k_cl, h)
    alpha = jnp.zeros((h.shape[-1],), jnp.float32)
    return ({"encoder": enc_params, "bt_projector": bt_params, "cl_projector": cl_params,
             "mask": {"alpha": alpha}},
            {"batch_stats": {"encoder": enc_stats, "bt_projector": bt_stats,
                             "cl_projector": cl_stats}})

  def features(params, method_state, views, *, train):
    mask = jax.nn.sigmoid(params["mask"]["alpha"])
    stats = method_state["batch_stats"]["encoder"]
    out = []
    for x in views[:2]:  # one backbone forward per view, as the official model
      if train:
        h, stats = backbone_train(params["encoder"], stats, x)
      else:
        h = backbone.apply({"params": params["encoder"], "batch_stats": stats}, x, train=False)
      out.append(h * mask)
    if not train:
      return tuple(out), method_state
    return tuple(out), {**method_state,
                        "batch_stats": {**method_state["batch_stats"], "encoder": stats}}

  def heads(params, method_state, feats, names):
    stats = dict(method_state["batch_stats"])
    result = {}
    for name, head, entry in names:
      s = stats[entry]
      outs = []
      for h in feats:
        z, s = apply_module(head, params[entry], s, h)
        outs.append(z)
      stats[entry] = s
      result[name] = tuple(outs)
    return result, {**method_state, "batch_stats": stats}

  both_heads = (("projection", bt_head, "bt_projector"),
                ("contrastive", cl_head, "cl_projector"))

  def embed(params, method_state, feats, views, *, step):
    del views, step
    return heads(params, method_state, feats, both_heads)

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key, step
    bt, bt_metrics = barlow_twins_loss(*outputs.embeddings["projection"],
                                       lambda_offdiag=hp.lambda_offdiag,
                                       unbiased_std=hp.unbiased_std, axis_name=axis_name)
    cl, cl_metrics = nt_xent(*outputs.embeddings["contrastive"], temperature=hp.temperature,
                             axis_name=axis_name)
    metrics = {**bt_metrics, **{f"cl_{k}": v for k, v in cl_metrics.items()},
               "loss_bt": bt, "loss_cl": cl}
    return Objective(bt + hp.weight_cl * cl, None, metrics, method_state)

  def contrastive_loss(theta, mask, method_state, views, axis_name):
    """L_CL in training mode with the BN statistics' updates dropped (the meta passes)."""
    params = {**theta, "mask": mask}
    feats, state = features(params, method_state, views, train=True)
    out, _ = heads(params, state, feats, (("contrastive", cl_head, "cl_projector"),))
    return nt_xent(*out["contrastive"], temperature=hp.temperature, axis_name=axis_name)[0]

  def head_layers(params, method_state, feats):
    x = jnp.concatenate(feats, axis=0)
    result = collections.OrderedDict(encoder=x)
    stats = method_state["batch_stats"]
    for entry in ("bt_projector", "cl_projector"):
      head = bt_head if entry == "bt_projector" else cl_head
      _, layers = layer_outputs(head, {"params": params[entry], "batch_stats": stats[entry]},
                                x, entry)
      result.update(layers)
    return result

  def eval_variables(params, method_state):
    return {"params": {"encoder": params["encoder"], "alpha": params["mask"]["alpha"]},
            "batch_stats": {"encoder": method_state["batch_stats"]["encoder"]}}

  method = Method(
      name="metamask", encoder=encoder, init=init, features=features, embed=embed,
      objective=objective, head_layers=head_layers, post_update=keep_state,
      eval_variables=eval_variables, num_views=2, decomposes=False,
      param_groups={"mask": ParamGroup(optimizer="sgd", lr_scale=hp.mask_lr_scale,
                                       weight_decay=hp.mask_weight_decay,
                                       momentum=hp.mask_momentum)})
  return dataclasses.replace(method, update=_meta_update(method, config, contrastive_loss))


def _meta_update(method: Method, config: ml_collections.ConfigDict, contrastive_loss):
  """MetaMask's step body (`ssljax.train.step.UpdateFn`): real step, meta-gradient, mask step."""
  from ssljax.train.step import (UpdateOutput, average_batch_stats, masked_update,
                                 mean_over)  # the train step imports the methods

  hp = config.method.metamask
  optim = config.optim

  def theta_only(params, step):
    mask = method.update_mask(params, step) if method.update_mask else None
    keep = {k: k != "mask" for k in params}
    if mask is None:
      return keep
    return {k: (False if k == "mask" else mask[k]) for k in params}

  real_method = dataclasses.replace(method, update_mask=theta_only)

  def update(state, batch, *, key, axis_name, tx, schedule):
    params, step = state.params, state.step
    alpha = params["mask"]
    theta = {k: v for k, v in params.items() if k != "mask"}

    # (1) The real step's gradient: L_BT + gamma L_CL at theta_t, the mask a constant.
    def total(theta_, method_state):
      return method.loss({**theta_, "mask": jax.lax.stop_gradient(alpha)}, method_state,
                         batch, key=key, step=step, axis_name=axis_name)

    (loss, (metrics, method_state)), g_theta = jax.value_and_grad(total, has_aux=True)(
        theta, state.method_state)
    g_theta = mean_over(g_theta, axis_name)
    method_state = average_batch_stats(method_state, axis_name)
    metrics = dict(metrics)

    d_alpha = jax.tree.map(jnp.zeros_like, alpha)
    if hp.meta_step:
      # theta_{t+1} and the momentum buffer after the real step (the mask's leaves frozen).
      new_params, new_opt_state, _ = masked_update(
          real_method, tx, {**g_theta, "mask": d_alpha}, state.opt_state, params, step)
      theta1 = {k: v for k, v in new_params.items() if k != "mask"}
      buf = momentum_buffer(new_opt_state, new_params)
      buf = None if buf is None else {k: v for k, v in buf.items() if k != "mask"}
      views = tuple(batch["views"])
      # (2) The meta-gradient of L_CL through one virtual SGD step from theta_{t+1}; the
      # meta passes read the BN statistics after step 1 and drop their own updates.
      outer, d_alpha = meta_gradient(
          lambda th, a: contrastive_loss(th, a, method_state, views, axis_name),
          theta1, alpha, lr=schedule(step), momentum=optim.momentum, momentum_buffer=buf,
          weight_decay=optim.weight_decay, second_order=hp.second_order,
          axis_name=axis_name)
      metrics.update({"meta_outer_loss": outer, "meta_grad_norm": optax.tree.norm(d_alpha)})

    # (3) One optimiser update for both groups: theta's part is step (1)'s update (the
    # groups are independent), the mask's is its SGD step with the meta-gradient; the
    # optimiser state advances once per train step.
    grads = {**g_theta, "mask": d_alpha}
    params, opt_state, grads = masked_update(method, tx, grads, state.opt_state, params, step)
    params, method_state = method.post_update(params, method_state, step=step)
    metrics.update(mask_statistics(params["mask"]["alpha"]))
    return UpdateOutput(params, opt_state, method_state, loss, grads, metrics)

  return update
