"""launch/slurm.sbatch and launch/tpu_pod.sh: their dry runs (SSLJAX_DRY_RUN=1) print the
commands they would run; no cluster, gcloud or SLURM is needed. A stand-in srun/scontrol
checks the SLURM script's requeue after a SIGTERM-stopped run."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, env: dict[str, str] | None = None, dry: bool = True
         ) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("SLURM_", "SSLJAX_", "TPU_", "ZONE", "PROJECT", "REPO_URL",
                               "SPOT"))}
  if dry:
    base["SSLJAX_DRY_RUN"] = "1"
  return subprocess.run(["bash", os.path.join(_REPO, "launch", script), *args],
                        env={**base, **(env or {})}, cwd=_REPO, capture_output=True,
                        text=True, timeout=60)


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
  """The printed commands, each split back into its arguments."""
  return [shlex.split(line[2:]) for line in result.stdout.splitlines()
          if line.startswith("+ ")]


# ------------------------------------------------------------------ SLURM


def test_slurm_one_task_per_gpu_runs_ssljax_with_slurm_detection():
  result = _run("slurm.sbatch", "configs/simclr.py:imagenet", "/shared/w",
                "--config.optim.lr=0.3")
  assert result.returncode == 0, result.stderr
  srun, requeue = _commands(result)
  assert srun == ["srun", "--kill-on-bad-exit=1", "python3", "-m", "ssljax.cli", "train",
                  "--config", "configs/simclr.py:imagenet", "--workdir", "/shared/w",
                  "--distributed", "--config.optim.lr=0.3"]
  assert requeue == ["scontrol", "requeue", "DRYRUN"]
  assert "SSLJAX_LOCAL_DEVICE_IDS" not in result.stdout


def test_slurm_one_task_per_node_lists_the_nodes_gpus():
  result = _run("slurm.sbatch", "c.py", "w", env={
      "SSLJAX_TASKS": "node", "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "4",
      "PYTHON": "/shared/venv/bin/python"})
  assert result.returncode == 0, result.stderr
  assert "SSLJAX_LOCAL_DEVICE_IDS=0,1,2,3" in result.stdout.splitlines()
  srun = _commands(result)[0]
  assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
                      "/shared/venv/bin/python"]
  assert _commands(result)[1] == ["scontrol", "requeue", "42"]


def test_slurm_array_job_takes_its_line_of_the_sweep_file(tmp_path):
  sweep = tmp_path / "sweep.txt"
  sweep.write_text("# learning rates\n--config.optim.lr=0.3\n\n"
                   "--config.optim.lr=0.6 --config.seed=1\n")
  env = {"SSLJAX_SWEEP": str(sweep), "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "1"}
  result = _run("slurm.sbatch", "c.py", "/shared/sweep", "--config.train.epochs=10", env=env)
  assert result.returncode == 0, result.stderr
  srun = _commands(result)[0]
  assert srun[srun.index("--workdir") + 1] == "/shared/sweep/1"
  assert srun[-3:] == ["--config.train.epochs=10", "--config.optim.lr=0.6", "--config.seed=1"]
  beyond = _run("slurm.sbatch", "c.py", "w", env={**env, "SLURM_ARRAY_TASK_ID": "2"})
  assert beyond.returncode == 1
  assert "array task 2 has no line" in beyond.stderr and "--array=0-1" in beyond.stderr


@pytest.mark.parametrize("args, env, message", [
    ((), {}, "usage: sbatch"),
    (("c.py", "w"), {"SSLJAX_TASKS": "socket"}, "SSLJAX_TASKS must be gpu"),
    (("c.py", "w"), {"SSLJAX_TASKS": "node", "SLURM_JOB_ID": "1"}, "--gpus-per-node=N"),
    (("c.py", "w"), {"SSLJAX_SWEEP": "/no/such/sweep.txt"}, "sweep file /no/such"),
])
def test_slurm_bad_input_is_named(args, env, message):
  result = _run("slurm.sbatch", *args, env=env)
  assert result.returncode == 1 and message in result.stderr, result.stderr


def test_slurm_outside_a_job_without_dry_run_refuses():
  result = _run("slurm.sbatch", "c.py", "w", dry=False)
  assert result.returncode == 1 and "not inside a SLURM job" in result.stderr


_FAKE = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> "$FAKE_LOG"
[ "$(basename "$0")" = srun ] && exit "${FAKE_SRUN_RC:-0}"
exit 0
"""


@pytest.mark.parametrize("srun_rc, requeued", [(143, True), (0, False), (1, False)])
def test_slurm_requeues_a_run_stopped_by_sigterm(tmp_path, srun_rc, requeued):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("srun", "scontrol"):
    (bin_dir / name).write_text(_FAKE)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "log"
  result = _run("slurm.sbatch", "c.py", "w", dry=False, env={
      "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
      "FAKE_SRUN_RC": str(srun_rc), "SLURM_JOB_ID": "99"})
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun --kill-on-bad-exit=1 python3 -m ssljax.cli train")
  assert (calls[1:] == ["scontrol requeue 99"]) == requeued
  assert result.returncode == (0 if requeued else srun_rc)


