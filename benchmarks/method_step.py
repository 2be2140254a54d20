"""Train-step time of every registered method (and the add-on methods of `ADDON_METHODS`, e.g.
``npid+cld`` from configs/npid_cld.py, and the named arms of `VARIANTS`, e.g.
``swav[multi-crop]`` and ``swav+uota``) relative to SimCLR, measured side by side.

Run from the repository root:

  python benchmarks/method_step.py [--methods simclr,barlow_twins,...] [--batch-size N]
      [--steps N] [--rounds N] [--json benchmarks/results/method_step.json]

Each method is built from its CPU config ``configs/<method>.py:fashion_mnist`` exactly as
``ssljax train`` builds it (``ssljax.train.loop.build_state_and_step``: the method with the
real `RunInfo` of a Fashion-MNIST run, its augmentation policy, optimiser and schedule, and
``compile_train_step`` of ``make_per_device_step`` on the mesh), with two things made equal
for all methods: the ``model`` section (backbone) and the global batch are those of SimCLR's
config (``--batch-size`` overrides the batch). What each method adds (heads, teachers, extra
views, queues, its loss) is what the table compares. Every step gets the same batch of real
training images.

All methods live in one process and are compiled first (compile time is reported on its own).
Then, after ``WARMUP_STEPS`` untimed steps each, ``--rounds`` rounds run ``--steps`` timed
steps of every method in turn, the order rotating from round to round, so that load from other
jobs and slow drift hit every method alike. Each step's wall time is taken after its outputs
are ready; a method's time is the median over all its timed steps, and its ratio is that
median over SimCLR's. ``XLA_FLAGS`` defaults to ``ssljax.cli.CPU_XLA_FLAGS``, as for
``ssljax train``. The JSON also holds the per-round medians, CPU times and load averages, and
each step's memory as XLA's buffer assignment reports it (``peak_mib``, ``temp_mib``:
`step_memory`), which is what the ``metamask[remat]`` arm changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
for path in (REPO_ROOT, BENCHMARKS_DIR):
  if path not in sys.path:
    sys.path.insert(0, path)

import cpu_step  # noqa: E402  (shared timing and reporting helpers; imports no JAX)

REFERENCE = "simclr"
CONFIG_PATTERN = os.path.join("configs", "{method}.py")
DATASET = "fashion_mnist"
DEFAULT_JSON = os.path.join("benchmarks", "results", "method_step.json")
NUM_EXAMPLES = 60000  # Fashion-MNIST's training split: sizes the RunInfo of every method.
WARMUP_STEPS = 2
# Methods wrapped by an add-on, timed from their configs/<method>_<add-on>.py. CLD's target
# (issue 15): NPID+CLD and MoCo+CLD within 1.15x of their base methods' steps, MoCo+CLD's
# third view counted. Ratios are to SimCLR, so compare e.g. npid+cld's ratio with npid's.
ADDON_METHODS = ("npid+cld", "moco+cld", "byol+cld")
# Named arms timed from a config spec other than configs/<method>.py:fashion_mnist, with
# overrides: the exact bases the add-ons are compared with in docs/results.md. Name ->
# (config spec, the method it must build, overrides). UOTA's target (issue 16): the closed
# form within 1.10x of its multi-crop base; CLD's NPID and MoCo arms use the base methods'
# view counts of the CLD comparison (NPID two views, MoCo three).
VARIANTS = {
    "npid[2 views]": ("configs/npid.py:fashion_mnist", "npid", {"method.npid.num_views": 2}),
    "moco[3 views]": ("configs/moco.py:fashion_mnist", "moco",
                      {"method.moco.num_views": 3, "method.moco.symmetric": False,
                       "augment.num_views": 3}),
    # CISSL's target (issue 17) is against the ISSL code's SimCLR, whose one shared head is
    # CISSL's teacher (Linear-BN-ReLU to 1024, Linear to 128, BN); configs/simclr.py's head is
    # 512 wide without the last BN.
    "simclr[issl head]": ("configs/simclr.py:fashion_mnist", "simclr",
                          {"method.simclr.proj_hidden_dim": 1024,
                           "method.simclr.proj_last_bn": True}),
    # DISSL's target (issue 17) is against DINO on the same views; configs/dino.py's
    # Fashion-MNIST views are 28 px (about twice the pixels of DISSL's 20-px SimCLR-job views),
    # so the plain dino arm is not DISSL's base. This arm puts DINO on DISSL's views.
    "dino[dissl views]": ("configs/dino.py:fashion_mnist", "dino",
                          {"augment.policy": "simclr", "augment.crop_size": 20,
                           "augment.crop_scale": (0.2, 1.0),
                           "augment.jitter": (0.8, 0.8, 0.0, 0.0)}),
    "swav[multi-crop]": ("configs/swav_uota.py:fashion_mnist_base", "swav", {}),
    "swav+uota": ("configs/swav_uota.py:fashion_mnist", "swav+uota", {}),
    "swav+uota[learned]": ("configs/swav_uota.py:fashion_mnist_learned", "swav+uota", {}),
    "simclr[multi-crop]": ("configs/simclr_uota.py:fashion_mnist_base", "simclr", {}),
    "simclr+uota": ("configs/simclr_uota.py:fashion_mnist", "simclr+uota", {}),
    "byol[multi-crop]": ("configs/byol_uota.py:fashion_mnist_base", "byol", {}),
    "byol+uota": ("configs/byol_uota.py:fashion_mnist", "byol+uota", {}),
    # MetaMask's target (issue 18): its step within 2.5x of Barlow Twins + SimCLR on the same
    # backbone without the meta step (the mask fixed).
    "metamask[no meta step]": ("configs/metamask.py:fashion_mnist", "metamask",
                               {"method.metamask.meta_step": False}),
    "metamask[finite difference]": ("configs/metamask.py:fashion_mnist", "metamask",
                                    {"method.metamask.second_order": "finite_difference"}),
    # The exact meta step with the backbone under jax.checkpoint (memory against time).
    "metamask[remat]": ("configs/metamask.py:fashion_mnist", "metamask",
                        {"method.metamask.remat_backbone": True}),
}


def config_path(method: str) -> str:
  """The config file of `method` (``npid+cld``: ``configs/npid_cld.py``; a `VARIANTS` arm: its
  spec's file); ``config_spec`` adds the dataset argument."""
  if method in VARIANTS:
    return VARIANTS[method][0].split(":")[0]
  return CONFIG_PATTERN.format(method=method.replace("+", "_"))


def config_spec(method: str) -> str:
  if method in VARIANTS:
    return VARIANTS[method][0]
  return f"{config_path(method)}:{DATASET}"


def method_config(method: str, reference, batch_size: int):
  """``configs/<method>.py:fashion_mnist`` with the reference backbone and `batch_size`."""
  config = cpu_step.load_config(config_spec(method))
  expected, overrides = (VARIANTS[method][1], VARIANTS[method][2]) if method in VARIANTS else (
      method, {})
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  built = "+".join([config.method.name, *config.method.get("addons", ())])
  if built != expected:
    raise ValueError(f"{config_spec(method)} trains {built!r}, not {expected!r}")
  config.model.update(reference.model.to_dict())
  config.train.batch_size = batch_size
  return config


class MethodBench:
  """One method's compiled step and its running state (the step donates the state)."""

  def __init__(self, name: str, config, mesh, batch: dict[str, Any]):
    import jax
    from ssljax.train import loop

    steps_per_epoch, total_steps = loop.run_length(config, NUM_EXAMPLES)
    self.name = name
    self.batch = batch
    self.run_info = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                     "num_examples": NUM_EXAMPLES}
    image_shape = tuple(batch["image"].shape[1:])
    start = time.perf_counter()
    method, init, step = loop.build_state_and_step(config, mesh, image_shape, steps_per_epoch,
                                                   total_steps, num_examples=NUM_EXAMPLES)
    self.state = init()
    cpu_step.block(self.state)
    self.init_s = time.perf_counter() - start
    self.num_views = method.num_views
    self.param_count = sum(int(leaf.size) for leaf in jax.tree.leaves(self.state.params))
    start = time.perf_counter()
    self.step = step.lower(self.state, batch["image"], batch["index"], batch["label"]).compile()
    self.compile_s = time.perf_counter() - start
    self.memory = step_memory(self.step)
    self.wall: list[float] = []
    self.cpu: list[float] = []
    self.round_medians: list[float] = []
    self.loss = float("nan")

  def run(self) -> tuple[float, float]:
    """One step; returns its (wall, process CPU) seconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    self.state, metrics = self.step(self.state, self.batch["image"], self.batch["index"],
                                    self.batch["label"])
    cpu_step.block((self.state, metrics))
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    self.loss = float(metrics["train/loss"])
    return wall, cpu

  def timed_round(self, steps: int) -> None:
    walls = []
    for _ in range(steps):
      wall, cpu = self.run()
      walls.append(wall)
      self.cpu.append(cpu)
    self.wall += walls
    self.round_medians.append(statistics.median(walls))

  def report(self, reference_median_s: float | None) -> dict[str, Any]:
    timing = cpu_step.summarize(self.wall, self.cpu)
    median = timing["median_s"]
    return {
        "config": config_spec(self.name), "run_info": self.run_info,
        "views": self.num_views, "param_count": self.param_count,
        "init_s": round(self.init_s, 2), "compile_s": round(self.compile_s, 2),
        "median_ms": 1000 * median, "mean_ms": 1000 * timing["mean_s"],
        "min_ms": 1000 * timing["min_s"], "cpu_median_ms": 1000 * timing["cpu_median_s"],
        "timed_steps": timing["calls"],
        "round_median_ms": [1000 * m for m in self.round_medians],
        "ratio_to_simclr": median / reference_median_s if reference_median_s else None,
        "last_loss": self.loss, "nonfinite_step": int(self.state.nonfinite_step),
        **self.memory,
    }


def step_memory(compiled) -> dict[str, float | None]:
  """XLA's buffer assignment of the compiled step, in MiB (per device).

  ``peak_mib`` = arguments + outputs + temporaries - aliased (donated) bytes: the memory the
  step needs at its peak as XLA planned it, the same figure on every backend (on a GPU/TPU it
  is what must fit in device memory). ``temp_mib`` is the activations and other temporaries,
  the part ``jax.checkpoint`` trades against recomputation. None where the backend gives no
  analysis.
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (backends without the analysis)
    stats = None
  if stats is None:
    return {"peak_mib": None, "temp_mib": None}
  mib = 1 / 2 ** 20
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return {"peak_mib": peak * mib, "temp_mib": stats.temp_size_in_bytes * mib}


