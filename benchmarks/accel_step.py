"""Accelerator speed of the SimCLR train step, side by side with PyTorch in the same run.

  python benchmarks/accel_step.py [--cases r18_32_b1024,r18_32_b4096,r50_224]
      [--r50-batch 256] [--steps 10] [--rounds 5] [--torch all|gpu_aug|none]
      [--json benchmarks/results/accel_step.json] [--tiny]

The cases (synthetic uint8 images, the config's on-device augmentation inside the step):

  r18_32_b1024   configs/simclr.py:cifar10 (CIFAR ResNet-18, 3x3 stem, 2048-2048-256
                 projector, NT-Xent t = 0.2, LARS), 32 px, batch 1024
  r18_32_b4096   the same at batch 4096
  r50_224        configs/simclr.py:imagenet (ResNet-50, 2048-2048-128 projector with a last
                 BN, t = 0.1, LARS), 224 px, batch --r50-batch (default 256)

Every case runs in bfloat16 compute (float32 parameters, optimiser state and loss reductions)
unless ``--dtype float32``, on ONE device (the first; the PyTorch twin also uses one, so the
numbers are per chip and the two sides do the same work). For each case the script reports
images per second, step time (median, min and max of the per-step time of ``--rounds`` rounds
of ``--steps`` steps), compile time, memory and model FLOPs utilisation: the step's FLOPs
from XLA's cost model run on the step as lowered, before the backend compiles it
(augmentation and optimiser included, both small next to the network; see `step_flops` for
why not the compiled step's), over the device's published dense bf16 peak
(``PEAK_BF16_TFLOPS``, matched on the device kind; ``--peak-tflops`` overrides, and a CPU has
none, so MFU is left out there).

PyTorch on the same device, same process, same rounds (``--torch``; torch >= 2.4, and
torchvision for the DataLoader variant; not ssljax requirements: ``pip install torch
torchvision`` with the CUDA build that matches the machine, or ``pip install torch==2.13.0``
for a CPU build, whose PyPI torchvision does not load). The twin has the same network
(torchvision's ResNet layout with the CIFAR stem where ssljax uses it), projector, NT-Xent
loss and batch; its optimiser is SGD with momentum (fused into one kernel on CUDA), because
PyTorch has no LARS (LARS's per-layer norms cost little next to the network). The DataLoader's
workers start by forkserver, not fork, since JAX's threads are running by then. cuDNN picks its
convolution algorithms by timing them (``torch.backends.cudnn.benchmark``), as XLA autotunes
its own. Variants:

  torch[eager]            float32 (cuDNN convolutions in TF32, PyTorch's default), NCHW,
                          eager, augmentation on the device
  torch[bf16+cl]          bf16 autocast + channels_last, augmentation on the device
  torch[bf16+cl+compile]  the same with the loss and the augmentation under torch.compile
                          (--torch-compile-mode, default 'default')
  torch[dataloader]       bf16 + channels_last, eager, augmentation by torchvision transforms
                          in a CPU DataLoader (one worker per core, pinned memory): what a
                          solo-learn or lightly user gets by default

The device augmentation of the twin draws the config's policy (torchvision's random resized
crop sampling, flip, colour jitter in HSV, grayscale, Gaussian blur) with two differences: the
jitter runs in a fixed order rather than a random one, and the crop is resized by bilinear
``grid_sample`` without the antialiasing filter ssljax (and torchvision) apply when shrinking.
The PyTorch variants are skipped when PyTorch sees no CUDA device but ssljax runs on an
accelerator (a CPU twin would say nothing about the accelerator). The DataLoader variant is
timed after the interleaved rounds, in rounds of its own: its worker processes keep producing
batches while other variants run, so its iterator is restarted (the batches prepared off the
clock are dropped) and run for twice its prefetch depth before the clock starts, and each of
its rounds is a whole number of worker cycles (``--steps`` rounded up to a multiple of the
worker count), since the workers deliver their batches in bursts. A variant that fails (e.g.
torch.compile without a C++ compiler) is recorded with its error and the run goes on.

The optimised HLO of each ssljax step is summarised in the JSON (``hlo_ops``: fusions, library
calls, layout transposes and copies between kernels, host transfers inside the step,
collectives), and
``--profile DIR`` writes a ``jax.profiler`` trace of ``--steps`` steps per case for xprof or
TensorBoard and summarises it in the JSON and the printout (``trace_summary``: the device's
busy time per step against the host's wall time, split by kernel category, cuDNN's forward,
input-gradient and weight-gradient convolutions, cuBLAS products, reductions, layout copies,
elementwise fusions, and the top ops), and ``--hlo-dir DIR`` writes each step's optimised HLO.

``--tiny`` shrinks every case (16-32 px, batch 16, width 1/8) so that the whole script runs on
a CPU in about a minute; its numbers say nothing about speed, it exists so that the script is
tested where there is no accelerator.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory for PyTorch

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
for _path in (REPO_ROOT, BENCHMARKS_DIR):  # ssljax, and cpu_step's HLO parser
  if _path not in sys.path:
    sys.path.insert(0, _path)

DEFAULT_OUT = os.path.join("benchmarks", "results", "accel_step.json")

CASES: dict[str, dict[str, Any]] = {
    "r18_32_b1024": {"config": "simclr:cifar10", "batch": 1024},
    "r18_32_b4096": {"config": "simclr:cifar10", "batch": 4096},
    "r50_224": {"config": "simclr:imagenet", "batch": None},  # --r50-batch
}

# Dense bf16 peak TFLOP/s per chip from the vendors' data sheets (no sparsity), matched as a
# lower-case substring of ``device.device_kind``; the first match wins, so a kind that contains
# another's key ("h100 nvl" contains "h100", "l40s" contains "l4") must come before it.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.5),
    ("h100", 989.4),   # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 835.5),
    ("gh200", 989.4),
    ("h200", 989.4),   # SXM
    ("gb200", 2500.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.05),
    ("l40", 181.05),
    ("l4", 121.0),
    ("a10g", 70.0),
    ("rtx 4090", 165.2),
    ("tpu v6", 918.0),  # v6e: "TPU v6 lite"
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # v5p's device kind is "TPU v5"
    ("tpu v4", 275.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The published dense bf16 peak of a device kind, or None when it is not in the table."""
  kind = device_kind.lower()
  for key, value in PEAK_BF16_TFLOPS:
    if key in kind:
      return value
  return None


# ---------------------------------------------------------------------------- configs


