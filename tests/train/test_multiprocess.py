"""Multi-process training on one machine: two `ssljax train` processes joined by
``jax.distributed`` (CPU collectives through gloo), each with 2 virtual CPU devices, against
one process with 4 devices; a two-process resume; and the start-up errors of a multi-process
run (a process count that does not divide the batch, an unreachable coordinator, processes
that never join, no cluster to detect).

The runs go through the command line as subprocesses (JAX's distributed runtime is once per
process). They share a persistent compilation cache, so the resumed pair reuses the first
pair's executables.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ssljax import parallel
from ssljax.config import config_to_json
from tests.util import small_method_config, tiny_config

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    not hasattr(jax.config, "jax_cpu_collectives_implementation"),
    reason="this jax has no CPU collectives option (gloo) for multi-process CPU runs")

# A config file that loads the run's config from the JSON path given as its argument.
_JSON_CONFIG = """
from ssljax.config import config_from_json


def get_config(path):
  with open(path, encoding="utf-8") as f:
    return config_from_json(f.read())
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, cache: str | None = None) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SSLJAX_", "SLURM_", "OMPI_"))}
  env.update({
      "PYTHONPATH": _REPO + os.pathsep + env.get("PYTHONPATH", ""),
      "JAX_PLATFORMS": "cpu",
      # What tests/conftest.py sets in-process: faster compiles, same results in every run.
      "XLA_FLAGS": (f"--xla_force_host_platform_device_count={devices} "
                    f"--xla_backend_optimization_level=0"),
      "JAX_THREEFRY_PARTITIONABLE": "0",
      "TF_CPP_MIN_LOG_LEVEL": "3",
  })
  if cache:
    env.update({"JAX_COMPILATION_CACHE_DIR": cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  return env


def _start(args: list[str], env: dict[str, str], log: str) -> subprocess.Popen:
  out = open(log, "w", encoding="utf-8")  # pylint: disable=consider-using-with
  proc = subprocess.Popen([sys.executable, "-m", "ssljax.cli", *args], cwd=_REPO, env=env,
                          stdout=out, stderr=subprocess.STDOUT)
  proc.log = log
  out.close()
  return proc


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> None:
  deadline = time.time() + timeout
  for proc in procs:
    try:
      proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc in procs:
    if proc.returncode:
      with open(proc.log, encoding="utf-8") as f:
        pytest.fail(f"{' '.join(proc.args[2:])} exited with {proc.returncode}:\n"
                    f"{f.read()[-4000:]}")


def _train_args(config_arg: str, workdir: str) -> list[str]:
  return ["train", "--config", config_arg, "--workdir", workdir]


def _two_processes(args: list[str], env: dict[str, str], logs: str) -> list[subprocess.Popen]:
  address = f"localhost:{_free_port()}"
  return [_start([*args, "--coordinator_address", address, "--num_processes", "2",
                  "--process_id", str(i), "--distributed_timeout", "120"], env,
                 f"{logs}.{i}.log") for i in range(2)]


def _train_three_ways(root, config) -> dict:
  """Trains `config` with one process x 4 devices and two processes x 2 devices (6 steps,
  checkpoints at 3 and 6), and resumes the two-process run from its step-3 checkpoint."""
  (root / "config.json").write_text(config_to_json(config))
  (root / "json_config.py").write_text(_JSON_CONFIG)
  config_arg = f"{root / 'json_config.py'}:{root / 'config.json'}"
  cache = str(root / "jax-cache")
  one, two, resumed = (str(root / n) for n in ("one", "two", "resumed"))

  started = time.time()
  procs = [_start(_train_args(config_arg, one), _env(4, cache), f"{one}.log")]
  procs += _two_processes(_train_args(config_arg, two), _env(2, cache), two)
  # The resumed pair starts from a copy of the step-3 checkpoint as soon as it is committed
  # (orbax renames a step's directory into place when complete), while the first pair runs
  # on; by then the first pair's executables are in the shared compilation cache.
  step3 = os.path.join(two, "checkpoints", "3")
  while not os.path.isdir(step3):
    if any(p.poll() is not None for p in procs):
      _finish(procs)
    if time.time() - started > 300:
      pytest.fail("the two-process run wrote no step-3 checkpoint within 300 s")
    time.sleep(0.2)
  os.makedirs(os.path.join(resumed, "checkpoints"))
  shutil.copytree(step3, os.path.join(resumed, "checkpoints", "3"))
  shutil.copy(os.path.join(two, "config.json"), resumed)
  procs += _two_processes(_train_args(config_arg, resumed), _env(2, cache), resumed)
  _finish(procs)
  return {"one": one, "two": two, "resumed": resumed, "seconds": time.time() - started}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """SimCLR trained three ways (`_train_three_ways`)."""
  root = tmp_path_factory.mktemp("multiprocess")
  (root / "data").mkdir()
  config = tiny_config(str(root / "data"))
  with config.unlocked():
    config.eval.linear_probe = False
    config.eval.plots = False
  return _train_three_ways(root, config)


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _state(workdir: str, step: int) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  metadata = ocp.StandardCheckpointer().metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata.tree
  # Restore as host NumPy arrays, whatever devices the checkpoint was written from.
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, target)
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(restored)}