def real_batch(reference, mesh) -> dict[str, Any]:
  """The first ``train.batch_size`` training images of the reference config, on the mesh."""
  import jax
  import numpy as np
  from ssljax import data
  from ssljax.parallel import check_batch_divisible, data_sharded

  batch_size = reference.train.batch_size
  check_batch_divisible(batch_size, mesh)
  source = data.build_source(reference.data, reference.data.train_split)
  examples = source.get(np.arange(batch_size))
  sharding = data_sharded(mesh)
  return {"image": jax.device_put(examples["image"], sharding),
          "index": jax.device_put(np.arange(batch_size, dtype=np.int32), sharding),
          "label": jax.device_put(np.asarray(examples["label"], np.int32), sharding)}


def select_methods(requested: str | None) -> tuple[list[str], dict[str, str]]:
  """The methods to time (SimCLR first) and the skipped ones with the reason."""
  from ssljax.methods import registered_methods

  default = registered_methods() + list(ADDON_METHODS)
  registered = default + list(VARIANTS)  # the VARIANTS arms run when asked for by name
  names = [m.strip() for m in requested.split(",") if m.strip()] if requested else default
  unknown = sorted(set(names) - set(registered))
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; registered: {registered}")
  skipped = {m: f"no {config_path(m)}" for m in names
             if not os.path.exists(os.path.join(REPO_ROOT, config_path(m)))}
  if REFERENCE in skipped:
    raise SystemExit(f"the reference config {config_path(REFERENCE)} is missing")
  names = [REFERENCE] + [m for m in names if m != REFERENCE and m not in skipped]
  return names, skipped


