"""Does a refactor of the methods or the step change what training computes?

Runs every built-in method for ``--steps`` (50) steps on a tiny synthetic dataset, from seed 0,
on 1 and on 8 virtual CPU devices, and saves the final train state, or compares it leaf by
leaf with a saved one. Run it once at the commit before a change and once after, on the same
machine:

  git worktree add /tmp/before <parent commit>
  (cd /tmp/before && python /path/to/benchmarks/stage_equivalence.py save /tmp/before.npz)
  python benchmarks/stage_equivalence.py compare /tmp/before.npz \
      [--json benchmarks/results/stage_equivalence.json]

The script only uses APIs that exist on both sides of the method-stages change (it builds a
method's config with ``tests.util.tiny_config`` in either form), so it runs from the older
checkout too; run it with the working directory at the checkout being measured. The table
counts, per method and device count, the state leaves (parameters, optimiser state, method
state) that differ and the largest absolute difference; bit-exact equality is the claim it
tests. Float rounding can legitimately differ when XLA fuses differently (a changed step
graph), which is why the largest difference is printed too.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import os
import platform
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.getcwd())

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Small heads, queues, banks and prototypes for a batch of 16 and 64 training images.
SETTINGS = {
    "simclr": {},
    "moco": {"queue_size": 64, "proj_hidden_dim": 16, "proj_dim": 8},
    "byol": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "swav": {"num_prototypes": 8, "queue_size": 32, "queue_start_epoch": 0.5,
             "freeze_prototypes_epochs": 0.25, "proj_hidden_dim": 16, "proj_dim": 8},
    "barlow_twins": {"proj_hidden_dim": 16, "proj_dim": 16},
    "npid": {"proj_dim": 8, "num_views": 2},
    "dino": {"proj_hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 12,
             "teacher_temperature_warmup_epochs": 2.0},
}


def _config(directory: str, name: str):
  from tests.util import tiny_config
  if "method" in inspect.signature(tiny_config).parameters:
    config = tiny_config(directory, method=name)
  else:  # before the method stages: every section is in the schema
    config = tiny_config(directory)
    config.method.name = name
  for key, value in SETTINGS[name].items():
    config.method[name][key] = value
  return config


def run(name: str, num_devices: int, steps: int) -> tuple[dict[str, np.ndarray], float]:
  """The final state's leaves (by key path) and last loss of `steps` steps of `name`."""
  from ssljax import augment, data
  from ssljax.methods import build_method
  from ssljax.methods.base import RunInfo
  from ssljax.parallel import data_sharded, make_mesh, replicated
  from ssljax.train.optim import build_optimizer, build_schedule
  from ssljax.train.step import compile_train_step, init_train_state, make_per_device_step

  config = _config(tempfile.mkdtemp(), name)
  mesh = make_mesh(jax.devices()[:num_devices])
  source = data.build_source(config.data, config.data.train_split)
  num_examples = len(source.images)
  method = build_method(config, axis_name="data",
                        run=RunInfo(steps_per_epoch=4, total_steps=steps,
                                    num_examples=num_examples))
  policy = augment.build_policy(config.augment, config.data.mean)
  schedule = build_schedule(config.optim, global_batch=config.train.batch_size,
                            total_steps=steps, steps_per_epoch=4)
  groups = getattr(method, "param_groups", None)
  tx = build_optimizer(config.optim, schedule, groups) if groups else build_optimizer(
      config.optim, schedule)
  init = jax.jit(functools.partial(init_train_state, method, tx, policy,
                                   tuple(source.image_shape), config.seed),
                 out_shardings=replicated(mesh))
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule,
                                                 axis_name="data"), mesh)
  state = init()
  put = lambda x: jax.device_put(x, data_sharded(mesh))
  order = np.random.default_rng(0)
  for _ in range(steps):
    index = order.permutation(num_examples)[:config.train.batch_size]
    batch = source.get(index)
    state, metrics = step(state, put(batch["image"]), put(index.astype(np.int32)),
                          put(batch["label"]))
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return ({jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves},
          float(metrics["train/loss"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("mode", choices=("save", "compare"))
  parser.add_argument("path", help="the .npz of saved states")
  parser.add_argument("--methods", default=",".join(SETTINGS))
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--json", default=None, help="compare: write the table here")
  args = parser.parse_args()
  names = args.methods.split(",")
  states, losses = {}, {}
  for name in names:
    for devices in (1, 8):
      state, losses[name, devices] = run(name, devices, args.steps)
      states.update({f"{name}/{devices}/{key}": value for key, value in state.items()})
      print(f"ran {name} on {devices} device(s): last loss {losses[name, devices]:.9g}",
            flush=True)
  if args.mode == "save":
    np.savez(args.path, **states)
    return
  saved = np.load(args.path)
  rows = []
  print(f"\n{'method':14s} {'devices':>7s} {'leaves':>6s} {'differ':>6s} {'max |diff|':>10s}")
  for name in names:
    for devices in (1, 8):
      prefix = f"{name}/{devices}/"
      keys = [k for k in saved.files if k.startswith(prefix)]
      new_keys = {k for k in states if k.startswith(prefix)}
      differ, largest = 0, 0.0
      for key in keys:
        a, b = saved[key], states.get(key)
        if b is None or a.shape != b.shape or not np.array_equal(a, b):
          differ += 1
          if b is not None and a.shape == b.shape and a.dtype.kind == "f":
            largest = max(largest, float(np.max(np.abs(a - b))))
      rows.append({"method": name, "devices": devices, "leaves": len(keys), "differ": differ,
                   "max_abs_diff": largest, "missing": len(set(keys) - new_keys),
                   "added": len(new_keys - set(keys))})
      print(f"{name:14s} {devices:7d} {len(keys):6d} {differ:6d} {largest:10.3g}")
  if args.json:
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
              "steps": args.steps, "reference": os.path.abspath(args.path), "rows": rows}
    with open(args.json, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
