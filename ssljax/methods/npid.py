"""NPID / InstDisc (Wu et al. 2018): instance discrimination against a memory bank.

Wu et al. 2018, Sec. 3.1-3.2; official code zhirongw/lemniscate.pytorch, and CLD's copy
(frank-xwang/CLD-UnsupervisedLearning ``train_cifar_npid_cld.py``, ``lib/LinearAverage.py``,
``lib/NCEAverage.py``). Network: encoder + a linear head to ``proj_dim`` (128), L2-normalised:
v = norm(W h + b). ``method_state['bank']`` ``[N, proj_dim]`` holds one row per training
image (N = the training-set size), initialised uniform in [-s, s] with s = 1/sqrt(d/3) and
not normalised, as the official ``LinearAverage``/``NCEAverage`` do (rows then have norm ~1).
One step, on view 0 (``num_views = 1``):

  1. v = norm(head(encoder(view)));
  2. full softmax (``nce_negatives = 0``, CLD's setting): ``npid_softmax(v, bank, index)``;
     NCE (``nce_negatives = K > 0``, the original NPID): K noise rows per example drawn
     uniformly with replacement, ``npid_nce(v, bank, index, noise, log_z)``, with Z estimated
     by ``npid_nce_log_z`` on the first step and stored in ``method_state['nce_log_z']``
     (-inf until then), fixed afterwards, as the official code does;
  3. after the loss, the bank rows of the batch are moved towards the new embeddings:
     m_i <- norm(mu m_i + (1 - mu) v_i), mu = ``bank_momentum`` (0.5). The embeddings and
     indices of every device are gathered first, so each device writes the same rows and the
     replicated banks stay equal. The bank is a constant for the gradient.

Two views (``num_views = 2``, CLD's ``--two-imgs`` in ``train_cifar_npid_cld.py``): the loss is
the mean over both views, each against the bank as it was before the step, and the rows are
then updated once per view (view 0, then view 1). CLD's NPID branch writes the bank inside the
backward pass of its memory op, in the order PyTorch's autograd runs the two views' nodes
(likely view 1 first) and after one view's gradient may already see the other's update; that
order is not reproduced bit for bit here (equal in expectation). In NCE mode every view draws
its own noise and Z is estimated from view 0.

Noise rows come from the loss key folded with the row's position in the global batch, so a
row draws the same noise whatever the number of devices. The batch holds distinct dataset
indices (one epoch is a permutation), so no row is written twice by one view's update.

Stages: ``features`` (one encoder forward per used view, in order), ``embed`` gives
``'embedding'`` (normalised head outputs per view); the objective's terms are each view's
per-row loss divided by the number of views. Evaluation uses the encoder.

Config: ``method.npid.{temperature, proj_dim, bank_size, bank_momentum, nce_negatives,
num_views}``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import gather_rows, l2_normalize, npid, npid_nce_log_z, npid_terms
from ssljax.methods.base import (Method, Objective, RunInfo, chain_head_layers,
                                 encoder_features, init_module, keep_state,
                                 online_encoder_variables, register)
from ssljax.models import MLPHead, build_encoder, compute_dtype


def update_memory_bank(bank: jax.Array, index: jax.Array, v: jax.Array, *, momentum: float,
                       axis_name: str | None = None) -> jax.Array:
  """NPID's memory update of the rows in `index`: ``m_i <- norm(mu m_i + (1 - mu) v_i)``.

  Args:
    bank: ``[N, d]`` memory bank (replicated on every device).
    index: int ``[n]`` dataset indices of this device's rows (distinct within the batch).
    v: ``[n, d]`` new embeddings of those rows (taken under stop-gradient).
    momentum: mu, the weight of the old row (NPID: 0.5).
    axis_name: if given, the rows of every device are gathered first, so every device
      writes the rows of the whole global batch and the banks stay equal.

  Returns:
    The new bank; rows not in the (global) batch are unchanged.
  """
  v_all, _ = gather_rows(jax.lax.stop_gradient(v).astype(bank.dtype), axis_name)
  index_all, _ = gather_rows(index, axis_name)
  mixed = momentum * bank[index_all] + (1.0 - momentum) * v_all
  return bank.at[index_all].set(l2_normalize(mixed))


def noise_indices(key: jax.Array, num_rows: int, num_noise: int, bank_size: int, *,
                  axis_name: str | None = None) -> jax.Array:
  """``[num_rows, num_noise]`` uniform bank rows for this device's rows (with replacement).

  Row i of device d draws from ``fold_in(key, d * num_rows + i)``: its position in the
  global batch, so the draw does not depend on the number of devices.
  """
  offset = jax.lax.axis_index(axis_name) * num_rows if axis_name else 0
  draw = lambda i: jax.random.randint(jax.random.fold_in(key, i), (num_noise,), 0, bank_size)
  return jax.vmap(draw)(offset + jnp.arange(num_rows))


def _bank_size(hp: ml_collections.ConfigDict, run: RunInfo) -> int:
  if hp.bank_size < 0:
    raise ValueError(f"npid: method.npid.bank_size must be >= 0, got {hp.bank_size}")
  if hp.bank_size == 0:
    if run.num_examples is None:
      raise ValueError(
          "npid: method.npid.bank_size = 0 sizes the memory bank by the training set, but "
          "the training-set size is unknown here (RunInfo.num_examples is None); build the "
          "method with run=RunInfo(..., num_examples=N) or set --config.method.npid.bank_size")
    return run.num_examples
  if run.num_examples is not None and hp.bank_size != run.num_examples:
    raise ValueError(
        f"npid: method.npid.bank_size = {hp.bank_size} but the training set has "
        f"{run.num_examples} images; the memory bank needs one row per image: set "
        f"--config.method.npid.bank_size=0 (the dataset size) or {run.num_examples}")
  return hp.bank_size


def build_npid(config: ml_collections.ConfigDict, axis_name: str | None,
               run: RunInfo) -> Method:
  """The NPID method from ``config.method.npid`` (errors on an invalid setting)."""
  hp = config.method.npid
  bank_size = _bank_size(hp, run)
  if hp.nce_negatives < 0:
    raise ValueError(f"npid: method.npid.nce_negatives must be >= 0, got {hp.nce_negatives}")
  if not 0.0 <= hp.bank_momentum < 1.0:
    raise ValueError(f"npid: method.npid.bank_momentum must be in [0, 1), got "
                     f"{hp.bank_momentum}")
  num_views = hp.num_views
  if num_views not in (1, 2):
    raise ValueError(f"npid: method.npid.num_views must be 1 or 2, got {num_views}")
  use_nce = hp.nce_negatives > 0

  encoder = build_encoder(config, axis_name=axis_name)
  head = MLPHead(hidden_dim=hp.proj_dim, out_dim=hp.proj_dim, num_layers=1,
                 dtype=compute_dtype(config.train.compute_dtype))

  def init(key, views):
    k_enc, k_head, k_bank = jax.random.split(key, 3)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    head_params, _ = init_module(head, k_head, h)
    bound = 1.0 / math.sqrt(hp.proj_dim / 3.0)
    bank = jax.random.uniform(k_bank, (bank_size, hp.proj_dim), jnp.float32, -bound, bound)
    state = {"batch_stats": {"encoder": enc_stats}, "bank": bank}
    if use_nce:
      state["nce_log_z"] = jnp.full((), -jnp.inf, jnp.float32)
    return {"encoder": enc_params, "head": head_params}, state

  def embed(params, method_state, features, views, *, step):
    del views, step
    embeddings = tuple(l2_normalize(head.apply({"params": params["head"]}, h))
                       for h in features)
    return {"embedding": embeddings}, method_state

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, step
    embeddings, index = outputs.embeddings["embedding"], batch["index"]
    bank = method_state["bank"]
    new_state = dict(method_state)
    options = {}
    if use_nce:
      noise = [noise_indices(jax.random.fold_in(key, i), v.shape[0], hp.nce_negatives,
                             bank_size, axis_name=axis_name) for i, v in enumerate(embeddings)]
      stored = method_state["nce_log_z"]
      estimate = npid_nce_log_z(embeddings[0], bank, index, noise[0],
                                temperature=hp.temperature, axis_name=axis_name)
      new_state["nce_log_z"] = jnp.where(jnp.isneginf(stored), estimate, stored)
      options = [{"noise_index": n, "log_z": new_state["nce_log_z"]} for n in noise]
    else:
      options = [{} for _ in embeddings]
    losses = [npid(v, bank, index, temperature=hp.temperature, axis_name=axis_name, **o)
              for v, o in zip(embeddings, options)]
    loss = sum(value for value, _ in losses) / len(losses)
    metrics = {name: sum(m[name] for _, m in losses) / len(losses) for name in losses[0][1]}
    if use_nce:
      metrics["nce_log_z"] = new_state["nce_log_z"]

    def terms():
      rows = [npid_terms(v, method_state["bank"], index, temperature=hp.temperature, **o)[0]
              / len(embeddings) for v, o in zip(embeddings, options)]
      extra = len(batch["views"]) - len(rows)
      return jnp.stack(rows + [jnp.zeros_like(rows[0])] * extra)

    for v in embeddings:
      bank = update_memory_bank(bank, index, v, momentum=hp.bank_momentum,
                                axis_name=axis_name)
    new_state["bank"] = bank
    return Objective(loss, terms, metrics, new_state)

  return Method(name="npid", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=True,
                                          views_used=lambda total: range(num_views)),
                embed=embed, objective=objective,
                head_layers=chain_head_layers([("head", head)]), post_update=keep_state,
                eval_variables=online_encoder_variables, num_views=num_views)


def default_section() -> ml_collections.ConfigDict:
  """``config.method.npid`` with its defaults."""
  s = ml_collections.ConfigDict()
  # NPID / InstDisc. Defaults: CLD's CIFAR setting (scripts for train_cifar_npid_cld.py).
  s.temperature = 0.1  # Original paper: 0.07.
  s.proj_dim = 128
  s.bank_size = 0  # Memory-bank rows; 0 = the training-set size (must equal it).
  s.bank_momentum = 0.5
  # 0: full softmax over the bank (CLD's nce_k = 0); > 0: NCE with this many noise samples
  # and a normalising constant Z estimated on the first batch, then fixed (original NPID).
  s.nce_negatives = 0
  # Views per image in the loss: 1 (NPID), or 2 (CLD's --two-imgs: the loss averages both
  # views against the same bank, and each view's embedding is written into it in turn).
  s.num_views = 1
  return s


@register("npid", config=default_section)
def npid_method(config: ml_collections.ConfigDict, axis_name: str | None,
                run: RunInfo) -> Method:
  return build_npid(config, axis_name, run)
