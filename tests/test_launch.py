"""launch/local.sh: how it reacts when installing ssljax fails (no network or pip needed).

A stand-in interpreter passes the version check and fails `pip install` with a chosen message,
so the tests see which failures make the launcher fall back to a virtualenv (only PEP 668's
"externally managed" refusal) and which are reported as they are.
"""

import os
import shutil
import stat
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "-c "*) exit 0 ;;                                   # the version check passes
  "-m pip") echo "$FAKE_PIP_ERROR" >&2; exit 1 ;;    # every install fails
  "-m venv") echo "fake venv refused" >&2; exit 1 ;;
esac
exit 3
"""


def _launch(tmp_path, pip_error: str) -> subprocess.CompletedProcess:
  fake = tmp_path / "python-fake"
  fake.write_text(_FAKE_PYTHON)
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  env = {**os.environ, "PYTHON": str(fake), "FAKE_PIP_ERROR": pip_error,
         "TMPDIR": str(tmp_path)}
  return subprocess.run(["bash", os.path.join(_REPO, "launch", "local.sh"), "eval", "W"],
                        env=env, capture_output=True, text=True, timeout=60)


def test_a_failed_install_is_reported_not_mistaken_for_pep_668(tmp_path):
  result = _launch(tmp_path, "ERROR: Could not install packages due to an OSError: disk full")
  assert result.returncode != 0
  assert "disk full" in result.stderr
  assert "failed (see pip's message above)" in result.stderr
  assert "creating .venv" not in result.stderr


def test_an_externally_managed_python_gets_a_virtualenv(tmp_path):
  result = _launch(tmp_path, "error: externally-managed-environment")
  assert result.returncode != 0
  assert "does not accept pip installs (PEP 668); creating .venv" in result.stderr
  # The stand-in refuses `-m venv`, and the launcher says what to install.
  assert "could not create .venv: install python3-venv" in result.stderr


# A stand-in interpreter for `train`: the real Python answers `-c` (the version check and the
# query of the config's data source), installs succeed without doing anything, and ssljax's
# CLI only prints its arguments.
_FAKE_PYTHON_TRAIN = """#!/usr/bin/env bash
case "$1 $2" in
  "-m pip") exit 0 ;;
  "-m ssljax.cli") shift 2; echo "RUN $*"; exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")

# A config reading Fashion-MNIST's IDX files from the directory given as its argument.
_IDX_CONFIG = """
from ssljax.config import default_config

def get_config(arg=None):
  c = default_config()
  c.data.data_dir = arg
  return c
"""


def _launch_train(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
  import sys
  fake = tmp_path / "python-train-fake"
  fake.write_text(_FAKE_PYTHON_TRAIN)
  fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
  env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable,
         "TMPDIR": str(tmp_path), **(env or {})}
  return subprocess.run(["bash", os.path.join(_REPO, "launch", "local.sh"), "train", *args],
                        env=env, capture_output=True, text=True, timeout=300)


def test_train_checks_the_resolved_configs_fashion_mnist_directory(tmp_path):
  config = tmp_path / "idx_config.py"
  config.write_text(_IDX_CONFIG)
  data_dir = tmp_path / "fmnist"
  data_dir.mkdir()
  spec = f"{config}:{data_dir}"

  missing = _launch_train(tmp_path, spec, "W")
  assert missing.returncode != 0
  assert f"Fashion-MNIST is not in {data_dir}" in missing.stderr
  assert "RUN" not in missing.stdout

  for name in _IDX_FILES:
    (data_dir / f"{name}.gz").write_bytes(b"")
  present = _launch_train(tmp_path, spec, "W")
  assert present.returncode == 0, present.stderr
  assert f"RUN train --config {spec} --workdir W" in present.stdout

  # An explicit data directory on the command line is the user's to get right.
  (data_dir / f"{_IDX_FILES[0]}.gz").unlink()
  given = _launch_train(tmp_path, spec, "W", "--config.data.data_dir=ELSEWHERE")
  assert given.returncode == 0 and "--config.data.data_dir=ELSEWHERE" in given.stdout