def _checksums(workdir: str, step: int) -> dict[str, str]:
  with open(os.path.join(workdir, "checkpoints", str(step), "checksums", "metadata"),
            encoding="utf-8") as f:
    return json.load(f)


def _assert_same_training(runs) -> None:
  one, two = _losses(runs["one"]), _losses(runs["two"])
  assert sorted(one) == sorted(two) == [2, 4, 6]
  np.testing.assert_allclose([two[s] for s in (2, 4, 6)], [one[s] for s in (2, 4, 6)],
                             rtol=1e-6)
  # The gradient all-reduce runs through gloo across processes and in-process on one, so
  # float32 sums may round differently; the states agree to float32 precision.
  # Each array within 1e-5 of its largest entry (plus 1e-6 for the projector's first bias,
  # followed by BN, whose gradient is rounding noise around 0); measured differences on
  # 2026-12-02 were at most 6e-6 of the largest entry (momentum traces) and 4e-6 (parameters).
  a, b = _state(runs["one"], 6), _state(runs["two"], 6)
  assert sorted(a) == sorted(b)
  for key in a:
    if np.issubdtype(a[key].dtype, np.floating):
      bound = 1e-5 * float(np.max(np.abs(a[key]))) + 1e-6
      assert float(np.max(np.abs(b[key] - a[key]))) <= bound, key
    else:
      np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def _assert_bit_exact_resume(runs) -> None:
  for log in (f"{runs['resumed']}.0.log", f"{runs['resumed']}.1.log"):
    with open(log, encoding="utf-8") as f:
      assert "resumed from step 3" in f.read()
  assert _checksums(runs["resumed"], 6) == _checksums(runs["two"], 6)


def test_two_processes_train_like_one_process_with_as_many_devices(runs):
  _assert_same_training(runs)


def test_two_process_resume_is_bit_exact(runs):
  _assert_bit_exact_resume(runs)


@pytest.mark.slow
def test_moco_queue_two_processes_like_one_and_bit_exact_resume(tmp_path):
  """MoCo's queue is filled from keys gathered over every device of every process."""
  (tmp_path / "data").mkdir()
  config = small_method_config(str(tmp_path / "data"), "moco")
  with config.unlocked():
    config.eval.linear_probe = False
    config.eval.plots = False
  runs = _train_three_ways(tmp_path, config)
  _assert_same_training(runs)
  _assert_bit_exact_resume(runs)


