r"""Command line: ``ssljax train``, ``ssljax eval``, ``ssljax export``, ``ssljax analyze`` and
``ssljax sweep``.

  ssljax train --config configs/simclr.py:fashion_mnist --workdir runs/simclr \
      [--config.optim.lr=0.3 ...]
  ssljax eval --workdir runs/simclr [--config.eval.knn_k=20 ...]
  ssljax export --workdir runs/simclr --out runs/simclr/encoder
  ssljax analyze --workdir runs/simclr [--out DIR] [--config.analysis.KEY=VALUE ...]
  ssljax sweep --config configs/simclr.py:fashion_mnist --root runs/geo [--strengths ...]

``ssljax <command> --help`` lists a command's flags and where every config key is documented
(``ssljax/config.py``). ``export`` writes the evaluated encoder (variables with the BN
statistics the kNN used, and a JSON describing its input) for ``ssljax.load_encoder``
(``ssljax.export``). ``analyze`` is the geometry analysis of a checkpoint (encoder vs every
head layer: probes, invariance, dimensionality, Jacobians, tangent-plane overlaps;
docs/geometry.md); ``sweep`` trains and analyses one model per cell of a grid over augmentation
strength and projector width/depth and draws the curves (``ssljax.analysis.sweep``).

Configs are ml_collections files whose ``get_config(arg)`` returns a ConfigDict; the text after
``:`` in ``--config path:arg`` is the argument (the dataset for ``configs/<method>.py``; none:
the file's default). Any key of the loaded config can be overridden with
``--config.<key>=<value>``, and a key that does not exist is an error naming the valid keys. A
config runs the method its file builds (``method.<name>`` is its only method section): to run
another method, use that method's config file. Add-ons are named in ``method.addons``; on the
command line ``--config.method.addons=cld`` (or ``"('cld', 'uota')"``) adds their sections with
their defaults before the other overrides apply, so ``--config.method.cld.<key>=...`` can
follow. ``train`` on an existing workdir resumes from its latest checkpoint. ``eval`` restores
the latest checkpoint with the config saved in the workdir (``--config.eval.*`` overrides
apply).

Exit codes: 0 done; 1 an invalid config, a config that cannot resume the workdir's checkpoint,
no intact checkpoint, an evaluation that failed after the others were written (the linear
evaluation's non-finite loss), or another error (a message, no traceback, for the first
four); 74 a
checkpoint could not be written (EX_IOERR: full disk, unwritable directory; earlier
checkpoints are kept and rerunning the command resumes from the latest); 69 the processes of
a multi-host run did not all connect within ``--distributed_timeout``; 143 stopped by SIGTERM
after checkpointing (rerunning resumes).

Multi-host: ``--distributed`` (auto-detected TPU pod, SLURM, Open MPI, Kubernetes) or
``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the environment
variables ``SSLJAX_DISTRIBUTED``, ``SSLJAX_COORDINATOR_ADDRESS``, ``SSLJAX_NUM_PROCESSES``,
``SSLJAX_PROCESS_ID``, ``SSLJAX_DISTRIBUTED_TIMEOUT``) start ``jax.distributed`` before
anything touches a device (``ssljax.parallel.initialize_distributed``); ``launch/slurm.sbatch``
and ``launch/tpu_pod.sh`` run it on clusters.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

USAGE = __doc__

_HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG_KEYS = f"""\
config keys:
  Every key, with its default and a comment, is declared in
    {os.path.join(_HERE, "config.py")}
  (default_config: sections data, augment, model, method, optim, train, eval; the presets
  set_dataset, set_augment_preset, set_cpu_job and set_image_folder list the values they
  set). A method's own section, method.<name>, is the default_section of
    {os.path.join(_HERE, "methods", "<name>.py")}
  and so is an add-on's (method.<addon>). The recipes per method and dataset are
    {os.path.join(_HERE, "configs", "<method>.py")}
  (--config <method>:<dataset>). A run writes every key it used to <workdir>/config.json."""

_EXIT_CODES = """\
exit codes:
  0 done; 1 an invalid config, a config that cannot resume the workdir's checkpoint, no intact
  checkpoint, an evaluation that failed after the others were written, or another error; 74 a
  checkpoint could not be written (rerunning resumes from the latest); 69 the processes of a
  multi-host run did not all connect within --distributed_timeout; 143 stopped by SIGTERM after
  checkpointing (rerunning resumes)."""

_DISTRIBUTED_HELP = """\
multi-host (TPU pods, GPU clusters, several processes on one machine):
  Run the same command in every process. Each loads its share of every global batch; only
  process 0 writes config.json, metrics, plots and results; all write the checkpoints
  (the workdir must be one directory that every process sees: a shared filesystem
  or a gs:// bucket).
  --distributed        start jax.distributed, detecting the cluster: Cloud TPU pod VMs,
                       SLURM (srun, one task per GPU or per node), Open MPI, Kubernetes
                       (env SSLJAX_DISTRIBUTED=1; --nodistributed or =0 switches it off)
  --coordinator_address HOST:PORT  --num_processes N  --process_id I
                       explicit set-up anywhere else (all three; implies --distributed);
                       env SSLJAX_COORDINATOR_ADDRESS, SSLJAX_NUM_PROCESSES, SSLJAX_PROCESS_ID
  --distributed_timeout SECONDS
                       how long a process waits for the others (default 300; env
                       SSLJAX_DISTRIBUTED_TIMEOUT); then it exits with 69 and says what to
                       check. train.batch_size must be divisible by the process count.
  --local_device_ids 0,1,...
                       the local GPUs this process drives (env SSLJAX_LOCAL_DEVICE_IDS);
                       under SLURM JAX gives each task the one GPU of its local rank, so
                       one process per node with several GPUs needs them all listed.
  Flags win over the environment. On CPU the processes talk through gloo.
  A gs:// workdir or data.data_dir must answer within 60 s (env SSLJAX_BUCKET_TIMEOUT,
  seconds), or the run stops with a message saying what to check."""

TRAIN_HELP = f"""\
usage: ssljax train --config FILE[:ARG] --workdir DIR [--config.KEY=VALUE ...]

