"""CPU throughput of the ssljax train step, its parts, the input pipeline and a PyTorch twin.

Run from the repository root:

  python benchmarks/cpu_step.py [--config configs/simclr.py:fashion_mnist] [--steps N]
      [--out benchmarks/results/cpu_step.json] [--sweep-flags] [--breakdown]

What one run measures, on the config's model and global batch (the default job: 256 images,
two 28x28x1 views each, so 512 views through encoder + projector + NT-Xent + optimiser):

  1. the compiled ssljax train step (augmentation on device included) in images/s, once with
     ``ssljax.cli.CPU_XLA_FLAGS`` (what ``ssljax train`` sets) and once with no XLA flags;
  2. in the same processes, the same step fed precomputed views (augmentation removed) and the
     jitted augmentation policy alone, giving augmentation's share of the step;
  3. ``HostLoader`` over the real train split plus ``to_global_array``: images/s the host
     delivers, and its ratio to what the train step consumes;
  4. an equivalent PyTorch CPU step (same architecture, fed views, the config's optimiser:
     LARS for the default job, written out in ``_torch_lars_class`` as ssljax's, since PyTorch
     has none), in the default and the channels_last memory formats, plus channels_last with
     plain SGD (PyTorch's cheapest step, which earlier versions of this script compared
     against); skipped with a note when torch is not installed;
  5. with ``--sweep-flags``: the full step compiled under a list of XLA:CPU flag sets in one
     process and timed interleaved, then the fastest set again as in 1; with
     ``--breakdown``: forward only, forward + backward, with and without BatchNorm, the
     optimiser's share and a profile by operation category, for CPU_XLA_FLAGS and the sweep's
     best set (or no flags), next to PyTorch's forward / backward and top operators.

XLA reads ``XLA_FLAGS`` once, when JAX initialises its CPU backend, so every JAX configuration
of 1-3 runs in its own subprocess (this file re-invoked with ``--worker``), which writes its
numbers as JSON; the parent collects them, prints a table and writes one JSON file. The sweep
instead hands each flag set to ``Lowered.compile(compiler_options=...)``, which sets the same
compiler options per compilation, so that all sets share one process. Timings are medians of
per-call wall times (each call waits for its result); variants compared within a process are
interleaved call by call, so a burst of load from other jobs hits them alike. Ratios taken
inside one process are the robust numbers on a shared machine; absolute images/s move with
the load average, which the JSON records next to every worker. PyTorch suffers most from a
busy machine (its two OpenMP threads wait for each other at every operator), so compare it
only from a run on an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

DEFAULT_CONFIG = os.path.join("configs", "simclr.py") + ":fashion_mnist"
DEFAULT_OUT = os.path.join("benchmarks", "results", "cpu_step.json")
AUG_SHARE_TARGET = 0.15
PIPELINE_RATIO_TARGET = 5.0
WORKER_TIMEOUT_S = 1800


def cli_xla_flags() -> str:
  """The XLA flags ``ssljax train`` sets on CPU (read from ssljax.cli, not copied)."""
  from ssljax.cli import CPU_XLA_FLAGS
  return CPU_XLA_FLAGS


def sweep_flag_sets() -> list[tuple[str, str]]:
  """(name, XLA_FLAGS) pairs tried by ``--sweep-flags``; CPU_XLA_FLAGS is also split up.

  Checked against this jaxlib (``XLA_FLAGS=--help`` and the optimised HLO): by default XLA:CPU
  hands convolutions, dots and reductions to YNNPACK (XNNPACK's successor; the default YNN
  fusion list is individual_convolution, individual_dot, reduce), and a list given without
  +/- prefixes replaces it; removing individual_convolution falls back to Eigen convolutions.
  XNN and oneDNN fusion types are dot, eltwise, reduce. Lists are written out in full (no
  +/- edits of the default) so that they mean the same under another jaxlib.
  oneDNN *fusions* (``xla_cpu_experimental_onednn_fusion_type``) are left out: with this
  jaxlib they crash the process at random ("partition compile failed"). So are fast math's
  ``honor_nans`` / ``honor_infs`` = false: they let XLA assume finite values, and the train
  loop's check for a non-finite loss relies on seeing them.
  """
  cli = cli_xla_flags()
  parts = cli.split()
  ynn = "--xla_cpu_experimental_ynn_fusion_type="
  fast = "--xla_cpu_enable_fast_math=true"
  sets = [("none (XLA defaults)", ""), ("cli (CPU_XLA_FLAGS)", cli)]
  if len(parts) > 1:
    sets += [(f"cli part: {part.lstrip('-').split('=')[0]}", part) for part in parts]
  sets += [
      ("xnn graph fusion GREEDY_SLINKY",
       "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY"),
      ("xnn fusion dot,eltwise,reduce",
       "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce"),
      ("ynn conv,dot,reduce + eltwise",
       ynn + "individual_convolution,individual_dot,reduce,eltwise"),
      ("ynn conv,dot (reduce off)", ynn + "individual_convolution,individual_dot"),
      ("ynn dot,reduce (Eigen convs)", ynn + "individual_dot,reduce"),
      ("ynn dot,reduce (Eigen convs) + fast math", f"{ynn}individual_dot,reduce {fast}"),
      ("ynn dot,reduce (Eigen convs) + cli", f"{ynn}individual_dot,reduce {cli}"),
      ("ynn off (Eigen convs and dots)", ynn),
      ("onednn", "--xla_cpu_use_onednn=true"),
      ("no xnnpack", "--xla_cpu_use_xnnpack=false"),
      ("prefer vector width 512", "--xla_cpu_prefer_vector_width=512"),
      ("prefer vector width 128", "--xla_cpu_prefer_vector_width=128"),
      ("single-threaded Eigen", "--xla_cpu_multi_thread_eigen=false"),
      # Scheduling and code generation, each on top of the CLI's flags.
      ("cli + concurrency-optimised scheduler",
       f"{cli} --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"),
      ("cli + memory-optimised scheduler",
       f"{cli} --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"),
      ("cli + FAST_RUNTIME preset", f"{cli} --xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME"),
      ("cli + legacy emitters (fusion emitters off)",
       f"{cli} --xla_cpu_use_fusion_emitters=false"),
      ("cli + tiling propagation", f"{cli} --xla_cpu_experimental_enable_tiling_propagation=true"),
      ("cli + reciprocal division, approximate functions",
       f"{cli} --xla_cpu_fast_math_honor_division=false "
       "--xla_cpu_fast_math_honor_functions=false"),
  ]
  return sets


def xla_flags_to_options(flags: str) -> dict[str, Any]:
  """An ``XLA_FLAGS`` string as ``compiler_options`` for ``jax.stages.Lowered.compile``.

  Options given per compilation set the same DebugOptions fields as XLA_FLAGS (the sweep
  checks that the 'cli' set compiles to the same HLO as the CLI-flags subprocess). Fusion-type
  lists become comma-separated enum names; explicit lists only (no +/- edits).
  """
  options: dict[str, Any] = {}
  for token in flags.split():
    name, _, value = token.lstrip("-").partition("=")
    if name.endswith("_fusion_type"):
      items = [item for item in value.split(",") if item]
      if any(item[0] in "+-" for item in items):
        raise ValueError(f"{token}: give the full fusion-type list, not +/- edits")
      options[name] = ",".join(f"LIBRARY_FUSION_TYPE_{item.upper()}" for item in items)
    elif value in ("true", "false"):
      options[name] = value == "true"
    elif value.lstrip("-").isdigit():
      options[name] = int(value)
    else:
      options[name] = value
  return options


def hlo_digest(compiled) -> dict[str, Any]:
  """A hash of the optimised HLO and its library-fusion counts.

  Source locations (the stack-frame tables, ``metadata`` and ``stack_frame_id``) are dropped
  first, so the same program compiled by different scripts hashes the same.
  """
  import hashlib
  import re
  text = compiled.as_text()
  text = re.sub(r"metadata=\{[^}]*\}|,? ?stack_frame_id=\d+", "", text)
  text = "\n".join(line for line in text.splitlines()
                   if not re.match(r"^(\d+ |FileNames|FunctionNames|FileLocations|StackFrames)",
                                   line))
  return {"sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
          "ynn_fusions": text.count('"__ynn_fusion"'),
          "xnn_fusions": text.count('"__xnn_fusion"'),
          "onednn_fusions": text.count('"__onednn_fusion"')}


# ---------------------------------------------------------------------------- timing helpers


def timed_interleaved(calls: dict[str, Callable[[], Any]], steps: int,
                      warmup: int = 2) -> dict[str, dict[str, float]]:
  """Times each zero-argument callable `steps` times, interleaving them call by call.

  Every call's result is waited for (``block``) before the clock stops. Returns, per name,
  the median / mean / min wall seconds per call and the median process CPU seconds (which
  other jobs on the machine disturb less than wall time; both threads busy = 2x wall).
  """
  for fn in calls.values():
    for _ in range(warmup):
      block(fn())
  wall: dict[str, list[float]] = {name: [] for name in calls}
  cpu: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(steps):
    for name, fn in calls.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      block(fn())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return {name: summarize(wall[name], cpu[name]) for name in calls}


def summarize(wall: list[float], cpu: list[float]) -> dict[str, float]:
  """Wall-time statistics plus the median CPU time of the process (all its threads)."""
  return {"median_s": statistics.median(wall), "mean_s": statistics.fmean(wall),
          "min_s": min(wall), "cpu_median_s": statistics.median(cpu), "calls": len(wall)}


def block(result: Any) -> None:
  """Waits for JAX arrays (and is a no-op for anything else, e.g. torch results)."""
  if "jax" in sys.modules:
    import jax
    jax.block_until_ready(result)


def load_average() -> list[float]:
  """The 1, 5 and 15-minute load averages."""
  return [round(v, 2) for v in os.getloadavg()]


def load_config(spec: str):
  """The config of ``path[:arg]``, as ``ssljax train --config`` would load it."""
  from ssljax import config
  return config.load_config(spec)


# ---------------------------------------------------------------------------- JAX worker


def given_views_policy(num_views: int):
  """A stand-in policy that returns views already stacked as ``[n, num_views, h, w, c]``."""

  def policy(keys, views):
    del keys
    return tuple(views[:, v] for v in range(num_views))

  return policy


class JaxSetup:
  """Method, optimiser, policy, mesh and a real batch built as ``ssljax.train.loop`` does."""

  def __init__(self, config):
    import jax
    import numpy as np
    from ssljax import augment, data
    from ssljax.methods import build_method
    from ssljax.parallel import DATA_AXIS, data_sharded, make_mesh
    from ssljax.train.optim import build_optimizer, build_schedule

    self.config = config
    self.mesh = make_mesh()
    self.batch_size = config.train.batch_size
    self.source = data.build_source(config.data, config.data.train_split)
    steps_per_epoch = len(self.source) // self.batch_size
    self.schedule = build_schedule(config.optim, global_batch=self.batch_size,
                                   total_steps=steps_per_epoch * 10,
                                   steps_per_epoch=steps_per_epoch)
    self.tx = build_optimizer(config.optim, self.schedule)
    self.policy = augment.build_policy(config.augment, config.data.mean)
    self.method = build_method(config, axis_name=DATA_AXIS)
    self.image_shape = tuple(self.source.image_shape)
    self.data_sharding = data_sharded(self.mesh)
    examples = self.source.get(np.arange(self.batch_size))
    self.images = jax.device_put(examples["image"], self.data_sharding)
    self.index = jax.device_put(np.arange(self.batch_size, dtype=np.int32), self.data_sharding)
    self.label = jax.device_put(np.asarray(examples["label"], np.int32), self.data_sharding)

  def init_state(self):
    """A fresh replicated train state, as the train loop initialises it."""
    import jax
    from ssljax.parallel import replicated
    from ssljax.train.step import init_train_state
    init = jax.jit(functools.partial(init_train_state, self.method, self.tx, self.policy,
                                     self.image_shape, self.config.seed),
                   out_shardings=replicated(self.mesh))
    return init()

  def augment_fn(self):
    """The jitted policy on the batch, with per-row keys derived as in the train step."""
    import jax
    import jax.numpy as jnp
    policy, n = self.policy, self.batch_size

    def run(key, images):
      keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
      return policy(keys, images)

    return jax.jit(run)

  def views(self):
    """Augmented views of the batch stacked ``[B, V, h, w, c]`` (inputs of the no-aug step)."""
    import jax
    import jax.numpy as jnp
    views = self.augment_fn()(jax.random.PRNGKey(1), self.images)
    return jax.device_put(jnp.stack(views, axis=1), self.data_sharding)


def jax_step_worker(config, steps: int) -> dict[str, Any]:
  """Full step, step on given views, augmentation alone: compile time and interleaved timing."""
  import jax
  from ssljax.train.step import compile_train_step, make_per_device_step

  setup = JaxSetup(config)
  full_step = compile_train_step(
      make_per_device_step(setup.method, setup.tx, setup.policy, setup.schedule), setup.mesh)
  no_aug_step = compile_train_step(
      make_per_device_step(setup.method, setup.tx, given_views_policy(setup.policy.num_views),
                           setup.schedule), setup.mesh)
  augment = setup.augment_fn()
  views = setup.views()
  states = {"full": setup.init_state(), "no_aug": setup.init_state()}
  param_count = sum(int(leaf.size) for leaf in jax.tree.leaves(states["full"].params))
  aug_key = jax.random.PRNGKey(2)

  compile_s, compiled = {}, {}
  for name, fn, args in (
      ("full_step", full_step, (states["full"], setup.images, setup.index, setup.label)),
      ("no_aug_step", no_aug_step, (states["no_aug"], views, setup.index, setup.label)),
      ("augment", augment, (aug_key, setup.images))):
    start = time.perf_counter()
    compiled[name] = fn.lower(*args).compile()
    compile_s[name] = round(time.perf_counter() - start, 2)

  def run_full():
    states["full"], metrics = compiled["full_step"](states["full"], setup.images, setup.index,
                                                    setup.label)
    return metrics

  def run_no_aug():
    states["no_aug"], metrics = compiled["no_aug_step"](states["no_aug"], views, setup.index,
                                                        setup.label)
    return metrics

  timings = timed_interleaved({"full_step": run_full, "no_aug_step": run_no_aug,
                               "augment": lambda: compiled["augment"](aug_key, setup.images)},
                              steps)
  loss = float(jax.device_get(run_full()["train/loss"]))
  return {"batch_size": setup.batch_size, "views": setup.policy.num_views,
          "view_shape": list(views.shape[2:]), "compile_s": compile_s, "timings": timings,
          "full_step_hlo": hlo_digest(compiled["full_step"]), "param_count": param_count,
          "final_loss": loss, "devices": jax.device_count()}


def jax_sweep_worker(config, steps: int) -> dict[str, Any]:
  """The full step compiled under every `sweep_flag_sets` entry in one process, interleaved.

  Run with ``XLA_FLAGS`` empty; each flag set reaches the compiler as ``compiler_options``, so
  all variants share the process and are timed call by call in turn, which keeps load from
  other jobs from favouring one of them.
  """
  from ssljax.train.step import compile_train_step, make_per_device_step

  setup = JaxSetup(config)
  step = compile_train_step(
      make_per_device_step(setup.method, setup.tx, setup.policy, setup.schedule), setup.mesh)
  states, compiled, results, calls = {}, {}, {}, {}
  for name, flags in sweep_flag_sets():
    states[name] = setup.init_state()
    start = time.perf_counter()
    try:
      lowered = step.lower(states[name], setup.images, setup.index, setup.label)
      compiled[name] = lowered.compile(compiler_options=xla_flags_to_options(flags) or None)
    except Exception as error:  # pylint: disable=broad-except  (reported, sweep goes on)
      results[name] = {"xla_flags": flags, "error": f"{type(error).__name__}: {error}"[:300]}
      continue
    results[name] = {"xla_flags": flags, "compile_s": round(time.perf_counter() - start, 2),
                     "hlo": hlo_digest(compiled[name])}

    def run(name=name):
      states[name], metrics = compiled[name](states[name], setup.images, setup.index,
                                             setup.label)
      return metrics

    calls[name] = run
  for name, timing in timed_interleaved(calls, steps).items():
    results[name]["timings"] = {"full_step": timing}
  load_during = load_average()
  timed = {n: r for n, r in results.items() if "timings" in r}
  conv_layers = None
  if timed:
    best = min(timed, key=lambda n: timed[n]["timings"]["full_step"]["median_s"])
    if timed[best]["xla_flags"]:
      conv_layers = {"sets": {"none": "", "best": timed[best]["xla_flags"]},
                     "layers": conv_layer_ab(setup, {"none": "", "best": timed[best]["xla_flags"]},
                                             max(steps, 5))}
  return {"sets": [{"name": name, **result} for name, result in results.items()],
          "load_during": load_during, "conv_layers": conv_layers}


def encoder_convolutions(setup: JaxSetup) -> list[dict[str, Any]]:
  """Every distinct convolution the encoder runs on the step's views (input shape, geometry).

  Recorded by a Flax interceptor while the encoder is traced (``jax.eval_shape``, nothing is
  computed) on ``views x batch`` rows, the batch the train step convolves.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  found: list[dict[str, Any]] = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__":
      layer = {"input": list(args[0].shape), "kernel": list(module.kernel_size),
               "features": module.features, "strides": list(module.strides or (1, 1)),
               "padding": module.padding if isinstance(module.padding, str)
                          else [list(p) for p in module.padding]}
      if layer not in found:
        found.append(layer)
    return next_fun(*args, **kwargs)

  # The views' shape, not the stored images': the default job crops 28 px images to 20 px.
  view_shape = jax.eval_shape(setup.augment_fn(), jax.random.PRNGKey(0), setup.images)[0].shape
  rows = setup.batch_size * setup.policy.num_views
  x = jnp.zeros((rows, *view_shape[1:]), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: setup.method.encoder.init(jax.random.PRNGKey(0), x, train=False))
  return found