@pytest.mark.slow
def test_streamed_folder_two_processes_like_one_and_bit_exact_resume(tmp_path):
  """The ImageNet path: each process streams its own rows of the global batch from a JPEG
  folder (`folder_stream`, pre-crops drawn on the host); the hosts' rows must form the same
  global batch as one process reads, and the loader's position must resume exactly."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for split, count in (("train", 24), ("val", 8)):
    for c in range(2):
      directory = tmp_path / "data" / split / f"n{c:08d}"
      directory.mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{i}.JPEG", quality=90)
  (tmp_path / "tiny").mkdir()
  config = tiny_config(str(tmp_path / "tiny"), channels=3)
  with config.unlocked():
    config.data.update(dict(source="folder_stream", name="folder", data_dir=str(
        tmp_path / "data"), test_split="val", num_classes=2, stream_workers=0,
        stream_threads=1, precrop_scale=(0.3, 1.0)))
    config.eval.linear_probe = False
    config.eval.plots = False
  runs = _train_three_ways(tmp_path, config)
  for i in range(2):
    with open(f"{runs['two']}.{i}.log", encoding="utf-8") as f:
      assert "streaming folder_stream split 'train': 48 examples" in f.read()
  _assert_same_training(runs)
  _assert_bit_exact_resume(runs)


def test_only_process_0_writes_metrics_and_results(runs):
  # Each step once in metrics.jsonl (two writers would double every record).
  with open(os.path.join(runs["two"], "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [2, 4, 6, 6, 6]  # train records, then kNN top-1 and top-5
  with open(os.path.join(runs["two"], "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert results["devices"].startswith("4 x ") and results["steps"] == 6
  assert os.path.exists(os.path.join(runs["two"], "config.json"))
  for i in range(2):
    with open(f"{runs['two']}.{i}.log", encoding="utf-8") as f:
      assert f"processes: 2 (this is process {i}, 2 local devices)" in f.read()


# ------------------------------------------------------------------ settings and bad input


def test_settings_from_flags_and_environment():
  assert not parallel.distributed_settings(environ={}).enabled
  auto = parallel.distributed_settings(environ={"SSLJAX_DISTRIBUTED": "1"})
  assert auto.enabled and not auto.explicit
  env = {"SSLJAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "SSLJAX_NUM_PROCESSES": "4",
         "SSLJAX_PROCESS_ID": "3", "SSLJAX_DISTRIBUTED_TIMEOUT": "30"}
  assert parallel.distributed_settings(environ=env) == parallel.DistributedSettings(
      True, "10.0.0.2:1234", 4, 3, 30)
  # Flags win over the environment.
  assert parallel.distributed_settings(process_id=1, environ=env).process_id == 1
  assert not parallel.distributed_settings(distributed=False,
                                           environ={"SSLJAX_DISTRIBUTED": "1"}).enabled
  # One process per node with 4 GPUs (launch/slurm.sbatch, SSLJAX_TASKS=node).
  node = parallel.distributed_settings(environ={"SSLJAX_DISTRIBUTED": "1",
                                                "SSLJAX_LOCAL_DEVICE_IDS": "0,1,2,3"})
  assert node.enabled and node.local_device_ids == (0, 1, 2, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(coordinator_address="h:1", num_processes=2), "missing: --process_id"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), r"in 0\.\.1"),
    (dict(distributed=False, num_processes=2), "switched off"),
    (dict(distributed=True, timeout_s=0), ">= 1 second"),
    (dict(distributed=True, local_device_ids="0;1"), "comma-separated integers"),
])
def test_inconsistent_settings_name_the_fix(kwargs, match):
  with pytest.raises(parallel.DistributedSetupError, match=match):
    parallel.distributed_settings(environ={}, **kwargs)


def test_a_bad_environment_value_is_named():
  with pytest.raises(parallel.DistributedSetupError, match="SSLJAX_NUM_PROCESSES='two'"):
    parallel.distributed_settings(environ={"SSLJAX_COORDINATOR_ADDRESS": "h:1",
                                           "SSLJAX_NUM_PROCESSES": "two"})


def test_process_count_must_divide_the_batch():
  with pytest.raises(ValueError, match=r"not divisible by the number of processes \(3\).*"
                                       r"batch_size=15"):
    parallel.check_processes_divide_batch(16, 3)
  parallel.check_processes_divide_batch(16, 4)


def test_initialize_after_jax_started_is_a_clear_error():
  jax.devices()  # the test session's backend is running
  with pytest.raises(parallel.DistributedSetupError, match="before anything uses JAX devices"):
    parallel.initialize_distributed(parallel.DistributedSettings(
        True, f"localhost:{_free_port()}", 1, 0, timeout_s=5))


def test_an_unreachable_coordinator_fails_within_the_timeout():
  settings = parallel.distributed_settings(
      coordinator_address=f"localhost:{_free_port()}", num_processes=2, process_id=1,
      timeout_s=2, environ={})
  started = time.time()
  with pytest.raises(parallel.DistributedSetupError,
                     match="could not be reached within the timeout.*Start process 0"):
    parallel.initialize_distributed(settings)
  assert time.time() - started < 10
  with pytest.raises(parallel.DistributedSetupError, match="cannot be resolved"):
    parallel.initialize_distributed(parallel.DistributedSettings(
        True, "no-such-host.invalid:1234", 2, 1, timeout_s=2))


def test_command_line_start_up_errors(tmp_path):
  """Through `ssljax train`, in parallel: a batch the process count does not divide (before
  connecting), a process 0 whose peers never join (exit 69 within the timeout), and
  --distributed where no cluster can be detected."""
  config = "configs/simclr.py:fashion_mnist"
  workdir = str(tmp_path / "w")
  env = _env(1)
  cases = {
      "batch": ["--config.train.batch_size=15", "--coordinator_address",
                f"localhost:{_free_port()}", "--num_processes", "2", "--process_id", "1"],
      "alone": ["--coordinator_address", f"localhost:{_free_port()}", "--num_processes", "2",
                "--process_id", "0", "--distributed_timeout", "2"],
      "no_cluster": ["--distributed"],
  }
  started = time.time()
  procs = {name: _start(_train_args(config, workdir) + args, env, str(tmp_path / f"{name}.log"))
           for name, args in cases.items()}
  out = {}
  for name, proc in procs.items():
    proc.wait(timeout=120)
    with open(proc.log, encoding="utf-8") as f:
      out[name] = (proc.returncode, f.read())
  assert time.time() - started < 120
  assert out["batch"][0] == 1, out["batch"]
  assert ("train.batch_size = 15 is not divisible by the number of processes (2)" in
          out["batch"][1]) and "--config.train.batch_size=14" in out["batch"][1]
  assert out["alone"][0] == parallel.EXIT_RENDEZVOUS_FAILED, out["alone"]
  assert "waited 2 s (--distributed_timeout)" in out["alone"][1]
  assert out["no_cluster"][0] == 1, out["no_cluster"]
  assert "no cluster was detected" in out["no_cluster"][1]
  assert "--coordinator_address HOST:PORT" in out["no_cluster"][1]
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpointed_step(tmp_path):
  """Preemption of one host: JAX's preemption notifier and orbax's sync point make every
  process checkpoint the same step and exit 143 (what launch/slurm.sbatch requeues on)."""
  (tmp_path / "data").mkdir()
  config = tiny_config(str(tmp_path / "data"))
  with config.unlocked():
    config.train.num_steps = 400
    config.train.checkpoint_every_steps = 1000
    config.train.log_every_steps = 10
  (tmp_path / "config.json").write_text(config_to_json(config))
  (tmp_path / "json_config.py").write_text(_JSON_CONFIG)
  workdir = str(tmp_path / "w")
  procs = _two_processes(
      _train_args(f"{tmp_path / 'json_config.py'}:{tmp_path / 'config.json'}", workdir),
      _env(2), workdir)
  deadline = time.time() + 300
  while True:
    with open(procs[0].log, encoding="utf-8") as f:
      if "step 20/400" in f.read():
        break
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.5)
  procs[1].terminate()
  for p in procs:
    assert p.wait(timeout=120) == 143
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")))
  assert len(steps) == 1 and steps[0] < 400
  for p in procs:
    with open(p.log, encoding="utf-8") as f:
      assert f"SIGTERM received at step {steps[0]}" in f.read()