def test_train_with_a_dataset_argument_that_needs_no_local_files(tmp_path):
  result = _launch_train(tmp_path, "configs/swav.py:cifar100", "W")
  assert result.returncode == 0, result.stderr
  assert "RUN train --config configs/swav.py:cifar100 --workdir W" in result.stdout


# A stand-in apt-get: `install dataset-fashion-mnist` writes the four files into the package's
# directory (or fails with FAKE_APT_FAIL set); every call is logged.
_FAKE_APT = """#!/usr/bin/env bash
echo "apt-get $*" >> "$FAKE_APT_LOG"
[ -n "${FAKE_APT_FAIL:-}" ] && { echo "E: Unable to locate package" >&2; exit 100; }
if [ "$1" = install ]; then
  mkdir -p "$SSLJAX_APT_FASHION_MNIST_DIR"
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \\
           t10k-labels-idx1-ubyte; do : > "$SSLJAX_APT_FASHION_MNIST_DIR/$f.gz"; done
fi
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the launcher runs apt-get only as root or sudo")
@pytest.mark.parametrize("apt_fails", [False, True])
def test_readme_command_one_installs_fashion_mnist_on_a_machine_without_it(tmp_path, apt_fails):
  # README command 1 on a fresh machine: the default config reads the package's directory,
  # which is empty, so the launcher installs the package with apt-get before training, or
  # says how to get the files when apt-get cannot.
  bin_dir, package_dir = tmp_path / "bin", tmp_path / "usr-share-fashion-mnist"
  bin_dir.mkdir()
  apt = bin_dir / "apt-get"
  apt.write_text(_FAKE_APT)
  apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
  config = tmp_path / "idx_config.py"
  config.write_text(_IDX_CONFIG)
  log = tmp_path / "apt.log"
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_APT_LOG": str(log),
         "SSLJAX_APT_FASHION_MNIST_DIR": str(package_dir)}
  if apt_fails:
    env["FAKE_APT_FAIL"] = "1"
  result = _launch_train(tmp_path, f"{config}:{package_dir}", "W", env=env)
  if apt_fails:
    assert result.returncode != 0 and "RUN" not in result.stdout
    assert f"Fashion-MNIST is not in {package_dir} and apt-get could not install it" in (
        result.stderr)
    assert "--config.data.data_dir=DIR" in result.stderr
  else:
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "apt-get update -qq", "apt-get install -y -qq dataset-fashion-mnist"]
    assert sorted(os.listdir(package_dir)) == sorted(f"{f}.gz" for f in _IDX_FILES)
    assert f"RUN train --config {config}:{package_dir} --workdir W" in result.stdout


# The jax build (SSLJAX_ACCELERATOR and nvidia-smi): a stand-in interpreter logs its pip
# calls and prints the CLI's arguments with JAX_PLATFORMS; a stand-in nvidia-smi reports the
# driver version FAKE_DRIVER (one line per GPU), or fails as it does without a working driver.
_FAKE_PYTHON_PIP_LOG = """#!/usr/bin/env bash
case "$1 $2" in
  "-m pip") shift 2; echo "pip $*" >> "$FAKE_PIP_LOG"; exit 0 ;;
  "-m ssljax.cli") shift 2; echo "RUN JAX_PLATFORMS=${JAX_PLATFORMS:-} $*"; exit 0 ;;
  "-m pytest") shift 2; echo "PYTEST $*"; exit 0 ;;
esac
exec "$REAL_PYTHON" "$@"
"""

_FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
if [ -z "${FAKE_DRIVER:-}" ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
  exit 9
fi
[ "$*" = "--query-gpu=driver_version --format=csv,noheader" ] || exit 2
printf '%s\\n%s\\n' "$FAKE_DRIVER" "$FAKE_DRIVER"
"""


