"""Memory of the compiled train step with the non-finite guard as a select and as a cond.

The guard keeps the old state when a step is not finite. ssljax selects leaf by leaf between
the old and the new state (``jnp.where`` over the whole state); a review suspected that this
keeps a third copy of the state alive and proposed returning one of the two with ``lax.cond``.
Commit e19e278 did that; this script compiles both forms of the step for one config, side by
side in one process, and prints XLA's memory analysis of each (bytes of arguments, outputs,
aliased (donated) buffers and temporaries) as a table and JSON:

  python benchmarks/guard_memory.py [--config configs/byol.py:cifar10] [--batch-size 32]
      [--devices 1] [--json benchmarks/results/guard_memory.json]

Each form is ``ssljax/train/step.py`` read from git at a commit (``--select a9941b4``, the
select; ``--cond e19e278``, the cond), with everything else from the working tree, so the two
differ only in the guard. Memory is XLA's static estimate for the compiled program on the
current backend, not a measured peak.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

BENCHMARKS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS_DIR)
sys.path.insert(0, REPO_ROOT)


def _step_module_at(commit: str):
  """``ssljax/train/step.py`` as it was at `commit`, imported under its own name."""
  source = subprocess.run(["git", "-C", REPO_ROOT, "show", f"{commit}:ssljax/train/step.py"],
                          check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f"step_at_{commit}.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location(f"step_at_{commit}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/byol.py:cifar10")
  parser.add_argument("--select", default="a9941b4", help="a commit with the select guard")
  parser.add_argument("--cond", default="e19e278", help="a commit with the lax.cond guard")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=32,
                      help="> 0: overrides the config's batch")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  os.environ.setdefault("XLA_FLAGS",
                        f"--xla_force_host_platform_device_count={args.devices}")
  # The default, a ResNet-18 BYOL (EMA target and momentum) on a small batch, has a train
  # state that is large next to its activations: the guard's share shows best there.
  import jax
  import jax.numpy as jnp
  from ssljax import augment
  from ssljax.config import load_config
  from ssljax.methods import build_method
  from ssljax.parallel import data_sharded, make_mesh, replicated
  from ssljax.train import step as step_now
  from ssljax.train.optim import build_optimizer, build_schedule

  config = load_config(args.config)
  if args.batch_size:
    config.train.batch_size = args.batch_size
  mesh = make_mesh(jax.devices()[:args.devices])
  method = build_method(config, axis_name="data")
  policy = augment.build_policy(config.augment, config.data.mean)
  schedule = build_schedule(config.optim, global_batch=config.train.batch_size,
                            total_steps=1000, steps_per_epoch=100)
  tx = build_optimizer(config.optim, schedule, method.param_groups)
  shape = (config.data.image_size, config.data.image_size, config.data.channels)
  state = jax.eval_shape(functools.partial(step_now.init_train_state, method, tx, policy,
                                           shape, config.seed))
  batch = config.train.batch_size
  images = jax.ShapeDtypeStruct((batch, *shape), jnp.uint8, sharding=data_sharded(mesh))
  rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharded(mesh))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=replicated(mesh)), state)
  rows_out = []
  for label, module in ((f"select ({args.select})", _step_module_at(args.select)),
                        (f"lax.cond ({args.cond})", _step_module_at(args.cond))):
    per_device = module.make_per_device_step(method, tx, policy, schedule, axis_name="data")
    compiled = module.compile_train_step(per_device, mesh).lower(
        state, images, rows, rows).compile()
    stats = compiled.memory_analysis()
    row = {"guard": label,
           "argument_bytes": int(stats.argument_size_in_bytes),
           "output_bytes": int(stats.output_size_in_bytes),
           "alias_bytes": int(stats.alias_size_in_bytes),
           "temp_bytes": int(stats.temp_size_in_bytes)}
    row["total_bytes"] = (row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] +
                          row["temp_bytes"])
    rows_out.append(row)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  print(f"config {args.config}, {args.devices} device(s), train state {state_bytes / 2**20:.2f}"
        f" MiB per device")
  print(f"{'guard':18s} {'args MiB':>9s} {'out MiB':>8s} {'alias MiB':>9s} {'temp MiB':>9s}"
        f" {'total MiB':>9s}")
  for row in rows_out:
    print(f"{row['guard']:18s} " + " ".join(
        f"{row[k] / 2**20:{w}.2f}" for k, w in (("argument_bytes", 9), ("output_bytes", 8),
                                                ("alias_bytes", 9), ("temp_bytes", 9),
                                                ("total_bytes", 9))))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"), "config": args.config, "devices": args.devices,
                 "batch_size": config.train.batch_size,
                 "jax": jax.__version__, "backend": jax.default_backend(),
                 "state_bytes": state_bytes, "rows": rows_out}, f, indent=2)


if __name__ == "__main__":
  main()