def conv_layer_ab(setup: JaxSetup, flag_sets: dict[str, str], steps: int
                  ) -> list[dict[str, Any]]:
  """Forward, input-gradient and weight-gradient time of each encoder convolution, per set.

  Each convolution is compiled alone under every flag set (as ``compiler_options``) and all
  variants are timed interleaved; returns one row per layer with median ms per part and set.
  """
  import jax
  import jax.numpy as jnp
  from jax import lax

  rows = []
  for layer in encoder_convolutions(setup):
    cin, cout = layer["input"][-1], layer["features"]
    padding = layer["padding"] if isinstance(layer["padding"], str) else [
        tuple(p) for p in layer["padding"]]

    def conv(x, w, layer=layer, padding=padding):
      return lax.conv_general_dilated(x, w, tuple(layer["strides"]), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jnp.ones(layer["input"], jnp.float32)
    w = jnp.ones((*layer["kernel"], cin, cout), jnp.float32) * 0.01
    g = jnp.ones(jax.eval_shape(conv, x, w).shape, jnp.float32)
    parts = {
        "forward": (conv, (x, w)),
        "input_grad": (lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                       (x, w, g)),
        "weight_grad": (lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
                        (x, w, g)),
    }
    calls = {}
    for set_name, flags in flag_sets.items():
      for part, (fn, args) in parts.items():
        compiled = jax.jit(fn).lower(*args).compile(
            compiler_options=xla_flags_to_options(flags) or None)
        calls[(set_name, part)] = functools.partial(compiled, *args)
    timings = timed_interleaved({f"{k[0]}|{k[1]}": v for k, v in calls.items()}, steps)
    rows.append({**layer, "ms": {key: 1000 * t["median_s"] for key, t in timings.items()}})
  return rows


def jax_pipeline_worker(config, steps: int) -> dict[str, Any]:
  """``HostLoader`` + ``to_global_array`` for image, index and label, as the train loop does."""
  import jax
  from ssljax import data
  from ssljax.parallel import data_sharded, make_mesh

  mesh = make_mesh()
  spec = data_sharded(mesh).spec
  source = data.build_source(config.data, config.data.train_split)
  batches = max(4 * steps, 40)
  loader = data.HostLoader(source, global_batch=config.train.batch_size, seed=config.seed,
                           prefetch=config.data.prefetch)
  try:
    first = next(loader)
    jax.block_until_ready(data.to_global_array(first["image"], mesh, spec))
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(loader)
      arrays = [data.to_global_array(batch[k], mesh, spec) for k in ("image", "index", "label")]
      jax.block_until_ready(arrays)
    elapsed = time.perf_counter() - start
  finally:
    loader.close()
  return {"batches": batches, "batch_size": config.train.batch_size, "seconds": elapsed,
          "images_per_s": batches * config.train.batch_size / elapsed,
          "prefetch": config.data.prefetch, "num_examples": len(source)}


def _without_batchnorm():
  """A Flax interceptor context in which every ``nn.BatchNorm`` returns its input unchanged."""
  import flax.linen as nn

  def skip_batchnorm(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      return args[0]
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(skip_batchnorm)


class HloInstruction(NamedTuple):
  """One instruction of an HLO module as XLA prints it: its result's shape text, opcode, the
  rest of the line (operands, attributes, metadata) and the computation it calls, if any."""
  name: str
  shape: str
  opcode: str
  rest: str
  called: str | None


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[HloInstruction]], str | None]:
  """The computations of an HLO module's text, each a list of its instructions in order, and
  the name of the entry computation (None if the text has none)."""
  import re
  computations: dict[str, list[HloInstruction]] = {}
  entry = current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    inst = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$", line)
    if inst and current is not None:
      name, shape, opcode, rest = inst.groups()
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      computations[current].append(
          HloInstruction(name, shape, opcode, rest, called.group(1) if called else None))
  return computations, entry