def main(args: argparse.Namespace) -> None:
  os.chdir(REPO_ROOT)
  from ssljax.cli import set_cpu_defaults  # what `ssljax train` sets (imports no NumPy)
  set_cpu_defaults()
  import jax
  from ssljax.parallel import make_mesh

  names, skipped = select_methods(args.methods)
  reference = cpu_step.load_config(config_spec(REFERENCE))
  batch_size = args.batch_size or reference.train.batch_size
  reference.train.batch_size = batch_size
  report: dict[str, Any] = {
      "reference": REFERENCE, "batch_size": batch_size, "steps": args.steps,
      "rounds": args.rounds, "warmup_steps": WARMUP_STEPS,
      "xla_flags": os.environ["XLA_FLAGS"], "devices": jax.device_count(),
      "model": reference.model.to_dict(), "skipped": skipped,
      "device": cpu_step.device_description()}
  for name, reason in skipped.items():
    print(f"skipping {name}: {reason}", flush=True)

  mesh = make_mesh()
  batch = real_batch(reference, mesh)
  benches = []
  for name in names:
    print(f"compiling {name} ...", end=" ", flush=True)
    bench = MethodBench(name, method_config(name, reference, batch_size), mesh, batch)
    print(f"{bench.compile_s:.1f}s", flush=True)
    benches.append(bench)
  for bench in benches:
    for _ in range(WARMUP_STEPS):
      bench.run()
  for r in range(args.rounds):
    shift = r % len(benches)
    for bench in benches[shift:] + benches[:shift]:
      bench.timed_round(args.steps)
    print(f"round {r + 1}/{args.rounds} done (load {cpu_step.load_average()})", flush=True)

  reference_median = statistics.median(benches[0].wall)
  report["methods"] = {b.name: b.report(reference_median) for b in benches}
  report["device"]["load_average_at_end"] = cpu_step.load_average()
  print_table(report)
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(report, f, indent=2)
  print(f"\nwrote {args.json}")


