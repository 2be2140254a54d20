"""Rewrites of the default encoder's hot spots on the CPU, timed against what ssljax runs.

Run from the repository root:

  python benchmarks/cpu_alternatives.py [--batch 512] [--size 20] [--rounds 30]
      [--config configs/simclr.py:fashion_mnist] [--out benchmarks/results/cpu_alternatives.json]

Issue 21 asks the default job's step to match PyTorch's best layout on the 2-core CPU;
``benchmarks/cpu_step.py --breakdown`` shows BatchNorm at ~20% of the encoder's forward +
backward and convolutions plus layout transposes as the largest parts. This script measures
candidate rewrites, each side by side with the current code in one process (calls
interleaved, medians over ``--rounds``), under the XLA flags ``ssljax train`` sets on CPU:

  1. BatchNorm with a hand-written backward (``jax.custom_vjp``: ``dx = scale * rstd * (g -
     mean(g) - xhat * mean(g * xhat))``), same variables and forward arithmetic as
     ``flax.linen.BatchNorm``, in the default encoder (``resnet_tiny`` + the 512-wide 1x1
     expansion) on ``--batch`` views of ``--size`` px: forward + backward of a squared-error
     loss on the features, and the largest relative difference of every gradient from Flax's;
  2. convolution as im2col (``k * k`` shifted strided slices concatenated on the channel axis,
     then one matrix product) against ``lax.conv_general_dilated``, forward + backward of
     each of the encoder's convolution shapes, summed.

Parts 3 and 4 put rewrites into the whole train step, where the isolated timings of parts 1-2
can mislead (fusion with neighbours, two threads shared by concurrent kernels): the default
job's step on given views (``cpu_step.py``'s "views given" step, its LARS update included)
compiled once as ssljax runs it and once per rewrite, the compiled steps called in turn:

  3. ``conv_by_layer``: only the convolutions where part 2 favoured a rewrite are rewritten
     (unpadded 1x1 convolutions as a strided slice and one matrix product; convolutions of at
     most 4 input channels, the stem, as im2col); the others stay XLA's;
  4. ``relu_mask``: ReLU as ``x * (x > 0)`` instead of ``max(x, 0)``, whose broadcast zero the
     step's profile shows materialised once as a [512, 3, 3, 512] buffer where YNNPACK fuses the
     ReLU into the pooling sum.

Each step's first loss on the same batch and state is compared with the current step's.

It prints a table and writes the numbers, the device and the flags to JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import Any, Callable

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
for _path in (REPO_ROOT, BENCHMARKS_DIR):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import cpu_step  # noqa: E402  (the default job's step and its timing helpers; imports no JAX)

DEFAULT_OUT = os.path.join("benchmarks", "results", "cpu_alternatives.json")
IM2COL_MAX_INPUT_CHANNELS = 4


# ------------------------------------------------------------------ BatchNorm, custom backward


def _batch_moments(x32, axes, axis_name):
  mean = x32.mean(axes)
  mean2 = (x32 * x32).mean(axes)
  if axis_name is not None:
    from jax import lax
    mean, mean2 = lax.pmean((mean, mean2), axis_name)
  import jax.numpy as jnp
  return mean, jnp.maximum(0.0, mean2 - mean * mean)  # Flax's fast variance


def _make_bn_train() -> Callable[..., Any]:
  import jax
  import jax.numpy as jnp
  from jax import lax

  def forward(x, scale, bias, eps, axis_name):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean, var = _batch_moments(x32, axes, axis_name)
    rstd = lax.rsqrt(var + eps)
    return ((x32 - mean) * (scale * rstd) + bias).astype(x.dtype), (x, mean, rstd, scale)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
  def bn_train(x, scale, bias, eps, axis_name):
    return forward(x, scale, bias, eps, axis_name)[0]

  def backward(eps, axis_name, residuals, dy):
    del eps
    x, mean, rstd, scale = residuals
    axes = tuple(range(x.ndim - 1))
    g = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dbias, dscale = g.sum(axes), (g * xhat).sum(axes)
    count = x.size // x.shape[-1]
    mean_g, mean_gx = dbias / count, dscale / count
    if axis_name is not None:
      mean_g, mean_gx = lax.pmean((mean_g, mean_gx), axis_name)
    dx = (scale * rstd) * (g - mean_g - xhat * mean_gx)
    return dx.astype(x.dtype), dscale, dbias

  bn_train.defvjp(forward, backward)
  return bn_train


def custom_vjp_batchnorm() -> type:
  """A ``flax.linen.BatchNorm`` stand-in (same fields used by ssljax, same variables)."""
  import flax.linen as nn
  import jax.numpy as jnp
  from jax import lax

  bn_train = _make_bn_train()

  class CustomVjpBatchNorm(nn.Module):
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    axis_name: str | None = None
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Callable[..., Any] = nn.initializers.ones
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
      use_running = nn.merge_param("use_running_average", self.use_running_average,
                                   use_running_average)
      features = x.shape[-1]
      ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
      ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
      scale = (self.param("scale", self.scale_init, (features,), jnp.float32)
               if self.use_scale else jnp.ones((features,), jnp.float32))
      bias = (self.param("bias", self.bias_init, (features,), jnp.float32)
              if self.use_bias else jnp.zeros((features,), jnp.float32))
      dtype = self.dtype or x.dtype
      if use_running:
        rstd = lax.rsqrt(ra_var.value + self.epsilon)
        return ((x.astype(jnp.float32) - ra_mean.value) * (scale * rstd) + bias).astype(dtype)
      y = bn_train(x, scale, bias, self.epsilon, self.axis_name)
      if not self.is_initializing():
        mean, var = _batch_moments(lax.stop_gradient(x).astype(jnp.float32),
                                   tuple(range(x.ndim - 1)), self.axis_name)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
      return y.astype(dtype)

  return CustomVjpBatchNorm


def _encoder_grad_fns(batch: int, size: int):
  """{'flax': fn, 'custom_vjp': fn} of the default encoder's loss and gradient, and inputs."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ssljax.models import resnet

  preset = resnet.PRESETS["resnet_tiny"]
  x = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 1), np.float32))
  flax_bn = nn.BatchNorm
  out = {}
  for name, bn in (("flax", flax_bn), ("custom_vjp", custom_vjp_batchnorm())):
    encoder = resnet.ResNet(stage_sizes=preset.stage_sizes, stage_widths=preset.stage_widths,
                            block=preset.block, stem_width=preset.stem_width,
                            stem_stride=preset.stem_stride, expand_features=512)

    def loss(params, stats, encoder=encoder):
      features, updates = encoder.apply({"params": params, "batch_stats": stats}, x,
                                        train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.square(features - 0.3)), updates

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    nn.BatchNorm = bn  # ResNet builds its norm from flax.linen.BatchNorm when traced
    try:
      variables = encoder.init(jax.random.key(0), x[:2], train=False)
      first = fn(variables["params"], variables["batch_stats"])  # traced and compiled here
      jax.block_until_ready(first)
    finally:
      nn.BatchNorm = flax_bn
    out[name] = (fn, variables, first)
  return out