def categorize_hlo(hlo_text: str, rows: int) -> dict[str, str]:
  """Maps each instruction of a compiled HLO module to a cost category.

  A fusion takes the category of what it calls: a convolution whose output's leading
  dimension is not the number of rows (views) is a weight gradient (XLA rewrites it as a
  convolution over the batch, with the activations transposed to ``[C, H, W, B]``); one whose
  ``op_name`` contains ``transpose(`` is an input gradient; any other is a forward
  convolution. Then dot, reduce (BN statistics, pooling, loss), transpose / copy, collectives,
  and elementwise / other.
  """
  import re
  computations, _ = parse_hlo(hlo_text)
  instructions = {inst.name: inst for body in computations.values() for inst in body}

  def category(name: str) -> str:
    inst = instructions[name]
    body = computations.get(inst.called, []) if inst.opcode == "fusion" else [inst]
    opcodes = {op.opcode for op in body}
    for op in body:
      if op.opcode == "convolution":
        leading = re.match(r"\w+\[(\d+)", op.shape)
        if leading and int(leading.group(1)) != rows:
          return "conv weight-grad"
        return "conv input-grad" if "transpose(" in op.rest else "conv forward"
    if "dot" in opcodes:
      return "dot (matmul)"
    if opcodes & {"reduce", "reduce-window"}:
      return "reduce (BN stats, pool, loss)"
    if (opcodes <= {"transpose", "copy", "bitcast", "parameter", "reverse"}
        or name.startswith(("transpose", "copy"))):
      return "transpose / copy"
    if opcodes & {"all-reduce", "all-gather", "collective-permute"}:
      return "collective"
    return "elementwise / other"

  return {name: category(name) for name in instructions}