def print_table(report: dict[str, Any]) -> None:
  batch = report["batch_size"]
  print(f"\nbatch {batch}, {report['rounds']} rounds x {report['steps']} steps per method, "
        f"{report['devices']} device(s), load {report['device']['load_average_at_start']} -> "
        f"{report['device']['load_average_at_end']}")
  rows = [("method", "views", "params", "ms/step", "x simclr", "images/s", "compile s",
           "peak MiB", "temp MiB")]
  mib = lambda v: "-" if v is None else f"{v:.0f}"
  for name, r in report["methods"].items():
    rows.append((name, str(r["views"]), f"{r['param_count']:,}", f"{r['median_ms']:.1f}",
                 f"{r['ratio_to_simclr']:.2f}", f"{1000 * batch / r['median_ms']:.0f}",
                 f"{r['compile_s']:.1f}", mib(r.get("peak_mib")), mib(r.get("temp_mib"))))
  cpu_step.print_table(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default=None,
                      help="comma-separated method names (default: every registered method "
                           "with a configs/<method>.py); simclr is always timed")
  parser.add_argument("--batch-size", type=int, default=0,
                      help="global batch for every method (default: SimCLR config's)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--json", default=DEFAULT_JSON, help="JSON file to write")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.rounds < 1:
    parser.error("--steps and --rounds must be >= 1")
  return args


if __name__ == "__main__":
  main(parse_args())