def case_config(name: str, args: argparse.Namespace):
  """The ssljax config of a case: its recipe, batch, dtype, and ``--tiny``'s shrinking."""
  from ssljax import config as config_lib
  spec = CASES[name]
  c = config_lib.load_config(spec["config"])
  c.train.batch_size = int(spec["batch"] or args.r50_batch)
  c.train.compute_dtype = args.dtype
  if args.tiny:
    c.train.batch_size = 16
    c.model.width = 0.125
    size = 16 if c.model.cifar_stem else 32
    c.data.image_size = size
    c.augment.crop_size = size
    c.method.simclr.proj_hidden_dim = 64
    c.method.simclr.proj_dim = 32
  return c


def image_shape(config) -> tuple[int, int, int]:
  return (int(config.data.image_size), int(config.data.image_size), int(config.data.channels))


# ---------------------------------------------------------------------------- JAX


class JaxCase:
  """The compiled ssljax train step of one config on a synthetic uint8 batch, on one device
  (the first local one: the PyTorch twin runs on one device too)."""

  def __init__(self, config):
    import jax
    import numpy as np
    from ssljax import augment
    from ssljax.methods import build_method
    from ssljax.parallel import DATA_AXIS, data_sharded, make_mesh, replicated
    from ssljax.train.optim import build_optimizer, build_schedule
    from ssljax.train.step import compile_train_step, init_train_state, make_per_device_step

    self.config = config
    batch = int(config.train.batch_size)
    mesh = make_mesh(jax.local_devices()[:1])
    schedule = build_schedule(config.optim, global_batch=batch, total_steps=1000,
                              steps_per_epoch=100)
    tx = build_optimizer(config.optim, schedule)
    policy = augment.build_policy(config.augment, config.data.mean)
    method = build_method(config, axis_name=DATA_AXIS)
    shape = image_shape(config)
    rng = np.random.default_rng(0)
    sharding = data_sharded(mesh)
    self.images = jax.device_put(rng.integers(0, 256, (batch, *shape), np.uint8), sharding)
    self.index = jax.device_put(np.arange(batch, dtype=np.int32), sharding)
    self.label = jax.device_put(np.zeros(batch, np.int32), sharding)
    init = jax.jit(lambda: init_train_state(method, tx, policy, shape, config.seed),
                   out_shardings=replicated(mesh))
    self.state = init()
    self.param_count = sum(int(leaf.size) for leaf in jax.tree.leaves(self.state.params))
    step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)
    start = time.perf_counter()
    lowered = step.lower(self.state, self.images, self.index, self.label)
    self.compiled = lowered.compile()
    self.compile_s = time.perf_counter() - start
    self.flops, self.flops_source = step_flops(lowered, self.compiled)
    self.last_loss = None

  def run(self, steps: int) -> None:
    """`steps` steps, waiting only for the last one (as a training loop would)."""
    import jax
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.images, self.index, self.label)
    self.last_loss = metrics["train/loss"]
    jax.block_until_ready((self.state, metrics))