def profile_categories(compiled, run: Callable[[], Any], calls: int, rows: int
                       ) -> dict[str, float]:
  """Thunk time per step (ms, summed over threads) by `categorize_hlo` category.

  Traces `calls` runs with ``jax.profiler`` and matches the trace events to the compiled
  module's instruction names. Library fusions (YNNPACK) and XLA's own kernels leave events;
  Eigen convolutions do not, so the wall time the events leave unexplained is reported as
  "untraced" (thunks on both threads can overlap, so the categories may add up to slightly
  more than the wall time).
  """
  import glob
  import shutil
  import jax
  categories = categorize_hlo(compiled.as_text(), rows)
  trace_dir = tempfile.mkdtemp(prefix="ssljax_trace_")
  try:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      for _ in range(calls):
        block(run())
      elapsed = time.perf_counter() - start
    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    profile = jax.profiler.ProfileData.from_file(path)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  totals: dict[str, float] = {}
  wall_ms = 1000 * elapsed / calls
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in categories:
          key = categories[event.name]
          totals[key] = totals.get(key, 0.0) + event.duration_ns / 1e6 / calls
  totals["untraced (Eigen convolutions, ...)"] = max(0.0, wall_ms - sum(totals.values()))
  totals = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
  totals["wall time of a traced step"] = wall_ms
  return totals


def jax_breakdown_worker(config, steps: int) -> dict[str, Any]:
  """Forward, forward+backward (with / without BatchNorm), the step on given views, a profile.

  The loss is the method's loss (encoder + projector + NT-Xent, training-mode BN) on one
  device, without collectives. "Without BatchNorm" runs the same modules with every BN call
  replaced by the identity (a Flax method interceptor, so the architecture code is untouched;
  the BN parameters stay in the tree and get zero gradients), which isolates what
  normalisation costs in the forward and the backward pass. The step is then profiled and its
  thunk time split by `categorize_hlo` category.
  """
  import jax
  import jax.numpy as jnp
  from ssljax.methods import build_method
  from ssljax.train.step import compile_train_step, make_per_device_step

  setup = JaxSetup(config)
  method = build_method(config, axis_name=None)
  views = setup.views()
  view_tuple = tuple(views[:, v] for v in range(views.shape[1]))
  batch = {"views": view_tuple, "index": setup.index, "label": setup.label}
  key = jax.random.PRNGKey(3)
  step = jnp.zeros((), jnp.int32)

  def loss_value(params, method_state):
    return method.loss(params, method_state, batch, key=key, step=step, axis_name=None)[0]

  params, method_state = method.init(key, view_tuple)

  def no_bn(fn):
    def traced_without_bn(*args):
      with _without_batchnorm():
        return fn(*args)
    return jax.jit(traced_without_bn)

  grad = jax.value_and_grad(loss_value)
  fns = {
      "forward": (jax.jit(loss_value), (params, method_state)),
      "forward_backward": (jax.jit(grad), (params, method_state)),
      "forward_no_bn": (no_bn(loss_value), (params, method_state)),
      "forward_backward_no_bn": (no_bn(grad), (params, method_state)),
  }
  no_aug_step = compile_train_step(
      make_per_device_step(setup.method, setup.tx, given_views_policy(setup.policy.num_views),
                           setup.schedule), setup.mesh)
  state = {"s": setup.init_state()}
  compiled_step = no_aug_step.lower(state["s"], views, setup.index, setup.label).compile()

  def run_step():
    state["s"], metrics = compiled_step(state["s"], views, setup.index, setup.label)
    return metrics

  calls = {name: functools.partial(fn, *args) for name, (fn, args) in fns.items()}
  calls["no_aug_step"] = run_step
  timings = timed_interleaved(calls, steps)
  rows = setup.batch_size * setup.policy.num_views
  profile = profile_categories(compiled_step, run_step, max(3, min(steps, 5)), rows)
  return {"timings": timings, "batch_size": setup.batch_size,
          "profile_ms_per_step": profile}


# ---------------------------------------------------------------------------- PyTorch worker


def torch_worker(config, steps: int, breakdown: bool) -> dict[str, Any]:
  """Times `torch_calls` interleaved (and profiles the steps with `breakdown`)."""
  calls, results = torch_calls(config, breakdown)
  if not calls:
    return results
  results["timings"] = timed_interleaved(calls, steps)
  if breakdown:
    results["profile_ms_per_step"] = {
        layout: torch_profile(calls[f"step_{layout}"], max(3, min(steps, 5)))
        for layout in ("default", "channels_last")}
  return results