def _launch_eval_with_gpu(tmp_path, accelerator: str | None, driver: str | None,
                          command: tuple[str, ...] = ("eval", "W"), extra_env=None
                          ) -> tuple[subprocess.CompletedProcess, list[str]]:
  import sys
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("python-fake", _FAKE_PYTHON_PIP_LOG), ("nvidia-smi", _FAKE_NVIDIA_SMI)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "pip.log"
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "SSLJAX_ACCELERATOR", "FAKE_DRIVER",
                       "SSLJAX_TEST_WORKERS")}
  env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python-fake"),
             REAL_PYTHON=sys.executable, TMPDIR=str(tmp_path), FAKE_PIP_LOG=str(log))
  if accelerator is not None:
    env["SSLJAX_ACCELERATOR"] = accelerator
  if driver is not None:
    env["FAKE_DRIVER"] = driver
  env.update(extra_env or {})
  result = subprocess.run(["bash", os.path.join(_REPO, "launch", "local.sh"), *command],
                          env=env, capture_output=True, text=True, timeout=120)
  return result, log.read_text().splitlines() if log.exists() else []


_BASE_INSTALL = "pip install --quiet --disable-pip-version-check -e ."


@pytest.mark.parametrize("accelerator, driver, build, platforms", [
    (None, None, None, ""),               # no working driver: the CPU build
    ("auto", "580.95.05", "cuda13", ""),  # CUDA 13 wheels need driver >= 580
    (None, "550.54.14", "cuda12", ""),    # CUDA 12 wheels need driver >= 525
    ("cpu", "580.95.05", None, "cpu"),    # forced CPU on a GPU machine
    ("gpu", None, "cuda13", ""),          # forced GPU where nvidia-smi reports no driver
    ("gpu", "470.82.01", "cuda12", ""),   # forced GPU on a driver older than 525
    ("gpu", "550.54.14", "cuda12", ""),   # forced GPU: the build the driver supports
    ("cuda12", "580.95.05", "cuda12", ""),
])
def test_the_launcher_installs_the_jax_build_for_the_machine(tmp_path, accelerator, driver,
                                                             build, platforms):
  import importlib.metadata
  result, pip_calls = _launch_eval_with_gpu(tmp_path, accelerator, driver)
  assert result.returncode == 0, result.stderr
  expected = [_BASE_INSTALL]
  if build:
    version = importlib.metadata.version("jax")
    expected.append(f"pip install --quiet --disable-pip-version-check jax[{build}]=={version}")
    assert f"installing jax[{build}]=={version}" in result.stderr
  assert pip_calls == expected
  assert f"RUN JAX_PLATFORMS={platforms} eval --workdir W" in result.stdout


def test_an_old_nvidia_driver_keeps_the_cpu_build_and_says_why(tmp_path):
  result, pip_calls = _launch_eval_with_gpu(tmp_path, None, "470.82.01")
  assert result.returncode == 0, result.stderr
  assert pip_calls == [_BASE_INSTALL]
  assert "NVIDIA driver 470 is older than jax's CUDA builds need (>= 525)" in result.stderr
  assert "SSLJAX_ACCELERATOR=cuda12" in result.stderr


def test_an_unknown_accelerator_names_the_choices(tmp_path):
  result, pip_calls = _launch_eval_with_gpu(tmp_path, "tpu", None)
  assert result.returncode != 0 and pip_calls == []
  assert "SSLJAX_ACCELERATOR='tpu' is not one of auto, cpu, gpu, cuda12, cuda13" in result.stderr


# README command 2: the test extra is installed, then the suite runs with one pytest-xdist
# worker per core (a file per worker), or in one process with SSLJAX_TEST_WORKERS=0; the
# CPU build stays even on a GPU machine.
@pytest.mark.parametrize("workers, n", [(None, "auto"), ("0", "0"), ("2", "2")])
def test_readme_command_two_installs_the_test_extra_and_runs_the_suite(tmp_path, workers, n):
  env = {} if workers is None else {"SSLJAX_TEST_WORKERS": workers}
  result, pip_calls = _launch_eval_with_gpu(tmp_path, None, "580.95.05",
                                            command=("test", "-k", "x"), extra_env=env)
  assert result.returncode == 0, result.stderr
  assert pip_calls == [_BASE_INSTALL + "[test]"]
  assert f"PYTEST -q -n {n} --dist loadfile tests -k x" in result.stdout