# ------------------------------------------------------------------ im2col convolution


def conv_im2col(x, kernel, stride: int, padding):
  """``[N, H, W, Ci] * [kh, kw, Ci, Co]``: shifted strided slices, concatenated, one dot."""
  import jax.numpy as jnp

  kh, kw, ci, co = kernel.shape
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  n, h, w, _ = x.shape
  oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
  cols = [x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  return (patches.reshape(-1, kh * kw * ci) @ kernel.reshape(-1, co)).reshape(n, oh, ow, co)


def conv_xla(x, kernel, stride: int, padding):
  from jax import lax
  return lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def encoder_conv_shapes(batch: int, size: int) -> list[tuple[tuple[int, ...], tuple[int, ...],
                                                                 int]]:
  """(input, kernel, stride) of every convolution of resnet_tiny + the 1x1 expansion."""
  s1 = (size + 1) // 2          # stem, stride 2
  s2, s3 = (s1 + 1) // 2, ((s1 + 1) // 2 + 1) // 2
  return [((batch, size, size, 1), (3, 3, 1, 16), 2),
          ((batch, s1, s1, 16), (3, 3, 16, 16), 1), ((batch, s1, s1, 16), (3, 3, 16, 16), 1),
          ((batch, s1, s1, 16), (3, 3, 16, 32), 2), ((batch, s2, s2, 32), (3, 3, 32, 32), 1),
          ((batch, s1, s1, 16), (1, 1, 16, 32), 2),
          ((batch, s2, s2, 32), (3, 3, 32, 64), 2), ((batch, s3, s3, 64), (3, 3, 64, 64), 1),
          ((batch, s2, s2, 32), (1, 1, 32, 64), 2), ((batch, s3, s3, 64), (1, 1, 64, 512), 1)]


# ------------------------------------------------------------------ rewrites in the train step


def conv_by_layer(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                  dimension_numbers=None, feature_group_count=1, precision=None,
                  preferred_element_type=None):
  """``lax.conv_general_dilated`` as ``flax.linen.Conv`` calls it (NHWC, HWIO), rewritten per
  layer: an unpadded 1x1 convolution becomes a strided slice and one matrix product, one of at
  most `IM2COL_MAX_INPUT_CHANNELS` input channels becomes `conv_im2col`; anything else (and any
  dilation, grouping or other layout) is passed to lax unchanged."""
  from jax import lax

  plain = (rhs.ndim == 4 and feature_group_count == 1 and not isinstance(padding, str)
           and all(d == 1 for d in (lhs_dilation or ()))
           and all(d == 1 for d in (rhs_dilation or ()))
           and dimension_numbers is not None
           and tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
           and window_strides[0] == window_strides[1])
  if plain:
    kh, kw, cin, _ = rhs.shape
    stride, pad = window_strides[0], [tuple(p) for p in padding]
    if (kh, kw) == (1, 1) and pad == [(0, 0), (0, 0)]:
      return lax.dot_general(lhs[:, ::stride, ::stride, :], rhs[0, 0], (((3,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=preferred_element_type)
    if cin <= IM2COL_MAX_INPUT_CHANNELS:
      return conv_im2col(lhs, rhs, stride, pad)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)


def relu_mask(x):
  """ReLU as ``x * (x > 0)``: for finite inputs the same values and the same gradient (0 at 0)
  as ``max(x, 0)``; at -inf it gives NaN (-inf * 0)."""
  return x * (x > 0).astype(x.dtype)


@contextlib.contextmanager
def step_rewrite(name: str):
  """While tracing, the models build their convolutions / ReLUs with rewrite `name`
  ("current": none). ssljax's ResNet and heads look ``flax.linen.Conv`` and
  ``flax.linen.relu`` up when traced, so the module code is untouched."""
  import flax.linen as nn
  saved = nn.Conv, nn.relu
  if name == "conv_by_layer":
    nn.Conv = functools.partial(nn.Conv, conv_general_dilated=conv_by_layer)
  elif name == "relu_mask":
    nn.relu = relu_mask
  elif name != "current":
    raise ValueError(f"unknown rewrite {name!r}; use current, conv_by_layer or relu_mask")
  try:
    yield
  finally:
    nn.Conv, nn.relu = saved


STEP_REWRITES = ("current", "conv_by_layer", "relu_mask")


def in_step(config, rounds: int) -> dict[str, Any]:
  """The config's train step on given views, compiled per `STEP_REWRITES` entry and timed in
  turn; each rewrite's first loss and gradient norm against the current step's."""
  import jax
  import numpy as np

  from ssljax.train.step import compile_train_step, make_per_device_step

  setup = cpu_step.JaxSetup(config)
  views = setup.views()
  states, calls, first, compile_s, hlo = {}, {}, {}, {}, {}
  initial = setup.init_state()
  for name in STEP_REWRITES:
    states[name] = jax.tree.map(lambda leaf: leaf.copy(), initial)  # each step donates its own
    # A new step function per rewrite: jit would otherwise reuse the first one's trace.
    step = compile_train_step(
        make_per_device_step(setup.method, setup.tx,
                             cpu_step.given_views_policy(setup.policy.num_views),
                             setup.schedule), setup.mesh)
    start = time.perf_counter()
    with step_rewrite(name):
      compiled = step.lower(states[name], views, setup.index, setup.label).compile()
    compile_s[name] = time.perf_counter() - start
    computations, entry = cpu_step.parse_hlo(compiled.as_text())
    hlo[name] = {**cpu_step.hlo_digest(compiled),
                 "convolutions": sum(inst.opcode == "convolution"
                                     for body in computations.values() for inst in body),
                 # Constants XLA writes out as arrays of their own (the zero of max(x, 0)
                 # where YNNPACK fuses the last ReLU into the pooling sum).
                 "materialised_broadcasts": [
                     inst.shape.split("{")[0] for inst in computations.get(entry, [])
                     if inst.name.startswith("wrapped_broadcast")]}
    states[name], metrics = compiled(states[name], views, setup.index, setup.label)
    first[name] = {k: float(np.asarray(jax.device_get(metrics[k])).mean())
                   for k in ("train/loss", "train/grad_norm")}

    def call(name=name, compiled=compiled):
      states[name], metrics = compiled(states[name], views, setup.index, setup.label)
      return metrics

    calls[name] = call
  times = _interleaved(calls, rounds)
  medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
  return {
      "views": [int(d) for d in views.shape],
      "median_ms": medians, "min_ms": {n: float(np.min(t)) * 1e3 for n, t in times.items()},
      "over_current": {n: medians[n] / medians["current"] for n in STEP_REWRITES[1:]},
      "compile_s": compile_s, "hlo": hlo, "first_step": first,
      "first_loss_difference": {n: abs(first[n]["train/loss"] - first["current"]["train/loss"])
                                for n in STEP_REWRITES[1:]}}


# ------------------------------------------------------------------ timing


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
  import jax
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def run(batch: int, size: int, rounds: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  results: dict[str, Any] = {}
  fns = _encoder_grad_fns(batch, size)
  (_, _, (loss_a, grads_a)), (_, _, (loss_b, grads_b)) = fns["flax"], fns["custom_vjp"]
  rel = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)),
                     grads_a, grads_b)
  stats = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), loss_a[1], loss_b[1])
  times = _interleaved({name: functools.partial(fn, v["params"], v["batch_stats"])
                        for name, (fn, v, _) in fns.items()}, rounds)
  medians = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
  results["batchnorm"] = {
      "median_ms": medians, "min_ms": {n: float(np.min(t)) * 1e3 for n, t in times.items()},
      "custom_vjp_over_flax": medians["custom_vjp"] / medians["flax"],
      "loss_difference": abs(float(loss_a[0]) - float(loss_b[0])),
      "max_relative_gradient_difference": max(jax.tree.leaves(rel)),
      "max_running_stat_difference": max(jax.tree.leaves(stats))}

  rng = np.random.default_rng(1)
  per_layer, totals = [], {"xla": 0.0, "im2col": 0.0}
  for x_shape, k_shape, stride in encoder_conv_shapes(batch, size):
    x = jnp.asarray(rng.random(x_shape, np.float32))
    kernel = jnp.asarray(rng.normal(size=k_shape).astype(np.float32) * 0.1)
    pad = [(k_shape[0] // 2,) * 2, (k_shape[1] // 2,) * 2]
    grads = {}
    for name, conv in (("xla", conv_xla), ("im2col", conv_im2col)):
      g = jax.jit(jax.grad(lambda a, b, conv=conv: jnp.sum(conv(a, b, stride, pad) ** 2),
                           argnums=(0, 1)))
      jax.block_until_ready(g(x, kernel))
      grads[name] = functools.partial(g, x, kernel)
    diff = float(jnp.max(jnp.abs(conv_xla(x, kernel, stride, pad)
                                 - conv_im2col(x, kernel, stride, pad))))
    times = _interleaved(grads, rounds)
    row = {"input": list(x_shape), "kernel": list(k_shape), "stride": stride,
           "max_output_difference": diff,
           **{f"{n}_ms": float(np.median(t)) * 1e3 for n, t in times.items()}}
    per_layer.append(row)
    for name in totals:
      totals[name] += row[f"{name}_ms"]
  results["convolution"] = {"layers": per_layer, "total_ms": totals,
                            "im2col_over_xla": totals["im2col"] / totals["xla"]}
  return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=512, help="views per call (default job: 512)")
  parser.add_argument("--size", type=int, default=20, help="view side in px (default job: 20)")
  parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds")
  parser.add_argument("--config", default=cpu_step.DEFAULT_CONFIG,
                      help="config whose train step parts 3-4 rewrite (path[:dataset]; the "
                           "default job's); '' skips them")
  parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file to write")
  args = parser.parse_args(argv)

  from ssljax.cli import CPU_XLA_FLAGS
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()
  import jax

  load = os.getloadavg()
  machine = cpu_step.device_description()  # CPU model, vector extensions, uptime
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  results = run(args.batch, args.size, args.rounds)
  if args.config:
    results["train_step"] = {"config": args.config,
                             **in_step(cpu_step.load_config(args.config), args.rounds)}
  report = {
      "command": "python benchmarks/cpu_alternatives.py " + " ".join(
          f"--{k} {v}" for k, v in (("batch", args.batch), ("size", args.size),
                                   ("rounds", args.rounds), ("config", repr(args.config)),
                                   ("out", args.out))),
      "device": {"processor": platform.processor(), "cpu_count": os.cpu_count(),
                 "backend": jax.default_backend(), "jax": jax.__version__,
                 "python": platform.python_version(), "date": started,
                 "cpu_model": machine["cpu_model"], "cpu_vector_isa": machine["cpu_vector_isa"],
                 "uptime_at_start": machine["uptime_at_start"],
                 "load_average_at_start": list(load),
                 "load_average_at_end": list(os.getloadavg())},
      "xla_flags": os.environ["XLA_FLAGS"], "batch": args.batch, "size": args.size,
      "rounds": args.rounds, **results}
  bn, conv = results["batchnorm"], results["convolution"]
  print(f"default encoder, {args.batch} views of {args.size} px, {args.rounds} interleaved "
        f"rounds, XLA_FLAGS={report['xla_flags']!r}, load {load[0]:.2f}")
  print(f"{'what':<44} {'current ms':>10} {'rewrite ms':>10} {'ratio':>6}")
  print(f"{'BatchNorm: encoder forward + backward':<44} {bn['median_ms']['flax']:>10.1f} "
        f"{bn['median_ms']['custom_vjp']:>10.1f} {bn['custom_vjp_over_flax']:>6.3f}")
  print(f"{'im2col: 10 convolutions fwd + bwd, summed':<44} {conv['total_ms']['xla']:>10.1f} "
        f"{conv['total_ms']['im2col']:>10.1f} {conv['im2col_over_xla']:>6.3f}")
  if "train_step" in results:
    step = results["train_step"]
    for name in STEP_REWRITES[1:]:
      label = f"{name}: the train step"
      print(f"{label:<44} {step['median_ms']['current']:>10.1f} "
            f"{step['median_ms'][name]:>10.1f} {step['over_current'][name]:>6.3f}")
    print(f"train step of {args.config}, first loss, "
          + " / ".join(STEP_REWRITES) + ": "
          + " / ".join(f"{step['first_step'][n]['train/loss']:.6f}" for n in STEP_REWRITES))
  print(f"custom-vjp BN: largest relative gradient difference "
        f"{bn['max_relative_gradient_difference']:.2e}, running statistics "
        f"{bn['max_running_stat_difference']:.2e}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
  return report


if __name__ == "__main__":
  main()