def torch_calls(config, breakdown: bool) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
  """The same SimCLR step in PyTorch on precomputed views; default and channels_last layouts.

  Returns zero-argument callables (``step_<layout>``, plus ``forward_<layout>`` and
  ``forward_backward_<layout>`` with `breakdown`) and facts about the model.
  """
  import torch
  from torch import nn
  from torch.nn import functional as F
  from ssljax.models.resnet import PRESETS, BasicBlock

  torch.set_num_threads(2)
  torch.manual_seed(0)
  TorchLARS = _torch_lars_class()
  preset = PRESETS[config.model.encoder]
  if preset.block is not BasicBlock or not config.model.cifar_stem:
    return {}, {"skipped": "the PyTorch twin covers BasicBlock presets with the 3x3 stem only"}
  width = config.model.width
  hp = config.method.simclr
  channels = config.data.channels
  size = config.augment.crop_size
  views_per_image = 2
  rows = views_per_image * config.train.batch_size

  class TorchBasicBlock(nn.Module):
    """torchvision's BasicBlock: 3x3 (strided) - BN - ReLU - 3x3 - BN, 1x1 conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.shortcut = None
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))

  class TorchSimCLR(nn.Module):
    """Standardisation, stem, stages, optional 1x1 expansion, global pool, MLP projector."""

    def __init__(self):
      super().__init__()
      self.register_buffer("mean", torch.tensor(config.data.mean).view(1, -1, 1, 1))
      self.register_buffer("std", torch.tensor(config.data.std).view(1, -1, 1, 1))
      stem = int(round(preset.stem_width * width))
      layers = [nn.Conv2d(channels, stem, 3, preset.stem_stride, 1, bias=False),
                nn.BatchNorm2d(stem), nn.ReLU()]
      cin = stem
      for i, (blocks, base) in enumerate(zip(preset.stage_sizes, preset.stage_widths)):
        cout = int(round(base * width))
        for j in range(blocks):
          layers.append(TorchBasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1))
          cin = cout
      expand = config.model.get("expand_features", 0)
      if expand:
        layers += [nn.Conv2d(cin, expand, 1, bias=False), nn.BatchNorm2d(expand), nn.ReLU()]
        cin = expand
      self.encoder = nn.Sequential(*layers)
      head = []
      for _ in range(hp.proj_layers - 1):
        head += [nn.Linear(cin, hp.proj_hidden_dim), nn.BatchNorm1d(hp.proj_hidden_dim),
                 nn.ReLU()]
        cin = hp.proj_hidden_dim
      head.append(nn.Linear(cin, hp.proj_dim))
      if hp.proj_last_bn:
        head.append(nn.BatchNorm1d(hp.proj_dim, affine=False))
      self.projector = nn.Sequential(*head)

    def forward(self, x):
      h = self.encoder((x - self.mean) / self.std).mean(dim=(2, 3))
      return self.projector(h)

  def nt_xent(z):
    """NT-Xent over 2n rows (views stacked [a; b]), the anchor itself excluded."""
    z = F.normalize(z, dim=1)
    n = z.shape[0] // 2
    logits = (z @ z.t()) / hp.temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(logits, targets)

  o = config.optim
  results: dict[str, Any] = {"torch_version": torch.__version__, "threads":
                             torch.get_num_threads(), "rows": rows,
                             "mkldnn": torch.backends.mkldnn.is_available(),
                             "optimizer": o.name if o.name == "lars" else "sgd"}

  def make_optimizer(model, name):
    if name == "lars":
      return TorchLARS(list(model.parameters()), lr=0.1, momentum=o.momentum,
                       weight_decay=o.weight_decay, eta=o.lars_eta,
                       exclude_bias_and_norm=o.lars_exclude_bias_and_norm)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=o.momentum,
                           weight_decay=o.weight_decay)

  calls: dict[str, Callable[[], Any]] = {}
  # The config's optimiser in both layouts (LARS for the default job, as ssljax's step), and
  # plain SGD in channels_last, the cheapest PyTorch step, as a lower bound on its time.
  variants = [("default", results["optimizer"]), ("channels_last", results["optimizer"])]
  if results["optimizer"] != "sgd":
    variants.append(("channels_last", "sgd"))
  for layout, optimizer_name in variants:
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = TorchSimCLR().to(memory_format=memory_format).train()
    results["param_count"] = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, optimizer_name)
    # Both views of every image stacked [a; b] (compute does not depend on the pixel values).
    views = torch.rand(rows, channels, size, size).contiguous(memory_format=memory_format)

    def step(model=model, optimizer=optimizer, views=views):
      optimizer.zero_grad(set_to_none=True)
      loss = nt_xent(model(views))
      loss.backward()
      optimizer.step()
      return loss.item()

    suffix = "" if optimizer_name == results["optimizer"] else f"_{optimizer_name}"
    calls[f"step_{layout}{suffix}"] = step
    if suffix:
      continue
    if breakdown:
      def forward(model=model, views=views):
        with torch.no_grad():
          return nt_xent(model(views)).item()

      def forward_backward(model=model, views=views):
        model.zero_grad(set_to_none=True)
        loss = nt_xent(model(views))
        loss.backward()
        return loss.item()

      calls[f"forward_{layout}"] = forward
      calls[f"forward_backward_{layout}"] = forward_backward
  return calls, results


def _torch_lars_class():
  """LARS as ssljax's ``optim.name = 'lars'`` (Barlow Twins / BYOL PyTorch code): for every
  tensor of rank > 1 (all tensors unless ``exclude_bias_and_norm``) the update direction is
  ``g + wd * theta`` scaled by ``eta * |theta| / |g + wd * theta|`` (1 where a norm is 0); other
  tensors take ``g`` unscaled and undecayed; then heavy-ball momentum and the learning rate."""
  import torch

  class TorchLARS(torch.optim.Optimizer):
    def __init__(self, params, *, lr, momentum, weight_decay, eta, exclude_bias_and_norm):
      super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                    eta=eta, exclude=exclude_bias_and_norm))

    @torch.no_grad()
    def step(self):
      for group in self.param_groups:
        for p in group["params"]:
          if p.grad is None:
            continue
          g = p.grad
          if p.ndim > 1 or not group["exclude"]:
            g = g.add(p, alpha=group["weight_decay"])
            p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
            trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm,
                                torch.ones_like(p_norm))
            g = g.mul(trust)
          state = self.state[p]
          if "momentum" not in state:
            state["momentum"] = torch.clone(g)
          else:
            state["momentum"].mul_(group["momentum"]).add_(g)
          p.add_(state["momentum"], alpha=-group["lr"])

  return TorchLARS


def torch_profile(step: Callable[[], Any], calls: int, top: int = 10) -> dict[str, float]:
  """Self CPU time per step (ms) of the `top` most expensive PyTorch operators."""
  import torch
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(calls):
      step()
  averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
  return {e.key: e.self_cpu_time_total / 1000 / calls for e in averages}


# ---------------------------------------------------------------------------- orchestration


def run_worker(kind: str, xla_flags: str | None, args) -> dict[str, Any]:
  """Runs this file as a ``--worker kind`` subprocess with ``XLA_FLAGS=xla_flags``."""
  env = dict(os.environ)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
    out_path = handle.name
  command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--config",
             args.config, "--steps", str(args.steps), "--worker-out", out_path]
  if args.breakdown:
    command.append("--breakdown")
  load_before = load_average()
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=WORKER_TIMEOUT_S, check=False)
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
      return {"error": f"worker {kind} exited with {proc.returncode}", "stderr_tail": tail,
              "xla_flags": xla_flags}
    with open(out_path) as f:
      result = json.load(f)
  except subprocess.TimeoutExpired:
    return {"error": f"worker {kind} timed out after {WORKER_TIMEOUT_S}s",
            "xla_flags": xla_flags}
  finally:
    os.unlink(out_path)
  result.update({"xla_flags": xla_flags, "load_before": load_before,
                 "load_after": load_average(),
                 "wall_s": round(time.perf_counter() - start, 1)})
  return result


def sweep_baselines(timed: dict[str, dict[str, Any]], cli_flags: str
                    ) -> tuple[str | None, str | None]:
  """The sweep rows the others are compared with: the first set with no flags and the first
  with exactly the CLI's. Later sets can repeat those flags (e.g. "ynn dot,reduce (Eigen convs)
  + fast math" is the CLI's pair), and taking the last such row made a slower duplicate the
  baseline."""
  first: dict[str, str] = {}
  for name, row in timed.items():
    first.setdefault(row["xla_flags"], name)
  return first.get(""), first.get(cli_flags)


def vector_isa() -> list[str]:
  """The x86 vector extensions XLA:CPU and PyTorch pick kernels by (AVX2, AVX-512, AMX).

  Two CPUs sold under one model name can differ here, and with them the step's speed and
  even its rounding, so results name them.
  """
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return []
  return [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags]


def device_description() -> dict[str, Any]:
  """CPU, versions, date and load, for the JSON header."""
  from importlib import metadata
  model_name = ""
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                       if line.startswith("Model name")), "")
  except OSError:
    pass
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  try:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout
  except OSError:
    uptime = ""
  return {"processor": platform.processor(), "cpu_model": model_name,
          "cpu_vector_isa": vector_isa(), "cpu_count": os.cpu_count(),
          "machine": platform.machine(),
          "python": platform.python_version(), "versions": versions,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "load_average_at_start": load_average(), "uptime_at_start": uptime.strip()}


def images_per_s(result: dict[str, Any], name: str, batch_size: int) -> float | None:
  """Images per second of timing `name` in a worker result (median wall time), or None."""
  timing = result.get("timings", {}).get(name)
  return batch_size / timing["median_s"] if timing else None


def ms(result: dict[str, Any], name: str) -> float | None:
  """Median wall milliseconds of timing `name` in a worker result, or None."""
  timing = result.get("timings", {}).get(name)
  return 1000 * timing["median_s"] if timing else None


JAX_LABELS = {"cli": "CPU_XLA_FLAGS", "none": "no flags", "best": "sweep's best"}


def summarize_run(report: dict[str, Any], batch_size: int) -> dict[str, Any]:
  """The headline numbers and ratios from the workers' raw timings."""
  s: dict[str, Any] = {"jax": {}}
  for tag, result in report["jax"].items():
    if "timings" not in result:
      continue
    full, no_aug, aug = (ms(result, k) for k in ("full_step", "no_aug_step", "augment"))
    s["jax"][tag] = {
        "xla_flags": result["xla_flags"],
        "full_step_images_per_s": batch_size / full * 1000,
        "no_aug_step_images_per_s": batch_size / no_aug * 1000,
        "full_step_ms": full, "no_aug_step_ms": no_aug, "augment_ms": aug,
        "augment_share_standalone": aug / full,
        "augment_share_in_step": 1 - no_aug / full,
    }
  jax_runs = s["jax"]
  if "none" in jax_runs:
    for tag in jax_runs:
      jax_runs[tag]["speedup_vs_no_flags"] = (
          jax_runs[tag]["full_step_images_per_s"] / jax_runs["none"]["full_step_images_per_s"])
  pipeline = report.get("pipeline", {})
  if "images_per_s" in pipeline and "cli" in jax_runs:
    s["pipeline_images_per_s"] = pipeline["images_per_s"]
    s["pipeline_to_step_ratio"] = (pipeline["images_per_s"]
                                   / jax_runs["cli"]["full_step_images_per_s"])
  torch_result = report.get("torch", {})
  if "timings" in torch_result:
    t = {layout: images_per_s(torch_result, f"step_{layout}", batch_size)
         for layout in ("default", "channels_last")}
    best = max(t, key=t.get)  # among the steps with the config's optimiser
    if "step_channels_last_sgd" in torch_result["timings"]:
      t["channels_last_sgd"] = images_per_s(torch_result, "step_channels_last_sgd", batch_size)
    s["torch"] = {"step_images_per_s": t, "best_layout": best,
                  "optimizer": torch_result.get("optimizer", "sgd"), "ratios": {}}
    for tag, run in jax_runs.items():
      s["torch"]["ratios"][tag] = {
          "a_full_step_vs_torch_no_aug": {k: run["full_step_images_per_s"] / v
                                          for k, v in t.items()},
          "b_no_aug_step_vs_torch_no_aug": {k: run["no_aug_step_images_per_s"] / v
                                            for k, v in t.items()},
      }
  sweep = report.get("sweep", {})
  timed = {r["name"]: r for r in sweep.get("sets", []) if "timings" in r}
  if timed:
    median = {name: r["timings"]["full_step"]["median_s"] for name, r in timed.items()}
    none_name, cli_name = sweep_baselines(timed, report["cli_xla_flags"])
    best = min(median, key=median.get)
    s["sweep"] = {"best": {"name": best, "xla_flags": timed[best]["xla_flags"],
                           "images_per_s": batch_size / median[best]}}
    if none_name:
      s["sweep"]["none_s"] = median[none_name]
      s["sweep"]["best"]["speedup_vs_none"] = median[none_name] / median[best]
    if cli_name:
      s["sweep"]["cli_s"] = median[cli_name]
      s["sweep"]["best"]["speedup_vs_cli"] = median[cli_name] / median[best]
      env_hlo = report["jax"].get("cli", {}).get("full_step_hlo", {}).get("sha256")
      if env_hlo:
        s["sweep"]["cli_hlo_matches_xla_flags_subprocess"] = (
            env_hlo == timed[cli_name]["hlo"]["sha256"])
    if none_name and cli_name:
      s["sweep"]["cli_flags_change_hlo"] = (timed[none_name]["hlo"]["sha256"]
                                            != timed[cli_name]["hlo"]["sha256"])
  breakdown = report.get("breakdown", {})
  s["breakdown"] = {tag: derive_breakdown(result) for tag, result in breakdown.items()
                    if tag in JAX_LABELS and "timings" in result}
  return s