# ------------------------------------------------------------------ TPU pod


def _remote(command: list[str]) -> str:
  assert command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"], command
  return next(a.split("=", 1)[1] for a in command if a.startswith("--command="))


def test_tpu_pod_train_creates_copies_installs_runs_and_streams(tmp_path):
  env = {"ZONE": "us-central2-b", "PROJECT": "proj", "TPU_NAME": "p1",
         "ACCELERATOR_TYPE": "v4-16", "TMPDIR": str(tmp_path)}
  result = _run("tpu_pod.sh", "train", "configs/simclr.py:imagenet", "/mnt/shared/w",
                "--config.optim.lr=0.3", env=env)
  assert result.returncode == 0, result.stderr
  create, archive, scp, untar, install, start, logs = _commands(result)
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "p1",
                    "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base",
                    "--zone", "us-central2-b", "--project", "proj"]
  assert archive[:3] == ["git", "archive", "--format=tar.gz"] and archive[-1] == "HEAD"
  assert scp[4:6] == ["scp", archive[4]] and "--worker=all" in scp
  assert "tar -xzf ssljax.tar.gz" in _remote(untar)
  assert "'jax[tpu]'" in _remote(install) and "uv venv" in _remote(install)
  for command in (untar, install, start):
    assert "--worker=all" in command
  run = _remote(start)
  assert ("~/ssljax-venv/bin/python -m ssljax.cli train --config configs/simclr.py:imagenet "
          "--workdir /mnt/shared/w --distributed --config.optim.lr=0.3") in run
  assert "setsid nohup" in run and "> ~/ssljax-train.log" in run
  assert "--worker=0" in logs and "tail -n +1 -F ~/ssljax-train.log" == _remote(logs)


@pytest.mark.parametrize("state, first", [
    ("READY", None), ("PREEMPTED", "delete"), ("absent", "create")])
def test_tpu_pod_reuses_a_ready_pod_and_recreates_a_preempted_one(state, first):
  result = _run("tpu_pod.sh", "train", "configs/simclr.py:imagenet", "w", env={
      "ZONE": "z", "SSLJAX_DRY_RUN_TPU_STATE": state,
      "REPO_URL": "https://example.com/ssljax.git", "COMMIT": "abc123", "SPOT": "1"})
  assert result.returncode == 0, result.stderr
  commands = _commands(result)
  subcommands = [c[4] for c in commands]
  if first is None:
    assert "reusing pod ssljax-pod (READY)" in result.stderr
    assert "create" not in subcommands and "delete" not in subcommands
  else:
    assert subcommands[0] == first
    create = commands[subcommands.index("create")]
    assert "--spot" in create
  clone = _remote(commands[subcommands.index("ssh")])
  assert "git clone -q https://example.com/ssljax.git ssljax" in clone
  assert "git checkout -q abc123" in clone


@pytest.mark.parametrize("config", ["simclr:imagenet", "simclr_imagenet", "simclr_uota"])
def test_tpu_pod_takes_a_shipped_config_by_name(config):
  result = _run("tpu_pod.sh", "train", config, "w", env={"ZONE": "z"})
  assert result.returncode == 0, result.stderr
  start = next(_remote(c) for c in _commands(result) if "ssljax.cli train" in " ".join(c))
  assert f"-m ssljax.cli train --config {config} --workdir w --distributed" in start


@pytest.mark.parametrize("args, env, message", [
    (("train", "configs/simclr.py:imagenet", "w"), {}, "set ZONE"),
    (("stop",), {}, "set ZONE"),
    (("train", "configs/nope.py:x", "w"), {"ZONE": "z"}, "config file configs/nope.py"),
    (("train", "nope:x", "w"), {"ZONE": "z"},
     "config file nope not found, nor a config that ships in ssljax/configs (barlow_twins byol"),
    (("train", "configs/simclr.py"), {"ZONE": "z"}, "usage: bash launch/tpu_pod.sh train"),
    (("train", "configs/simclr.py", "w"), {"ZONE": "z", "SSLJAX_DRY_RUN_TPU_STATE": "CREATING"},
     "is CREATING; wait until it is READY"),
    (("launch",), {}, "usage:"),
])
def test_tpu_pod_bad_input_is_named(args, env, message):
  result = _run("tpu_pod.sh", *args, env=env)
  assert result.returncode == 1 and message in result.stderr, result.stderr
  assert "+ gcloud" not in result.stdout


def test_tpu_pod_stop_and_delete():
  stop = _run("tpu_pod.sh", "stop", env={"ZONE": "z"})
  assert _remote(_commands(stop)[0]) == "kill -TERM $(cat ~/ssljax-train.pid)"
  delete = _run("tpu_pod.sh", "delete", env={"ZONE": "z", "TPU_NAME": "p2"})
  assert _commands(delete) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "p2",
                                "--quiet", "--zone", "z"]]