Pretrains the method of a config file, checkpointing into DIR, then evaluates the encoder
(kNN, linear probe) and writes DIR/results.json. On an existing DIR it resumes from the latest
checkpoint.

flags:
  --config FILE[:ARG]  a config file, or the name of a config that ships with ssljax (a
                       method: barlow_twins, byol, cissl, dino, dissl, metamask, moco, npid,
                       simclr, swav; or method_addon: simclr_uota, moco_cld, ...); ARG is
                       passed to its get_config (a method's dataset: fashion_mnist (default),
                       cifar10, cifar100, imagenet), e.g. --config simclr:fashion_mnist, or
                       from the repository --config configs/simclr.py:fashion_mnist. ARG
                       folder (any config): your own images, DIR/train/<class>/<image> with
                       --config.data.data_dir=DIR; classes, channels, size and mean/std are
                       read from DIR (ssljax/data/folder.py; README 'Your own images')
  --workdir DIR        checkpoints, config.json, metrics.jsonl, tensorboard/, results.json;
                       a bucket (gs://bucket/run) needs gcsfs (pip install gcsfs)
  --config.KEY=VALUE   overrides one key of the config, e.g. --config.optim.lr=0.3 or
                       --config.train.epochs=2; a key that does not exist is an error naming
                       the valid keys. --config.method.addons=NAME adds an add-on's section
                       first, so --config.method.NAME.KEY=VALUE can follow.
  --log_level LEVEL    Python logging level (default INFO)
  -h, --help           this message

{_DISTRIBUTED_HELP}

{_CONFIG_KEYS}

{_EXIT_CODES}
"""

EVAL_HELP = f"""\
usage: ssljax eval --workdir DIR [--config.eval.KEY=VALUE ...]

Restores the latest checkpoint of DIR with the config saved there (DIR/config.json),
evaluates the encoder (kNN, linear probe; the MLP probe with --config.eval.mlp_probe=True)
and adds the results to DIR/results.json: earlier
evaluations are kept, each under "evaluations" with the config keys it changed ("options"),
and the top-level keys stay those of the run's own config (ssljax/eval/results.py).

flags:
  --workdir DIR        a directory written by ssljax train
  --config.KEY=VALUE   overrides a key of the saved config, usually under eval, e.g.
                       --config.eval.knn_k=20 or --config.eval.linear_probe=False
  --log_level LEVEL    Python logging level (default INFO)
  -h, --help           this message

{_DISTRIBUTED_HELP}

{_CONFIG_KEYS}

{_EXIT_CODES}
"""

EXPORT_HELP = f"""\
usage: ssljax export --workdir DIR --out OUT [--config.eval.KEY=VALUE ...]

Restores the latest checkpoint of DIR with the config saved there and writes the encoder the
evaluation applies to OUT: variables.msgpack (parameters and BN statistics, re-estimated as
for the reported kNN when eval.precise_bn_examples > 0), encoder.json (architecture, input
size, channels, mean/std, feature dimension) and config.json. ssljax.load_encoder(OUT)
returns (module, variables) without the workdir or the data; then
module.apply(variables, images / 255, train=False) embeds uint8 [B, H, W, C] images.

flags:
  --workdir DIR        a directory written by ssljax train (its training data is read to
                       rebuild the run and, with eval.precise_bn_examples > 0, for the BN
                       statistics)
  --out OUT            the export directory (created; a bucket path needs gcsfs)
  --config.KEY=VALUE   overrides a key of the saved config, e.g.
                       --config.eval.precise_bn_examples=0 for training's running statistics
  --log_level LEVEL    Python logging level (default INFO)
  -h, --help           this message

{_DISTRIBUTED_HELP}

{_CONFIG_KEYS}

{_EXIT_CODES}
"""

COMMAND_HELP = {"train": TRAIN_HELP, "eval": EVAL_HELP, "export": EXPORT_HELP}


def _wants_help(argv: list[str]) -> bool:
  """Whether `argv` (the command's arguments) asks for help, before any ``--``."""
  for arg in argv:
    if arg == "--":
      return False
    if arg in ("-h", "--help", "--helpshort", "--helpfull"):
      return True
  return False

# XLA:CPU options that speed up the convolution-heavy train step on CPUs: fusing dots and
# reductions through YNNPACK and fast math gave 1.29x over no flags on the default job's step
# (benchmarks/cpu_step.py --sweep-flags, 2-core AMD EPYC, 2026-11-23). Fast math here still
# honours NaN and inf, which the non-finite guard relies on. Applied only when the user has
# not set XLA_FLAGS, and ignored by GPU/TPU backends.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce "
                 "--xla_cpu_enable_fast_math=true")


# Environment defaults set before NumPy, SciPy or JAX load (a value the user set wins). One
# OpenBLAS thread: the LAPACK routines XLA:CPU calls inside a compiled step (UOTA's Cholesky
# factor and triangular solve) otherwise start OpenBLAS's thread pool, whose spinning threads
# then compete with XLA's own for the cores for the rest of the step. UOTA's closed form cost
# 1.17x SwAV's step with the pool and 1.02x without it (interleaved A/B in one process, 2-core
# AMD EPYC, 2026-12-03; docs/results.md, UOTA). XLA's own dots and convolutions do not use
# OpenBLAS, and GPU/TPU steps do not call it.
CPU_ENV_DEFAULTS = {"OPENBLAS_NUM_THREADS": "1"}


def set_cpu_defaults() -> None:
  """`CPU_XLA_FLAGS` unless XLA_FLAGS is set, and `CPU_ENV_DEFAULTS` where unset; call before
  NumPy, SciPy or JAX load (``ssljax train``/``eval``/``export``/``analyze``, the benchmarks)."""
  if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = CPU_XLA_FLAGS
  for key, value in CPU_ENV_DEFAULTS.items():
    os.environ.setdefault(key, value)


def _parse(argv: list[str], command: str):
  argv = _join_config_value(argv)
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.",
                      flag_values=fv)
  flags.DEFINE_string("log_level", "INFO", "Python logging level.", flag_values=fv)
  if command == "export":
    flags.DEFINE_string("out", None, "Export directory.", flag_values=fv)
  _define_distributed_flags(fv)
  if command == "train":
    config = _load_train_config(argv)
    where = "this config"
  else:
    from ssljax.train.loop import load_workdir_config
    from ssljax.train.paths import WorkdirError
    workdir = _peek_flag(argv, "workdir")
    if workdir is None:
      raise SystemExit(f"ssljax {command}: --workdir is required")
    try:
      config = load_workdir_config(workdir)
    except (WorkdirError, FileNotFoundError) as e:
      raise SystemExit(f"ssljax {command}: {e}") from None
    where = "this workdir's config"
  _check_override_keys(argv, config, where)
  # The config is loaded above; the flag holds it and applies the --config.<key> overrides.
  argv = [arg for arg in argv if not arg.startswith("--config=")]
  config_flags.DEFINE_config_dict("config", config, "The run's config.", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except (flags.Error, OSError) as e:
    raise SystemExit(f"ssljax {command}: {e}") from None
  if fv.workdir is None:
    raise SystemExit(f"ssljax {command}: --workdir is required")
  if command == "export" and fv.out is None:
    raise SystemExit("ssljax export: --out is required (the directory to write the encoder to)")
  from ssljax.config import check_method_sections
  try:
    check_method_sections(fv.config)
  except ValueError as e:
    raise SystemExit(f"ssljax {command}: {e}") from None
  return fv


def _define_distributed_flags(fv) -> None:
  """The multi-process flags (ssljax.parallel.distributed_settings reads them)."""
  flags.DEFINE_bool("distributed", None, "Start jax.distributed (multi-host).", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "Number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's id, 0..N-1.", flag_values=fv)
  flags.DEFINE_integer("distributed_timeout", None, "Seconds to wait for every process.",
                       flag_values=fv)
  flags.DEFINE_string("local_device_ids", None, "Local accelerator ids of this process.",
                      flag_values=fv)


def _start_distributed(fv, command: str) -> None:
  """Connects the processes of a multi-host run when the flags or environment ask for it.

  An explicit process count is checked against the global batch before connecting, so a
  wrong count fails at once on every process rather than after the rendezvous.
  """
  from ssljax import parallel
  try:
    settings = parallel.distributed_settings(
        distributed=fv.distributed, coordinator_address=fv.coordinator_address,
        num_processes=fv.num_processes, process_id=fv.process_id,
        timeout_s=fv.distributed_timeout, local_device_ids=fv.local_device_ids)
    if settings.num_processes and command == "train":
      parallel.check_processes_divide_batch(fv.config.train.batch_size,
                                            settings.num_processes)
    if settings.enabled:
      logging.info("starting jax.distributed (%s)",
                   f"process {settings.process_id} of {settings.num_processes}, coordinator "
                   f"{settings.coordinator_address}" if settings.explicit else "auto-detected")
    parallel.initialize_distributed(settings)
  except (parallel.DistributedSetupError, ValueError) as e:
    raise SystemExit(f"ssljax {command}: {e}") from None


def _load_train_config(argv: list[str]):
  """The config of ``--config path[:arg]``, with the sections of add-ons named on the command
  line (``--config.method.addons=...``) added."""
  from ml_collections.config_flags import tuple_parser

  from ssljax.config import load_config, with_method
  spec = _peek_flag(argv, "config")
  if spec is None:
    raise SystemExit("ssljax train: --config is required (e.g. configs/simclr.py:fashion_mnist)")
  try:
    config = load_config(spec)
  except FileNotFoundError as e:
    raise SystemExit(f"ssljax train: {e}") from None
  except (TypeError, ValueError, KeyError) as e:
    raise SystemExit(f"ssljax train: config {spec!r}: {e}") from None
  addons = [v for a in argv if a.startswith("--config.method.addons=")
            for v in tuple_parser.TupleParser().parse(a.split("=", 1)[1])]
  if addons and tuple(addons) != tuple(config.method.get("addons", ())):
    try:
      config = with_method(config, config.method.name, addons)
    except ValueError as e:
      raise SystemExit(f"ssljax train: {e}") from None
  return config


def _join_config_value(argv: list[str]) -> list[str]:
  """``--config PATH`` -> ``--config=PATH``: ml_collections registers the ``--config.*``
  override flags only for the joined form."""
  out, i = [], 0
  while i < len(argv):
    if argv[i] == "--config" and i + 1 < len(argv):
      out.append(f"--config={argv[i + 1]}")
      i += 2
    else:
      out.append(argv[i])
      i += 1
  return out


def _peek_flag(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_override_keys(argv: list[str], config, where: str) -> None:
  """Rejects ``--config.<key>`` overrides whose key is not in `config`, naming valid keys.

  A key under another method's or an add-on's section says how to get that section.
  """
  from ssljax.methods import base
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        if depth == 1 and parts[0] == "method":
          _explain_method_section(key, part, config, where, base)
        where_key = "config." + ".".join(parts[:depth]) if depth else "config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
        raise SystemExit(f"unknown config key {key!r}: {where_key} has no key {part!r}. "
                         f"Valid keys of {where_key}: {valid}")
      node = node[part]


def _explain_method_section(key: str, section: str, config, where: str, base) -> None:
  """Raises SystemExit if `section` is another method's or an add-on's config section."""
  from ssljax.config import DATASETS
  name = config.method.name
  addons = tuple(config.method.get("addons", ()))
  if section in base.registered_methods():
    raise SystemExit(
        f"config key {key!r} belongs to method {section!r}, but {where} runs method {name!r} "
        f"and holds only its section, method.{name}. A config runs the method it was built "
        f"for: to run {section}, use --config configs/{section}.py:<dataset> (datasets: "
        f"{', '.join(DATASETS)}) and override method.{section}.* there")
  if section in base.registered_addons():
    raise SystemExit(
        f"config key {key!r} belongs to add-on {section!r}, which is not in method.addons "
        f"{addons} of {where}. Add it first with --config.method.addons="
        f"\"{addons + (section,)!r}\": its section method.{section} then joins the config "
        f"with its defaults, and --config.method.{section}.* overrides apply")


EXIT_CHECKPOINT_NOT_WRITTEN = 74  # EX_IOERR of sysexits.h


def _exit_now(message: str, code: int) -> None:
  """Reports `message` and ends the process with `code` without waiting for other threads.

  After a failed save, orbax's writer threads wait for its coordination timeout (20 minutes)
  before a normal interpreter exit could finish; the checkpoints on disk are already final.
  """
  print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  logging.shutdown()
  os._exit(code)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if (len(argv) >= 3 and argv[1] == "help"
      and argv[2] in ("train", "eval", "export", "analyze", "sweep")):
    argv = [argv[0], argv[2], "--help"]  # `ssljax help train` is `ssljax train --help`
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if len(argv) >= 2 else 2
  command, rest = argv[1], [argv[0]] + argv[2:]
  if command in COMMAND_HELP and _wants_help(rest[1:]):
    print(COMMAND_HELP[command])
    return 0
  if command == "analyze":
    set_cpu_defaults()  # includes one OpenBLAS thread (see ssljax.analysis.analyze)
    from ssljax.analysis.analyze import main as analyze_main
    return analyze_main(rest[1:])
  if command == "sweep":
    from ssljax.analysis.sweep import main as sweep_main
    return sweep_main(rest[1:])
  if command not in ("train", "eval", "export"):
    print(f"ssljax: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2
  set_cpu_defaults()
  # Before the flags are parsed: reading a workdir's config (eval, export) can log through the
  # root logger, which would otherwise install a WARNING-level handler first and silence every
  # INFO line of the run (the level flag is read ahead for this; _parse checks it).
  level = (_peek_flag(rest, "log_level") or "INFO").upper()
  logging.basicConfig(level=getattr(logging, level, logging.INFO),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  fv = _parse(rest, command)
  _start_distributed(fv, command)
  from ssljax.train import loop  # deferred: keeps `ssljax --help` fast
  from ssljax.train.checkpoint import (CheckpointMismatchError, CheckpointSaveError,
                                       NoIntactCheckpointError)
  from ssljax.train.paths import WorkdirError
  from ssljax.train.validate import ConfigError
  try:
    if command == "train":
      results = loop.train(fv.config, fv.workdir)
    elif command == "export":
      from ssljax.export import export_encoder
      try:
        spec = export_encoder(fv.workdir, fv.out, fv.config)
      except FileNotFoundError as e:  # no checkpoint, or the run's data is missing
        raise SystemExit(f"ssljax export: {e}") from None
      results = {"step": spec["step"], "feature_dim": spec["feature_dim"]}
    else:
      results = loop.evaluate_workdir(fv.workdir, fv.config)
  except (ConfigError, CheckpointMismatchError, NoIntactCheckpointError, WorkdirError,
          loop.DataSourceError) as e:
    raise SystemExit(f"ssljax {command}: {e}") from None
  except CheckpointSaveError as e:
    _exit_now(f"ssljax {command}: {e}", EXIT_CHECKPOINT_NOT_WRITTEN)
  summary = {k: v for k, v in results.items() if isinstance(v, (int, float))}
  print(json.dumps(summary, indent=2, sort_keys=True))
  failed = {k: v for k, v in results.items() if k.endswith("/error")}
  for key, message in sorted(failed.items()):  # the other results are written already
    print(f"ssljax {command}: {key.split('/')[0]} failed: {message}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