def print_report(report: dict[str, Any]) -> None:
  """A readable table of the run."""
  s, device = report["summary"], report["device"]
  batch = report["batch_size"]
  print(f"\nssljax CPU step benchmark - {report['config']}, global batch {batch} images "
        f"({2 * batch} views)")
  print(f"{device['cpu_model']} ({device['cpu_count']} cores), jax {device['versions']['jax']}, "
        f"torch {device['versions']['torch']}, {device['date']}")
  print(f"load average at start {device['load_average_at_start']} (1, 5, 15 min); 'load' "
        "column: 1-minute load when that worker started")
  print("images/s from the median wall time; CPU ms = process CPU time per call (2 cores)")
  for tag, result in report["jax"].items():
    print(f"  {tag}: XLA_FLAGS='{result.get('xla_flags')}'")
  print()
  rows = [("what", "flags", "median ms", "min ms", "CPU ms", "images/s", "load")]

  def add(what, flags, result, name):
    if name not in result.get("timings", {}):
      return
    timing = result["timings"][name]
    rows.append((what, flags, f"{1000 * timing['median_s']:.0f}",
                 f"{1000 * timing['min_s']:.0f}", f"{1000 * timing['cpu_median_s']:.0f}",
                 f"{images_per_s(result, name, batch):.0f}",
                 str(result.get("load_before", [""])[0])))

  for tag, result in report["jax"].items():
    if "error" in result:
      rows.append((f"ssljax step ({tag})", tag, "error", "", "", "", ""))
      continue
    add("ssljax full step (incl. augmentation)", tag, result, "full_step")
    add("ssljax step, views given (no aug)", tag, result, "no_aug_step")
    add("augmentation alone (jitted policy)", tag, result, "augment")
  torch_result = report.get("torch", {})
  optimizer = torch_result.get("optimizer", "sgd")
  for layout in ("default", "channels_last", "channels_last_sgd"):
    if f"step_{layout}" in torch_result.get("timings", {}):
      label = layout if layout.endswith("_sgd") else f"{layout}, {optimizer}"
      add(f"torch step, no aug ({label})", "-", torch_result, f"step_{layout}")
  pipeline = report.get("pipeline", {})
  if "images_per_s" in pipeline:
    rows.append(("HostLoader + to_global_array (per batch)", "cli",
                 f"{1000 * batch / pipeline['images_per_s']:.1f}", "", "",
                 f"{pipeline['images_per_s']:.0f}", str(pipeline["load_before"][0])))
  print_table(rows)

  print()
  for tag, run in s["jax"].items():
    speed = (f"; full step {run['speedup_vs_no_flags']:.2f}x no flags"
             if "speedup_vs_no_flags" in run and tag != "none" else "")
    print(f"{tag}: augmentation share standalone {run['augment_share_standalone']:.1%}, "
          f"in-step {run['augment_share_in_step']:.1%} (target <= {AUG_SHARE_TARGET:.0%})"
          f"{speed}")
  if "pipeline_to_step_ratio" in s:
    print(f"input pipeline / train step (cli): {s['pipeline_to_step_ratio']:.0f}x "
          f"(target >= {PIPELINE_RATIO_TARGET:.0f}x)")
  if "torch" in s:
    for tag, r in s["torch"]["ratios"].items():
      a, b = r["a_full_step_vs_torch_no_aug"], r["b_no_aug_step_vs_torch_no_aug"]
      sgd = (f"; against torch channels_last with SGD (a) {a['channels_last_sgd']:.2f}, "
             f"(b) {b['channels_last_sgd']:.2f}" if "channels_last_sgd" in a else "")
      print(f"ssljax ({tag}) / torch ({s['torch']['optimizer']}) images/s: (a) full step vs "
            f"torch no-aug {a['default']:.2f} default, {a['channels_last']:.2f} channels_last; "
            f"(b) no-aug step vs torch no-aug {b['default']:.2f} / {b['channels_last']:.2f}"
            f"{sgd}")
    jax_params = report["jax"].get("cli", {}).get("param_count")
    print(f"architecture check: {jax_params} trainable parameters in ssljax, "
          f"{torch_result.get('param_count')} in the PyTorch twin")
  elif "skipped" in torch_result:
    print(f"torch: skipped ({torch_result['skipped']})")
  if report.get("sweep"):
    print_sweep(report["sweep"], s.get("sweep", {}), batch)
  if report.get("breakdown"):
    print_breakdown(report["breakdown"], s["breakdown"], torch_result)