def _flops_of(cost) -> float | None:
  """The 'flops' entry of a cost analysis (a dict, or a list of one in older jax)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost or not float(cost["flops"]) > 0:
    return None
  return float(cost["flops"])


def step_flops(lowered, compiled) -> tuple[float | None, str]:
  """FLOPs of one step on one device, and where the count comes from.

  XLA's generic cost model (``HloCostAnalysis``) run on the step as lowered, before the
  backend compiles it: every convolution and dot is still an HLO op there, counted as
  2 x multiply-adds (padding taps excluded). The analysis runs on the CPU client, because
  ``Lowered.cost_analysis`` refuses backends loaded as PJRT plugins (the CUDA and TPU ones).
  The compiled step's own cost analysis is only the fallback: on a GPU, XLA has by then
  replaced the convolutions and matrix products by cuDNN / cuBLAS custom calls, which the
  generic model counts as -1 FLOPs each (jax-ml/jax issues 17912 and 22249), so it would
  leave out nearly all of the network's work and understate MFU many times over. The step is
  a ``shard_map``, lowered and partitioned at per-device shapes, so both counts are per device.
  """
  try:
    from jax.extend import backend as jax_backend
    from jax._src.lib import _jax  # the function Lowered.cost_analysis calls, on the CPU client
    module = lowered.compiler_ir("hlo").as_hlo_module()
    flops = _flops_of(_jax.hlo_module_cost_analysis(jax_backend.get_backend("cpu"), module))
    if flops:
      return flops, "XLA cost model of the lowered (unoptimised) step, per device"
  except Exception:  # a private API of this jax, or no CPU backend (JAX_PLATFORMS)
    pass
  try:
    flops = _flops_of(compiled.cost_analysis())
  except Exception:  # some backends do not implement it
    flops = None
  if flops:
    return flops, ("XLA cost analysis of the compiled step, per device (on a GPU this leaves "
                   "out the cuDNN/cuBLAS calls)")
  return None, "not reported"


def hlo_op_counts(compiled) -> dict[str, int]:
  """What the profile asks about, counted in the optimised HLO of the step.

  Counted between kernels, i.e. outside the bodies of fusions: ``transpose`` and ``copy``
  are layout changes XLA kept as operations of their own (a copy is how a layout change
  between fusions shows up after layout assignment); ``fusion`` the fused kernels;
  ``custom-call`` (cuDNN / cuBLAS on a GPU) the library calls; ``all-reduce`` and
  ``all-gather`` the collectives. ``convolution`` counts convolutions wherever they are
  (the CPU and TPU backends put them inside fusions), ``host`` the instructions anywhere that
  talk to the host inside a step (send, recv, infeed, outfeed, host callbacks), which should
  be 0. ``transpose_in_fusions`` and ``copy_in_fusions`` count those ops inside fusion bodies,
  where they are index arithmetic of a kernel rather than kernels.
  """
  import re
  counts = {op: 0 for op in ("fusion", "convolution", "custom-call", "transpose", "copy",
                             "all-reduce", "all-gather", "host", "transpose_in_fusions",
                             "copy_in_fusions")}
  lines = compiled.as_text().splitlines()
  fused = {m.group(1) for line in lines if " fusion(" in line
           for m in [re.search(r"calls=%?([\w.\-]+)", line)] if m}
  computation = None
  for line in lines:
    if line[:1] not in ("", " ") and line.rstrip().endswith("{"):  # a computation's header
      words = line.split()
      computation = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      continue
    match = re.search(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9-]*)\(", line)
    if not match:
      continue
    op = match.group(1)
    inside = computation in fused
    if op in ("send", "recv", "infeed", "outfeed") or "host_callback" in line \
        or "xla_python_cpu_callback" in line or "xla_ffi_python" in line:
      counts["host"] += 1
    elif op == "convolution":
      counts["convolution"] += 1
    elif inside:
      if op in ("transpose", "copy"):
        counts[f"{op}_in_fusions"] += 1
    elif op.startswith("all-reduce"):
      counts["all-reduce"] += 1
    elif op.startswith("all-gather"):
      counts["all-gather"] += 1
    elif op in counts:
      counts[op] += 1
  return counts


def profile_steps(case: "JaxCase", directory: str, steps: int) -> float:
  """A ``jax.profiler`` trace of `steps` steps in `directory` (open it with xprof or
  TensorBoard's profile plugin); returns the wall time of the traced steps in seconds."""
  import jax
  os.makedirs(directory, exist_ok=True)
  case.run(1)  # nothing left in flight from the timed rounds
  with jax.profiler.trace(directory):
    start = time.perf_counter()
    case.run(steps)
    return time.perf_counter() - start


def hlo_categories(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Maps each instruction of an optimised HLO module to (what its kernel does, step phase).

  What it does: a fusion takes the category of what it calls; library calls go by their
  target (cuDNN's forward, input-gradient and weight-gradient convolutions, cuBLAS products);
  then convolutions and dots XLA emitted itself, reductions (BatchNorm statistics, pooling, the
  loss), layout changes (transpose / copy alone), collectives, elementwise / other.

  The phase comes from the ``op_name`` JAX records in the metadata (the instruction's own, else
  the first in a fusion's body): ``transpose(jvp(...))`` is the backward pass, ``jvp(...)`` the
  forward pass (network and loss, under ``value_and_grad``), a top-level ``vmap(...)`` the
  per-image augmentation, anything else the optimiser update and the rest of the step.
  """
  import re

  from cpu_step import parse_hlo
  computations, _ = parse_hlo(hlo_text)

  def category(inst, depth: int = 0) -> str:
    opcode, rest = inst.opcode, inst.rest
    if opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      target = target.group(1) if target else ""
      if "convBackwardFilter" in target:
        return "conv weight-grad"
      if "convBackwardInput" in target:
        return "conv input-grad"
      if "conv" in target.lower():
        return "conv forward"
      if "gemm" in target or "matmul" in target or "cublas" in target:
        return "matmul"
      return f"library call ({target or 'unknown'})"
    if opcode == "fusion" and inst.called is not None and depth < 3:
      body = computations.get(inst.called, [])
      inner = [category(op, depth + 1) for op in body]
      for first in ("conv", "matmul", "library"):
        for cat in inner:
          if cat.startswith(first):
            return cat
      ops = {op.opcode for op in body}
      if ops & {"convolution"}:
        return "conv (XLA-emitted)"
      if ops & {"dot"}:
        return "matmul"
      if ops & {"reduce", "reduce-window", "select-and-scatter", "scatter"}:
        return "reduction (BN statistics, pooling, loss)"
      if ops <= {"transpose", "copy", "bitcast", "parameter", "reshape"}:
        return "transpose / copy"
      return "elementwise / other"
    if opcode == "convolution":
      return "conv (XLA-emitted)"
    if opcode == "dot":
      return "matmul"
    if opcode in ("reduce", "reduce-window", "select-and-scatter", "scatter"):
      return "reduction (BN statistics, pooling, loss)"
    if opcode in ("transpose", "copy", "copy-start", "copy-done"):
      return "transpose / copy"
    if opcode.startswith(("all-", "reduce-scatter", "collective")):
      return "collective"
    return "elementwise / other"

  def phase(inst) -> str:
    found = re.search(r'op_name="([^"]*)"', inst.rest)
    for op in computations.get(inst.called, []) if not found else []:
      found = re.search(r'op_name="([^"]*)"', op.rest)
      if found:
        break
    if not found:
      return "unattributed"
    op_name = found.group(1)
    if "transpose(jvp(" in op_name:
      return "backward"
    if "jvp(" in op_name:
      return "forward"
    if re.match(r"^(?:jit\([^)]*\)/)?vmap\(", op_name):
      return "augmentation"
    return "optimiser and the rest"

  return {inst.name: (category(inst), phase(inst))
          for body in computations.values() for inst in body}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def _shape_bytes(shape: str, skip_workspace: bool = False) -> int:
  """Bytes of an HLO shape string (a tuple's elements summed); `skip_workspace` leaves out
  the u8 scratch buffer a library call returns beside its result."""
  import re
  total = 0
  for dtype, dims in re.findall(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]", shape):
    if dtype not in _DTYPE_BYTES or (skip_workspace and dtype == "u8"):
      continue
    count = 1
    for d in dims.split(","):
      count *= int(d) if d else 1
    total += count * _DTYPE_BYTES[dtype]
  return total


def hlo_traffic(hlo_text: str, categories: dict[str, tuple[str, str]] | None = None
                ) -> dict[str, Any]:
  """The bytes each kernel of the step must move at least, by category and by phase.

  For every instruction of the optimised module's entry computation that runs as a kernel
  (fusions, library calls, copies; not tuples, parameters or constants), its operands' bytes
  (read) and its result's bytes (written, without a library call's workspace), summed by
  `hlo_categories` category and phase (`categories`, computed from the text if not given).
  Over the device's memory bandwidth this is a floor on each category's time, to hold against
  the profile: a kernel near its floor can only get faster by moving fewer bytes (fewer passes
  over the activations), not by being tuned.
  """
  import re

  from cpu_step import parse_hlo
  computations, entry = parse_hlo(hlo_text)
  if entry is None:
    return {"error": "no ENTRY computation in the HLO"}
  categories = hlo_categories(hlo_text) if categories is None else categories
  shapes: dict[str, int] = {}
  by_category: dict[str, list[int]] = {}
  by_phase: dict[str, list[int]] = {}
  free = ("get-tuple-element", "parameter", "constant", "tuple", "bitcast", "after-all",
          "partition-id", "replica-id")
  for inst in computations[entry]:
    written = _shape_bytes(inst.shape, skip_workspace=inst.opcode == "custom-call")
    shapes[inst.name] = written
    if inst.opcode in free:
      continue
    operands = inst.rest.split(")", 1)[0]
    read = sum(shapes.get(arg, 0) for arg in re.findall(r"%([\w.\-]+)", operands))
    category, phase = categories.get(inst.name, ("elementwise / other", "unattributed"))
    for table, key in ((by_category, category), (by_phase, phase)):
      row = table.setdefault(key, [0, 0, 0])
      row[0] += read
      row[1] += written
      row[2] += 1

  def gb(table):
    return {k: {"read_gb": r / 1e9, "written_gb": w / 1e9, "kernels": n}
            for k, (r, w, n) in sorted(table.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))}

  return {"by_category": gb(by_category), "by_phase": gb(by_phase),
          "total_gb": sum(r + w for r, w, _ in by_category.values()) / 1e9}


def print_traffic(traffic: dict[str, Any], bandwidth_tbs: float) -> None:
  """`hlo_traffic` as a table, with each row's floor time at `bandwidth_tbs` (TB/s)."""
  for key in ("by_category", "by_phase"):
    print(f"\n{key.replace('_', ' ')}: GB read + written per step, ms at {bandwidth_tbs} TB/s")
    for what, row in traffic[key].items():
      moved = row["read_gb"] + row["written_gb"]
      print(f"  {what:45s} {row['kernels']:5d} kernels {row['read_gb']:8.2f} + "
            f"{row['written_gb']:7.2f} GB {moved / bandwidth_tbs:8.2f} ms")
  print(f"  total {traffic['total_gb']:.2f} GB: "
        f"{traffic['total_gb'] / bandwidth_tbs:.2f} ms at {bandwidth_tbs} TB/s")


def kernel_category(name: str) -> str:
  """A GPU kernel's category from its name (cuDNN / CUTLASS / cuBLAS / XLA naming), for
  kernels that no HLO instruction names (inside library calls)."""
  low = name.lower()
  if "wgrad" in low:
    return "conv weight-grad"
  if "dgrad" in low:
    return "conv input-grad"
  if "fprop" in low or "conv" in low:
    return "conv forward"
  if any(key in low for key in ("gemm", "cutlass", "matmul", "xmma", "nvjet", "cublas")):
    return "matmul"
  if "transpose" in low or "memcpy" in low or low.startswith("copy"):
    return "transpose / copy"
  if "reduce" in low or "reduction" in low or "scatter" in low:
    return "reduction (BN statistics, pooling, loss)"
  if "memset" in low:
    return "memset"
  if "fusion" in low or low.startswith(("loop_", "input_", "wrapped_")):
    return "elementwise / other"
  return "other kernels"


def trace_summary(trace_dir: str, instructions: dict[str, tuple[str, str]], steps: int,
                  wall_s: float | None, top: int = 40) -> dict[str, Any]:
  """Device time per step from a ``jax.profiler`` trace, by kernel category, by phase of the
  step, and the top kernels.

  Reads the trace's ``.xplane.pb`` with ``jax.profiler.ProfileData``. On a GPU the events of
  the device plane's stream lines are kernels; each is matched to an instruction of the
  optimised HLO (`instructions`, from `hlo_categories`) by its ``hlo_op`` stat where the profiler records one, else by
  its name (XLA names a fusion's kernel after the fusion, ``.`` written ``_``), and otherwise
  classified by its name alone (`kernel_category`; phase "unattributed"). The busiest stream is
  summarised; on one stream its kernels do not overlap, so ``busy_ms`` (their summed time per
  step) against ``wall_ms`` (the host's time per traced step) is the time the device waited.
  On a CPU the step's thunks run on host threads, whose events are named after the
  instructions; they may overlap there.
  """
  import glob
  import jax
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return {"error": f"no .xplane.pb under {trace_dir}"}
  profile = jax.profiler.ProfileData.from_file(sorted(paths)[-1])
  by_kernel_name = {name.replace(".", "_").replace("-", "_"): name for name in instructions}

  def instruction_of(event, device: bool) -> str | None:
    names = [event.name]
    if device:  # a kernel's own HLO instruction, where the profiler recorded it
      import warnings
      with warnings.catch_warnings():  # jax's stats type warns on Python 3.12 (no __module__)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
          stats = dict(event.stats)
        except Exception:
          stats = {}
      if isinstance(stats.get("hlo_op"), str):
        names.insert(0, stats["hlo_op"])
    for value in names:
      if value in instructions:
        return value
      normalised = value.replace(".", "_").replace("-", "_")
      if normalised in by_kernel_name:
        return by_kernel_name[normalised]
    return None

  lines: dict[str, dict[str, list]] = {}  # line -> kernel name -> [ms per step, instruction]
  host: dict[str, list] = {}
  for plane in profile.planes:
    device = plane.name.startswith("/device:")
    if not device and not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      totals: dict[str, list] = {}
      for event in line.events:
        inst = instruction_of(event, device)
        if not device and (inst is None or inst != event.name):
          continue  # host events other than the step's thunks
        entry = totals.setdefault(event.name, [0.0, inst])
        entry[0] += event.duration_ns / 1e6 / steps
      target = lines.setdefault(f"{plane.name} / {line.name}", {}) if device else host
      for name, (ms, inst) in totals.items():
        target.setdefault(name, [0.0, inst])[0] += ms
  lines = {k: v for k, v in lines.items() if v}
  summary: dict[str, Any] = {
      "steps": steps,
      "lines_ms": {k: round(sum(ms for ms, _ in v.values()), 3) for k, v in lines.items()}}
  if wall_s is not None:
    summary["wall_ms"] = 1000 * wall_s / steps
  streams = [k for k in lines if not k.endswith(("/ XLA Ops", "/ XLA Modules"))]
  if streams:
    chosen = max(streams, key=lambda k: sum(ms for ms, _ in lines[k].values()))
    totals = lines[chosen]
  elif host:
    chosen, totals = "host threads (events named after HLO instructions)", host
  else:
    summary["error"] = "the trace holds no device stream and no event of the step's HLO"
    return summary
  by_category: dict[str, float] = {}
  by_phase: dict[str, float] = {}
  rows = []
  matched = 0.0
  for name, (ms, inst) in totals.items():
    cat, ph = instructions[inst] if inst is not None else (kernel_category(name), "unattributed")
    matched += ms if inst is not None else 0.0
    by_category[cat] = by_category.get(cat, 0.0) + ms
    by_phase[ph] = by_phase.get(ph, 0.0) + ms
    rows.append({"name": name[:160], "ms": ms, "category": cat, "phase": ph,
                 **({"hlo": inst} if inst is not None and inst != name else {})})
  busy = sum(ms for ms, _ in totals.values())
  summary.update({
      "line": chosen, "busy_ms": busy, "kernels": len(totals),
      "matched_to_hlo_fraction": matched / busy if busy else 0.0,
      "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
      "by_phase_ms": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
      "top_ms": sorted(rows, key=lambda r: -r["ms"])[:top]})
  return summary


def jax_peak_memory_mib(case: JaxCase) -> tuple[float | None, str]:
  """XLA's estimate of the step's device memory (arguments + outputs + temporaries -
  aliased), which belongs to this case alone."""
  try:
    m = case.compiled.memory_analysis()
  except Exception:
    m = None
  if m is None:
    return None, "not reported"
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 20, "XLA's estimate of the step"


def jax_allocator_peak_mib() -> float | None:
  """The allocator's peak on device 0 where it reports one. It cannot be reset, so after the
  first case it is the peak of every case run so far in this process."""
  import jax
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:
    return None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2 ** 20
  return None


# ---------------------------------------------------------------------------- PyTorch


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def torch_device():
  import torch
  if torch.cuda.is_available():
    return torch.device("cuda")
  return torch.device("cpu")


def build_torch_model(config):
  """ResNet-18/50 as torchvision builds them (3x3 CIFAR stem without max-pool where the config
  has it; stride on the 3x3 convolution of a bottleneck) + the config's projector.

  Written out here rather than taken from torchvision so that the twin also runs where
  torchvision's compiled extension does not match the installed torch (a CPU torch with
  PyPI's torchvision); only the DataLoader variant needs torchvision.
  """
  from torch import nn

  width = float(config.model.width)
  bottleneck = config.model.encoder == "resnet50"
  expansion = 4 if bottleneck else 1
  depths = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[config.model.encoder]
  planes = [int(round(p * width)) for p in (64, 128, 256, 512)]

  def conv_bn(cin, cout, k, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)

  class Block(nn.Module):
    def __init__(self, cin, p, stride):
      super().__init__()
      cout = p * expansion
      if bottleneck:
        self.body = nn.Sequential(conv_bn(cin, p, 1), conv_bn(p, p, 3, stride),
                                  conv_bn(p, cout, 1, relu=False))
      else:
        self.body = nn.Sequential(conv_bn(cin, p, 3, stride), conv_bn(p, p, 3, relu=False))
      self.shortcut = (conv_bn(cin, cout, 1, stride, relu=False)
                       if stride != 1 or cin != cout else nn.Identity())
      self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
      return self.relu(self.body(x) + self.shortcut(x))

  if config.model.cifar_stem:
    stem = [conv_bn(3, planes[0], 3)]
  else:
    stem = [conv_bn(3, planes[0], 7, 2), nn.MaxPool2d(3, 2, 1)]
  blocks, cin = [], planes[0]
  for i, (p, depth) in enumerate(zip(planes, depths)):
    for j in range(depth):
      blocks.append(Block(cin, p, 2 if i > 0 and j == 0 else 1))
      cin = p * expansion
  backbone = nn.Sequential(*stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
  hp = config.method.simclr
  head = [nn.Linear(cin, hp.proj_hidden_dim), nn.BatchNorm1d(hp.proj_hidden_dim),
          nn.ReLU(inplace=True), nn.Linear(hp.proj_hidden_dim, hp.proj_dim)]  # biases as ssljax
  if hp.proj_last_bn:
    head.append(nn.BatchNorm1d(hp.proj_dim, affine=False))
  return nn.Sequential(backbone, nn.Sequential(*head))


def torch_nt_xent(z, temperature: float):
  """NT-Xent over 2n normalised embeddings (views of image i at rows i and n + i)."""
  import torch
  from torch.nn import functional as F
  z = F.normalize(z.float(), dim=1)
  n = z.shape[0] // 2
  logits = z @ z.t() / temperature
  logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
  targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
  return F.cross_entropy(logits, targets)


def _rgb_to_hsv(x):
  import torch
  r, g, b = x.unbind(1)
  high, _ = x.max(1)
  low, _ = x.min(1)
  spread = high - low
  safe = torch.where(spread > 0, spread, torch.ones_like(spread))
  hue = torch.where(high == r, (g - b) / safe,
                    torch.where(high == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue = torch.where(spread > 0, torch.remainder(hue / 6.0, 1.0), torch.zeros_like(hue))
  sat = torch.where(high > 0, spread / torch.where(high > 0, high, torch.ones_like(high)),
                    torch.zeros_like(high))
  return hue, sat, high


def _hsv_to_rgb(hue, sat, value):
  import torch
  k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=hue.device).view(1, 3, 1, 1)
                      + 6.0 * hue.unsqueeze(1), 6.0)
  weight = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
  return value.unsqueeze(1) - value.unsqueeze(1) * sat.unsqueeze(1) * weight


def torch_crop_sides(n: int, augment, device):
  """Width and height ``[n]`` of torchvision's random-resized-crop boxes in a square image,
  as fractions of its side: up to ten draws of an area fraction ``U(crop_scale)`` and an
  aspect ``exp(U(log crop_ratio))``, the first box that fits, else the whole image with its
  aspect clamped to ``crop_ratio`` (`ssljax.augment.ops.sample_crop_box`, without rounding to
  whole pixels)."""
  import math

  import torch
  tries = 10
  low, high = augment.crop_scale
  area = torch.rand(n, tries, device=device) * (high - low) + low
  log_low, log_high = math.log(augment.crop_ratio[0]), math.log(augment.crop_ratio[1])
  ratio = torch.exp(torch.rand(n, tries, device=device) * (log_high - log_low) + log_low)
  w_all, h_all = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
  fits = (w_all <= 1.0) & (h_all <= 1.0)
  first = fits.float().argmax(1, keepdim=True)  # the first box that fits (0 if none)
  found = fits.any(1)
  fallback_w = min(1.0, max(augment.crop_ratio))
  fallback_h = min(1.0, 1.0 / min(augment.crop_ratio))
  return (torch.where(found, w_all.gather(1, first)[:, 0], fallback_w),
          torch.where(found, h_all.gather(1, first)[:, 0], fallback_h))


def torch_device_augment(images, config, generator=None):
  """One view per image of a uint8 NHWC batch on the device, as float32 NCHW normalised.

  Random resized crop and flip as one bilinear ``grid_sample`` per image (no antialiasing);
  the box is torchvision's (`torch_crop_sides`); then, per image with probability
  ``jitter_prob``, brightness, contrast, saturation and hue in that order; grayscale with
  ``grayscale_prob``; a Gaussian blur with ``blur_prob`` (sigma in ``blur_sigma``, taps over
  10% of the side); solarisation with ``solarize_prob``.
  """
  import torch
  from torch.nn import functional as F

  a = config.augment
  n = images.shape[0]
  dev = images.device
  x = images.permute(0, 3, 1, 2).float().div_(255.0)
  size = int(a.crop_size)

  def u(lo=0.0, hi=1.0):
    return torch.rand(n, device=dev) * (hi - lo) + lo

  w, h = torch_crop_sides(n, a, dev)
  cx = u() * (1 - w) * 2 - (1 - w)
  cy = u() * (1 - h) * 2 - (1 - h)
  flip = torch.where(u() < a.flip_prob, -1.0, 1.0)
  theta = torch.zeros(n, 2, 3, device=dev)
  theta[:, 0, 0] = w * flip
  theta[:, 0, 2] = cx
  theta[:, 1, 1] = h
  theta[:, 1, 2] = cy
  grid = F.affine_grid(theta, (n, x.shape[1], size, size), align_corners=False)
  x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

  bri, con, sat, hue = (float(v) for v in a.jitter)
  apply = (u() < a.jitter_prob).view(n, 1, 1, 1)
  y = x
  if bri:
    y = torch.clamp(y * u(max(0.0, 1 - bri), 1 + bri).view(n, 1, 1, 1), 0, 1)
  luma_w = torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)
  if con:
    mean = (y * luma_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    f = u(max(0.0, 1 - con), 1 + con).view(n, 1, 1, 1)
    y = torch.clamp(f * y + (1 - f) * mean, 0, 1)
  if sat:
    gray = (y * luma_w).sum(1, keepdim=True)
    f = u(max(0.0, 1 - sat), 1 + sat).view(n, 1, 1, 1)
    y = torch.clamp(f * y + (1 - f) * gray, 0, 1)
  if hue:
    hh, ss, vv = _rgb_to_hsv(y)
    hh = torch.remainder(hh + u(-hue, hue).view(n, 1, 1), 1.0)
    y = _hsv_to_rgb(hh, ss, vv)
  x = torch.where(apply, y, x)
  gray = (x * luma_w).sum(1, keepdim=True).expand_as(x)
  x = torch.where((u() < a.grayscale_prob).view(n, 1, 1, 1), gray, x)
  if a.blur_prob > 0:
    k = max(3, 2 * int(0.1 * size / 2) + 1)
    sigma = u(*a.blur_sigma).view(n, 1)
    taps = torch.arange(k, device=dev, dtype=torch.float32) - (k - 1) / 2
    taps = torch.exp(-0.5 * (taps.view(1, k) / sigma) ** 2)
    taps = (taps / taps.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [3n, k]
    flat = x.reshape(1, 3 * n, size, size)
    flat = F.pad(flat, (k // 2, k // 2, 0, 0), mode="reflect")
    flat = F.conv2d(flat, taps.view(3 * n, 1, 1, k), groups=3 * n)
    flat = F.pad(flat, (0, 0, k // 2, k // 2), mode="reflect")
    flat = F.conv2d(flat, taps.view(3 * n, 1, k, 1), groups=3 * n)
    x = torch.where((u() < a.blur_prob).view(n, 1, 1, 1), flat.view(n, 3, size, size), x)
  if getattr(a, "solarize_prob", 0.0) > 0:
    x = torch.where((u() < a.solarize_prob).view(n, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
  mean = torch.tensor(tuple(config.data.mean), device=dev).view(1, 3, 1, 1)
  std = torch.tensor(tuple(config.data.std), device=dev).view(1, 3, 1, 1)
  return (x - mean) / std


class TorchCase:
  """One PyTorch variant of a case: model, optimiser and a zero-argument ``run(steps)``."""

  def __init__(self, config, variant: str, images_uint8, *, workers: int | None = None,
               compile_mode: str = "default"):
    import numpy as np
    import torch

    self.variant = variant
    self.config = config
    self.device = torch_device()
    torch.manual_seed(0)
    # cuDNN times its algorithms for these fixed shapes, as XLA autotunes its convolutions.
    torch.backends.cudnn.benchmark = True
    bf16 = variant != "eager"
    self.channels_last = variant != "eager"
    self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else None)
    model = build_torch_model(config).to(self.device)
    if self.channels_last:
      model = model.to(memory_format=torch.channels_last)
    self.model = model
    o = config.optim
    # The fused (single-kernel) SGD on CUDA: PyTorch's fastest optimiser step there.
    self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                     weight_decay=float(o.weight_decay),
                                     fused=self.device.type == "cuda")
    temperature = float(config.method.simclr.temperature)

    def loss_fn(v1, v2):
      z = self.model(torch.cat([v1, v2]))
      return torch_nt_xent(z, temperature)

    augment = lambda images: torch_device_augment(images, config)
    self.compiled = variant.endswith("compile")
    if self.compiled:
      loss_fn = torch.compile(loss_fn, mode=compile_mode)
      augment = torch.compile(augment, mode=compile_mode)
    self.loss_fn, self.augment = loss_fn, augment
    self.images = torch.from_numpy(np.asarray(images_uint8)).to(self.device)
    self.loader = self._dataloader = None
    self.workers = 0
    if variant.startswith("dataloader"):
      self._dataloader = _dataloader(config, np.asarray(images_uint8), workers)
      self.workers = self._dataloader.num_workers
      self.loader = iter(self._dataloader)
    self.last_loss = None
    start = time.perf_counter()
    self.run(2)  # warm-up: compiles where torch.compile is on, fills the loader's queue
    self.compile_s = time.perf_counter() - start

  def restart_loader(self) -> None:
    """Drops the batches the loader's workers prepared so far (e.g. while other variants
    ran) and starts its iterator afresh, with the same worker processes."""
    self.loader = iter(self._dataloader)

  def _views(self):
    import torch
    if self.loader is not None:
      v1, v2 = next(self.loader)
      v1 = v1.to(self.device, non_blocking=True)
      v2 = v2.to(self.device, non_blocking=True)
    else:
      with torch.no_grad():
        v1, v2 = self.augment(self.images), self.augment(self.images)
    if self.channels_last:
      v1 = v1.contiguous(memory_format=torch.channels_last)
      v2 = v2.contiguous(memory_format=torch.channels_last)
    return v1, v2

  def run(self, steps: int) -> None:
    import torch
    loss = None
    for _ in range(steps):
      v1, v2 = self._views()
      self.optimizer.zero_grad(set_to_none=True)
      if self.autocast is not None:
        with self.autocast:
          loss = self.loss_fn(v1, v2)
      else:
        loss = self.loss_fn(v1, v2)
      loss.backward()
      self.optimizer.step()
    self.last_loss = loss.detach()
    if self.device.type == "cuda":
      torch.cuda.synchronize()


class _TwoViews:
  """A map-style dataset of synthetic images with torchvision's transforms, two views each."""

  def __init__(self, images, transform, length: int):
    self.images, self.transform, self.length = images, transform, length

  def __len__(self):
    return self.length

  def __getitem__(self, i):
    import torch
    image = torch.from_numpy(self.images[i % len(self.images)]).permute(2, 0, 1)
    return self.transform(image), self.transform(image)


def _dataloader(config, images, workers: int | None):
  """torchvision.transforms.v2 on uint8 tensors in a DataLoader: the usual PyTorch input path."""
  import torch
  from torchvision.transforms import v2

  a = config.augment
  size = int(a.crop_size)
  bri, con, sat, hue = (float(v) for v in a.jitter)
  steps = [v2.RandomResizedCrop(size, scale=tuple(a.crop_scale), ratio=tuple(a.crop_ratio),
                                antialias=True),
           v2.RandomHorizontalFlip(a.flip_prob),
           v2.RandomApply([v2.ColorJitter(bri, con, sat, hue)], p=a.jitter_prob),
           v2.RandomGrayscale(a.grayscale_prob)]
  if a.blur_prob > 0:
    k = max(3, 2 * int(0.1 * size / 2) + 1)
    steps.append(v2.RandomApply([v2.GaussianBlur(k, tuple(a.blur_sigma))], p=a.blur_prob))
  if getattr(a, "solarize_prob", 0.0) > 0:
    steps.append(v2.RandomSolarize(128, p=a.solarize_prob))
  steps += [v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(tuple(config.data.mean), tuple(config.data.std))]
  batch = int(config.train.batch_size)
  workers = os.cpu_count() if workers is None else workers
  dataset = _TwoViews(images, v2.Compose(steps), length=batch * 100000)
  # forkserver, not fork: JAX has started its threads by now, and a forked child inherits
  # their locks mid-state (Python warns that this can deadlock).
  return torch.utils.data.DataLoader(
      dataset, batch_size=batch, shuffle=False, num_workers=workers, drop_last=True,
      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
      prefetch_factor=2 if workers > 0 else None,
      multiprocessing_context="forkserver" if workers > 0 else None)


def torch_peak_memory_mib() -> float | None:
  import torch
  if torch.cuda.is_available():
    return torch.cuda.max_memory_allocated() / 2 ** 20
  return None


def torch_variants(choice: str) -> list[str]:
  """The PyTorch variants ``--torch`` runs. 'dataloader' alone skips the compiled variants'
  minutes of torch.compile, for a row that is missing from an earlier run."""
  return {"none": [], "gpu_aug": ["eager", "bf16+cl", "bf16+cl+compile"],
          "dataloader": ["dataloader"],
          "all": ["eager", "bf16+cl", "bf16+cl+compile", "dataloader"]}[choice]


# ---------------------------------------------------------------------------- running


def _timing(per_step: list[float], batch: int) -> dict[str, float]:
  median = statistics.median(per_step)
  return {"step_ms_median": 1e3 * median, "step_ms_min": 1e3 * min(per_step),
          "step_ms_max": 1e3 * max(per_step), "images_per_s": batch / median,
          "rounds": len(per_step)}


def _timed_round(run: Callable[[int], None], steps: int) -> float:
  start = time.perf_counter()
  run(steps)
  return (time.perf_counter() - start) / steps


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
  """The JAX step and every PyTorch variant of one case, interleaved round by round."""
  import jax
  import numpy as np

  config = case_config(name, args)
  batch = int(config.train.batch_size)
  result: dict[str, Any] = {"case": name, "config": CASES[name]["config"], "batch": batch,
                            "image_shape": list(image_shape(config)),
                            "encoder": config.model.encoder, "width": config.model.width,
                            "compute_dtype": config.train.compute_dtype, "devices": 1,
                            "variants": {}}
  if torch_available():
    import torch
    if torch.cuda.is_available():  # this case's peak, not the largest of the cases so far
      torch.cuda.reset_peak_memory_stats()
  jax_case = JaxCase(config)
  device_kind = jax.local_devices()[0].device_kind
  peak = args.peak_tflops or peak_tflops(device_kind)
  runners: dict[str, Callable[[int], None]] = {"ssljax": jax_case.run}
  jax_case.run(2)
  result["variants"]["ssljax"] = {
      "compile_s": jax_case.compile_s, "params": jax_case.param_count,
      "step_flops": jax_case.flops, "step_flops_source": jax_case.flops_source,
      "peak_tflops_bf16": peak, "hlo_ops": hlo_op_counts(jax_case.compiled)}

  torch_cases: dict[str, TorchCase] = {}
  later: dict[str, TorchCase] = {}
  result["torch_choice"] = args.torch
  if args.torch != "none":
    if not torch_available():
      result["torch_skipped"] = ("torch not installed: pip install torch torchvision "
                                 "(see this file's docstring)")
    elif jax.default_backend() != "cpu" and torch_device().type == "cpu":
      result["torch_skipped"] = (f"PyTorch sees no CUDA device while ssljax runs on "
                                 f"{jax.default_backend()}: install the CUDA build of torch")
    else:
      rng = np.random.default_rng(1)
      images = rng.integers(0, 256, (batch, *image_shape(config)), np.uint8)
      for variant in torch_variants(args.torch):
        label = f"torch[{variant}]"
        try:
          case = TorchCase(config, variant, images, workers=args.loader_workers,
                           compile_mode=args.torch_compile_mode)
        except Exception as error:  # recorded, the run goes on
          result["variants"][label] = {"error": f"{type(error).__name__}: {error}",
                                       "traceback": traceback.format_exc(limit=3)}
          continue
        (later if case.loader is not None else torch_cases)[label] = case
        result["variants"][label] = {"compile_s": case.compile_s}
        if case.compiled:
          result["variants"][label]["torch_compile_mode"] = args.torch_compile_mode
        runners_target = runners if case.loader is None else None
        if runners_target is not None:
          runners[label] = case.run

  per_step: dict[str, list[float]] = {label: [] for label in runners}
  failed: set[str] = set()
  for _ in range(args.rounds):
    for label, run in runners.items():
      if label in failed:
        continue
      try:
        per_step[label].append(_timed_round(run, args.steps))
      except Exception as error:
        failed.add(label)
        result["variants"][label]["error"] = f"{type(error).__name__}: {error}"
  for label, case in later.items():  # the DataLoader: its own back-to-back rounds
    per_step[label] = []
    cycle = max(1, case.workers)  # the workers deliver a batch each, in bursts
    steps = cycle * -(-args.steps // cycle)
    result["variants"][label]["steps_per_round"] = steps
    try:
      case.restart_loader()  # drop what the workers prepared while other variants ran
      case.run(2 * cycle)  # fill the pipeline (prefetch_factor 2 per worker): steady state
      for _ in range(args.rounds):
        per_step[label].append(_timed_round(case.run, steps))
    except Exception as error:
      result["variants"][label]["error"] = f"{type(error).__name__}: {error}"
  for label, times in per_step.items():
    if times:
      result["variants"][label].update(_timing(times, batch))

  jax_row = result["variants"]["ssljax"]
  hlo_text = jax_case.compiled.as_text()
  categories = hlo_categories(hlo_text)
  jax_row["hlo_traffic"] = hlo_traffic(hlo_text, categories)
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
    path = os.path.join(args.hlo_dir, f"{name}.hlo.txt")
    with open(path, "w") as f:
      f.write(hlo_text)
    jax_row["hlo_file"] = path
  if args.profile:
    jax_row["trace_dir"] = os.path.join(args.profile, name)
    wall_s = profile_steps(jax_case, jax_row["trace_dir"], args.steps)
    try:
      jax_row["trace_summary"] = trace_summary(jax_row["trace_dir"], categories, args.steps,
                                               wall_s)
    except Exception as error:  # a profiler API this jax lacks: the trace is still there
      jax_row["trace_summary"] = {"error": f"{type(error).__name__}: {error}"}
  if "images_per_s" in jax_row:
    if jax_case.flops and peak:
      jax_row["mfu"] = jax_case.flops / (jax_row["step_ms_median"] / 1e3) / (peak * 1e12)
    memory, how = jax_peak_memory_mib(jax_case)
    jax_row["peak_memory_mib"], jax_row["peak_memory_source"] = memory, how
    jax_row["allocator_peak_mib_process"] = jax_allocator_peak_mib()
    jax_row["final_loss"] = float(jax.device_get(jax_case.last_loss))
  for label, case in {**torch_cases, **later}.items():
    row = result["variants"][label]
    if case.last_loss is not None:
      row["final_loss"] = float(case.last_loss.float().cpu())
    if jax_case.flops and peak and "step_ms_median" in row:
      # The same network and batch: ssljax's FLOP count is the useful work of both steps.
      row["mfu"] = jax_case.flops / (row["step_ms_median"] / 1e3) / (peak * 1e12)
  memory = torch_peak_memory_mib() if torch_cases or later else None
  if memory is not None:
    result["torch_peak_memory_mib_all_variants"] = memory
  torch_rows = {k: v for k, v in result["variants"].items()
                if k.startswith("torch") and "images_per_s" in v}
  if torch_rows and "images_per_s" in jax_row:
    best = max(torch_rows, key=lambda k: torch_rows[k]["images_per_s"])
    result["best_torch"] = best
    result["ssljax_over_best_torch"] = jax_row["images_per_s"] / torch_rows[best]["images_per_s"]
  del jax_case
  torch_cases.clear()
  later.clear()
  case = None  # the last PyTorch variant's model and loader workers go with it
  if torch_available():
    import torch
    if torch.cuda.is_available():  # hand PyTorch's cached blocks back before the next case
      torch.cuda.empty_cache()
  return result


def device_description() -> dict[str, Any]:
  import jax
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  devices = jax.devices()
  return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "device_count": len(devices), "host": platform.node(),
          "machine": f"{platform.machine()}, {os.cpu_count()} cores",
          "python": platform.python_version(), "versions": versions,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def print_report(report: dict[str, Any]) -> None:
  d = report["device"]
  print(f"\n{d['device_count']} x {d['device_kind']} ({d['backend']}), {d['date']}; "
        f"jax {d['versions']['jax']}, torch {d['versions']['torch']}")
  header = ("case", "variant", "images/s", "step ms (min-max)", "compile s", "peak MiB", "MFU")
  rows = [header]
  for case in report["cases"]:
    for label, row in case["variants"].items():
      if "error" in row and "images_per_s" not in row:
        rows.append((case["case"], label, "failed: " + row["error"][:60], "", "", "", ""))
        continue
      if "images_per_s" not in row:
        continue
      memory = row.get("peak_memory_mib")
      rows.append((case["case"], label, f"{row['images_per_s']:.0f}",
                   f"{row['step_ms_median']:.2f} ({row['step_ms_min']:.2f}-"
                   f"{row['step_ms_max']:.2f})", f"{row.get('compile_s', 0):.1f}",
                   "-" if memory is None else f"{memory:.0f}",
                   "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"))
    if "ssljax_over_best_torch" in case:
      rows.append((case["case"], f"ssljax / {case['best_torch']}",
                   f"{case['ssljax_over_best_torch']:.2f}x", "", "", "", ""))
    if "torch_skipped" in case:
      rows.append((case["case"], "torch", case["torch_skipped"][:60], "", "", "", ""))
  widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
  for r in rows:
    print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", default=",".join(CASES),
                      help=f"comma-separated, from {', '.join(CASES)}")
  parser.add_argument("--r50-batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--torch", default="all", choices=("all", "gpu_aug", "dataloader", "none"),
                      help="PyTorch variants: all, the three with augmentation on the device "
                           "(gpu_aug), the DataLoader alone, or none; 'best_torch' in the JSON "
                           "is the fastest of those run (torch_choice says which)")
  parser.add_argument("--loader-workers", type=int, default=None,
                      help="DataLoader workers (default: one per core)")
  parser.add_argument("--torch-compile-mode", default="default",
                      choices=("default", "reduce-overhead", "max-autotune",
                               "max-autotune-no-cudagraphs"),
                      help="torch.compile's mode for the compiled variant (max-autotune tunes "
                      "kernels for minutes per case; default keeps the run short)")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's dense bf16 peak, where the built-in table lacks it")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="also write a jax.profiler trace of --steps ssljax steps per case "
                      "to DIR/<case>")
  parser.add_argument("--hlo-dir", default=None, metavar="DIR",
                      help="also write each case's optimised HLO to DIR/<case>.hlo.txt")
  parser.add_argument("--hlo-traffic", default=None, metavar="FILE",
                      help="only print the bytes per kernel category of a saved optimised HLO "
                      "(--hlo-dir's output, .gz too) and their time at --bandwidth-tbs")
  parser.add_argument("--bandwidth-tbs", type=float, default=4.3,
                      help="memory bandwidth for --hlo-traffic, TB/s read + written (4.3, "
                      "an assumed rate for an H200: about 90%% of its datasheet 4.8)")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny shapes, to check the script on a CPU (numbers meaningless)")
  parser.add_argument("--json", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  unknown = [c for c in args.cases.split(",") if c not in CASES]
  if unknown:
    parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.hlo_traffic:
    import gzip
    opener = gzip.open if args.hlo_traffic.endswith(".gz") else open
    with opener(args.hlo_traffic, "rt") as f:
      traffic = hlo_traffic(f.read())
    print_traffic(traffic, args.bandwidth_tbs)
    return traffic
  report: dict[str, Any] = {"device": device_description(), "args": vars(args), "cases": [],
                            "peak_table_tflops_bf16": dict(PEAK_BF16_TFLOPS),
                            "flops_source": "per device, from XLA's cost model of the "
                                            "ssljax step (see step_flops_source per case)"}
  for name in args.cases.split(","):
    print(f"case {name} ...", flush=True)
    report["cases"].append(run_case(name, args))
    if args.json:  # after every case, so a run cut short keeps the cases it finished
      os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
      with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print_report({**report, "cases": report["cases"][-1:]})
  if len(report["cases"]) > 1:
    print_report(report)  # all cases in one table
  for case in report["cases"]:
    summary = case["variants"]["ssljax"].get("trace_summary")
    if summary and "by_category_ms" in summary:
      print(f"\n{case['case']}: ssljax device time per step, {summary['line']}: busy "
            f"{summary['busy_ms']:.2f} ms of {summary.get('wall_ms', float('nan')):.2f} ms wall "
            f"({100 * summary['matched_to_hlo_fraction']:.0f}% matched to HLO instructions)")
      for key in ("by_category_ms", "by_phase_ms"):
        for what, ms in summary[key].items():
          print(f"  {what:45s} {ms:8.2f} ms")
  if args.json:
    print(f"wrote {args.json}")
  return report


if __name__ == "__main__":
  main()