def print_breakdown(breakdown: dict[str, Any], derived: dict[str, Any],
                    torch_result: dict[str, Any]) -> None:
  """Forward / backward / BN timings, the profile by category, torch's top operators."""
  tags = [tag for tag in breakdown if tag in JAX_LABELS]
  print("\nbreakdown, ms per call (median); 'no BN' = every BatchNorm replaced by the identity")
  rows = [("part", *(f"ssljax ({tag})" for tag in tags), "torch default",
           "torch channels_last")]
  names = {"forward": "forward (train-mode BN)", "forward_backward": "forward + backward",
           "forward_no_bn": "forward, no BN", "forward_backward_no_bn": "forward + backward, no BN",
           "no_aug_step": "whole step (+ optimiser)"}
  torch_names = {"forward": "forward", "forward_backward": "forward_backward",
                 "no_aug_step": "step"}
  for part, label in names.items():
    row = [label]
    for tag in tags:
      value = ms(breakdown[tag], part)
      row.append(f"{value:.0f}" if value is not None else "-")
    for layout in ("default", "channels_last"):
      value = ms(torch_result, f"{torch_names[part]}_{layout}") if part in torch_names else None
      row.append(f"{value:.0f}" if value is not None else "-")
    rows.append(tuple(row))
  print_table(rows)
  for tag in tags:
    d = derived.get(tag)
    if d:
      print(f"  {tag}: backward = {d['backward_share']:.0%} of forward+backward; BN = "
            f"{d['bn_share_forward']:.0%} of forward, {d['bn_share_forward_backward']:.0%} of "
            f"forward+backward; optimiser + rest = {d['optimizer_share']:.0%} of the step")
  profiles = {tag: breakdown[tag].get("profile_ms_per_step") or {} for tag in tags}
  if any(profiles.values()):
    print("\nssljax step on given views, thunk time by category (ms per step, summed over "
          "threads)")
    categories: list[str] = []
    for profile in profiles.values():
      categories += [c for c in profile if c not in categories]
    rows = [("category", *tags)]
    for category in categories:
      rows.append((category, *(f"{profiles[t][category]:.0f}" if category in profiles[t]
                               else "-" for t in tags)))
    print_table(rows)
  for layout, ops in torch_result.get("profile_ms_per_step", {}).items():
    print(f"\ntorch step ({layout}), top operators by self CPU time (ms per step)")
    print_table([("operator", "ms")] + [(name, f"{value:.0f}") for name, value in ops.items()])


def print_sweep(sweep: dict[str, Any], summary: dict[str, Any], batch: int) -> None:
  """The flag sweep: one process, variants interleaved; speedups against no flags and cli."""
  if "sets" not in sweep:
    print(f"\nXLA flag sweep failed: {sweep.get('error')}")
    return
  print(f"\nXLA flag sweep of the full step (one process, flags as compiler_options, calls "
        f"interleaved; load {sweep.get('load_before')} -> {sweep.get('load_during')})")
  rows = [("flag set", "median ms", "min ms", "CPU ms", "images/s", "vs none", "vs cli",
           "ynn/xnn/onednn fusions")]
  for r in sweep["sets"]:
    if "timings" not in r:
      rows.append((r["name"], "error", "", "", "", "", "", r.get("error", "")[:40]))
      continue
    t, hlo = r["timings"]["full_step"], r["hlo"]
    rows.append((r["name"], f"{1000 * t['median_s']:.0f}", f"{1000 * t['min_s']:.0f}",
                 f"{1000 * t['cpu_median_s']:.0f}", f"{batch / t['median_s']:.0f}",
                 f"{summary['none_s'] / t['median_s']:.2f}" if "none_s" in summary else "",
                 f"{summary['cli_s'] / t['median_s']:.2f}" if "cli_s" in summary else "",
                 f"{hlo['ynn_fusions']}/{hlo['xnn_fusions']}/{hlo['onednn_fusions']}"))
  print_table(rows)
  best = summary.get("best")
  if best:
    print(f"fastest: {best['name']} ({best.get('speedup_vs_cli', float('nan')):.2f}x "
          f"CPU_XLA_FLAGS, {best.get('speedup_vs_none', float('nan')):.2f}x no flags): "
          f"XLA_FLAGS='{best['xla_flags']}'")
  conv_layers = sweep.get("conv_layers")
  if conv_layers:
    print(f"\nencoder convolutions alone, ms per call (median), no flags vs the fastest set "
          f"(XLA_FLAGS='{conv_layers['sets']['best']}')")
    rows = [("input -> features, kernel/stride", "forward", "input-grad", "weight-grad")]
    totals = {}
    for layer in conv_layers["layers"]:
      cells = []
      for part in ("forward", "input_grad", "weight_grad"):
        none, best_ms = layer["ms"][f"none|{part}"], layer["ms"][f"best|{part}"]
        totals[part] = [a + b for a, b in zip(totals.get(part, [0.0, 0.0]), (none, best_ms))]
        cells.append(f"{none:.1f} -> {best_ms:.1f}")
      k, st = layer["kernel"], layer["strides"]
      rows.append((f"{'x'.join(map(str, layer['input'][1:]))} -> {layer['features']}, "
                   f"{k[0]}x{k[1]}/{st[0]}", *cells))
    rows.append(("total", *(f"{totals[p][0]:.0f} -> {totals[p][1]:.0f}"
                            for p in ("forward", "input_grad", "weight_grad"))))
    print_table(rows)
  if "cli_hlo_matches_xla_flags_subprocess" in summary:
    print(f"'cli' set compiles to the same HLO as the XLA_FLAGS subprocess: "
          f"{summary['cli_hlo_matches_xla_flags_subprocess']}; CPU_XLA_FLAGS changes the "
          f"optimised HLO: {summary.get('cli_flags_change_hlo')}")


def print_table(rows: list[tuple[str, ...]]) -> None:
  """Prints rows as aligned columns; the first row is the header."""
  widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  for k, row in enumerate(rows):
    cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
             for i, (c, w) in enumerate(zip(row, widths))]
    print("  ".join(cells))
    if k == 0:
      print("  ".join("-" * w for w in widths))


def derive_breakdown(result: dict[str, Any]) -> dict[str, float] | None:
  """Backward, BatchNorm and optimiser shares from a breakdown worker's median times."""
  t = {k: v["median_s"] for k, v in result.get("timings", {}).items()}
  if not t:
    return None
  return {
      "backward_share": 1 - t["forward"] / t["forward_backward"],
      "bn_share_forward": 1 - t["forward_no_bn"] / t["forward"],
      "bn_share_forward_backward": 1 - t["forward_backward_no_bn"] / t["forward_backward"],
      "optimizer_share": 1 - t["forward_backward"] / t["no_aug_step"],
  }


def torch_available() -> bool:
  """Whether PyTorch can be imported (without importing it here)."""
  import importlib.util
  return importlib.util.find_spec("torch") is not None


def main_parent(args) -> None:
  """Runs the workers in turn, then prints the table and writes the JSON report."""
  config = load_config(args.config)
  batch = config.train.batch_size
  cli = cli_xla_flags()
  report: dict[str, Any] = {"config": args.config, "batch_size": batch, "steps": args.steps,
                            "cli_xla_flags": cli, "device": device_description(), "jax": {}}
  print(f"load average {report['device']['load_average_at_start']}; running workers "
        "(each compiles its own step)...", flush=True)

  def progress(name: str, result: dict[str, Any]) -> None:
    status = result.get("error", f"{result.get('wall_s', 0):.0f}s")
    print(f"  {name}: {status}", flush=True)
    for line in result.get("stderr_tail", []):
      print(f"    {line}", flush=True)

  report["jax"]["cli"] = run_worker("jax_step", cli, args)
  progress("ssljax step, CPU_XLA_FLAGS", report["jax"]["cli"])
  report["jax"]["none"] = run_worker("jax_step", "", args)
  progress("ssljax step, no flags", report["jax"]["none"])
  best_flags = None
  if args.sweep_flags:
    report["sweep"] = run_worker("jax_sweep", "", args)
    progress("flag sweep (one process, compiler_options)", report["sweep"])
    timed = [r for r in report["sweep"].get("sets", []) if "timings" in r]
    if timed:
      best_flags = min(timed, key=lambda r: r["timings"]["full_step"]["median_s"])["xla_flags"]
    if best_flags not in (None, "", cli):
      report["jax"]["best"] = run_worker("jax_step", best_flags, args)
      progress("ssljax step, sweep's best flags", report["jax"]["best"])
  report["pipeline"] = run_worker("jax_pipeline", cli, args)
  progress("input pipeline", report["pipeline"])
  if torch_available():
    report["torch"] = run_worker("torch", None, args)
    progress("torch step", report["torch"])
  else:
    report["torch"] = {"skipped": "torch is not installed (pip install torch==2.13.0 to "
                                  "compare; it is not an ssljax requirement)"}
  if args.breakdown:
    second = ("best", best_flags) if "best" in report["jax"] else ("none", "")
    report["breakdown"] = {}
    for tag, flags in (("cli", cli), second):
      report["breakdown"][tag] = run_worker("jax_breakdown", flags, args)
      progress(f"breakdown, {tag} flags", report["breakdown"][tag])
  report["summary"] = summarize_run(report, batch)
  report["device"]["load_average_at_end"] = load_average()
  print_report(report)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(f"\nwrote {args.out}")


def main_worker(args) -> None:
  """One ``--worker`` subprocess: runs its measurement and writes the result as JSON."""
  config = load_config(args.config)
  if args.worker == "jax_step":
    result = jax_step_worker(config, args.steps)
  elif args.worker == "jax_sweep":
    result = jax_sweep_worker(config, args.steps)
  elif args.worker == "jax_pipeline":
    result = jax_pipeline_worker(config, args.steps)
  elif args.worker == "jax_breakdown":
    result = jax_breakdown_worker(config, args.steps)
  elif args.worker == "torch":
    result = torch_worker(config, args.steps, args.breakdown)
  else:
    raise SystemExit(f"unknown worker {args.worker!r}")
  with open(args.worker_out, "w") as f:
    json.dump(result, f)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line options (``--worker`` and ``--worker-out`` are internal)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="ml_collections config file, path[:dataset]")
  parser.add_argument("--steps", type=int, default=20,
                      help="timed calls per variant (after 2 warm-up calls)")
  parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file to write")
  parser.add_argument("--sweep-flags", action="store_true",
                      help="also time the step under a list of XLA:CPU flag sets")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time forward / backward / BatchNorm / optimiser parts")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


if __name__ == "__main__":
  parsed = parse_args()
  if parsed.worker:
    main_worker(parsed)
  else:
    main_parent(parsed)
