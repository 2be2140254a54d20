#!/usr/bin/env bash
# Local launcher (CPU or one GPU): sets up what a fresh Debian/Ubuntu machine needs, then runs
# ssljax.
#
#   bash launch/local.sh                      # pretrain + evaluate the embedded default
#   bash launch/local.sh train CONFIG WORKDIR [--config.key=value ...]
#   bash launch/local.sh eval WORKDIR [--config.eval.key=value ...]
#   bash launch/local.sh test [pytest args]   # install the test extras and run the suite
#
# Python: uses $PYTHON (default python3, >= 3.11). If that interpreter refuses pip installs
# (PEP 668 "externally managed" system Python), a virtualenv is made in .venv and used.
# CONFIG is a config file with its optional argument, e.g. configs/swav.py:cifar100 (default
# configs/simclr.py:fashion_mnist).
# Data: when the resolved config reads Fashion-MNIST's IDX files (data.source
# fashion_mnist_idx) and data.data_dir lacks them: for the default directory
# /usr/share/datasets/fashion-mnist, `apt-get install dataset-fashion-mnist` is run when root or
# sudo allows; otherwise the script says how to point ssljax at the four files.
# jax build (train and eval): SSLJAX_ACCELERATOR=auto (default) installs jax's CUDA build when
# `nvidia-smi` reports an NVIDIA driver (jax[cuda13] for driver >= 580, jax[cuda12] for
# driver >= 525) and keeps the CPU build otherwise; cpu keeps the CPU build and runs with
# JAX_PLATFORMS=cpu even where a CUDA build is installed; gpu installs the CUDA build without
# asking nvidia-smi (cuda13 unless the driver says otherwise); cuda12 / cuda13 pick the build.
# The test command always uses the CPU build (the suite runs on 8 virtual CPU devices).
set -euo pipefail

cd "$(dirname "$0")/.."
# Where the Debian package dataset-fashion-mnist puts the files (the default config's
# data.data_dir). Overridden only by the launcher's tests, with a stand-in apt-get.
FMNIST_DIR=${SSLJAX_APT_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

die() { echo "launch/local.sh: $*" >&2; exit 1; }

ACCELERATOR=${SSLJAX_ACCELERATOR:-auto}
case "$ACCELERATOR" in
  auto|cpu|gpu|cuda12|cuda13) ;;
  *) die "SSLJAX_ACCELERATOR='$ACCELERATOR' is not one of auto, cpu, gpu, cuda12, cuda13" ;;
esac

check_python() {
  command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python >= 3.11 or set PYTHON=..."
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "ssljax needs Python >= 3.11, '$PY' is $("$PY" -V 2>&1); set PYTHON=/path/to/python3.11+"
}

install() {  # EXTRAS [jax]: install ssljax (editable) with the extras into $PY's environment,
  # then with `jax` the jax build SSLJAX_ACCELERATOR chooses (`install_jax_build`).
  # Launches started together (two runs in parallel) would otherwise race on the same
  # console-script files; the second waits for the first's install. The lock is released
  # before ssljax itself runs.
  if command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/ssljax-install-$(id -u).lock"
    flock 9
  fi
  install_unlocked "$1"
  if [ "${2:-}" = jax ]; then install_jax_build; fi
  exec 9>&-
}

install_unlocked() {
  local spec=".${1:+[$1]}" log
  log=$(mktemp)
  if "$PY" -m pip install --quiet --disable-pip-version-check -e "$spec" 2>"$log"; then
    cat "$log" >&2; rm -f "$log"
    return
  fi
  cat "$log" >&2
  # Only a PEP 668 "externally managed" interpreter is a reason to make a virtualenv; any
  # other failure (network, disk, a broken package) is reported as it is.
  if [ "$PY" = .venv/bin/python ] || ! grep -q "externally-managed-environment" "$log"; then
    rm -f "$log"
    die "pip install -e '$spec' with '$PY' failed (see pip's message above)"
  fi
  rm -f "$log"
  echo "launch/local.sh: '$PY' does not accept pip installs (PEP 668); creating .venv" >&2
  "$PY" -m venv .venv || die "could not create .venv: install python3-venv (apt-get install python3-venv)"
  PY=.venv/bin/python
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$spec"
}

nvidia_driver_major() {  # the NVIDIA driver's major version from nvidia-smi, or nothing
  local version
  version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null) || return 0
  version=${version%%$'\n'*}  # one line per GPU; the first
  version=${version%%.*}
  [[ "$version" =~ ^[0-9]+$ ]] && echo "$version"
  return 0
}

jax_build() {  # cpu, cuda12 or cuda13, from SSLJAX_ACCELERATOR and nvidia-smi
  case "$ACCELERATOR" in
    cpu|cuda12|cuda13) echo "$ACCELERATOR"; return ;;
  esac
  local driver
  driver=$(nvidia_driver_major)
  if [ -z "$driver" ]; then
    if [ "$ACCELERATOR" = gpu ]; then echo cuda13; else echo cpu; fi
  elif [ "$driver" -ge 580 ]; then
    echo cuda13
  elif [ "$driver" -ge 525 ]; then
    echo cuda12
  elif [ "$ACCELERATOR" = gpu ]; then
    echo cuda12
  else
    echo "launch/local.sh: NVIDIA driver $driver is older than jax's CUDA builds need (>= 525);" \
      "using the CPU build (update the driver, or set SSLJAX_ACCELERATOR=cuda12 to try)" >&2
    echo cpu
  fi
}

install_jax_build() {  # after `install`: the CUDA build of the installed jax version, if chosen
  local build version
  build=$(jax_build)
  if [ "$build" = cpu ]; then
    if [ "$ACCELERATOR" = cpu ]; then export JAX_PLATFORMS=cpu; fi
    return 0
  fi
  version=$("$PY" -c 'import importlib.metadata as m; print(m.version("jax"))') ||
    die "could not read the installed jax version with '$PY'"
  echo "launch/local.sh: installing jax[$build]==$version (SSLJAX_ACCELERATOR=$ACCELERATOR;" \
    "SSLJAX_ACCELERATOR=cpu keeps the CPU build)" >&2
  "$PY" -m pip install --quiet --disable-pip-version-check "jax[$build]==$version" ||
    die "pip install 'jax[$build]==$version' failed (see pip's message above); run on the CPU" \
      "with SSLJAX_ACCELERATOR=cpu, or pick the other CUDA build with SSLJAX_ACCELERATOR=cuda12/cuda13"
}

config_data() {  # prints the resolved config's data.source and data.data_dir, one a line
  "$PY" -c '
import sys
from ssljax.config import load_config
config = load_config(sys.argv[1])
print(config.data.source)
print(config.data.data_dir)' "$1"
}

ensure_fashion_mnist() {  # DIR: the config's data.data_dir
  local dir=$1 missing=0
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -e "$dir/$f.gz" ] || [ -e "$dir/$f" ] || missing=1
  done
  [ "$missing" = 0 ] && return
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if [ "$dir" = "$FMNIST_DIR" ] && command -v apt-get >/dev/null && $sudo true 2>/dev/null; then
    echo "launch/local.sh: installing dataset-fashion-mnist with apt-get" >&2
    $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist && return
  fi
  local how="apt-get could not install it"
  [ "$dir" = "$FMNIST_DIR" ] || how="apt-get installs it only into $FMNIST_DIR"
  die "Fashion-MNIST is not in $dir and $how.
  Either run:  sudo apt-get install dataset-fashion-mnist  (files in $FMNIST_DIR)
  or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz
  and t10k-labels-idx1-ubyte.gz (github.com/zalandoresearch/fashion-mnist, data/fashion) into a
  directory DIR and add:  --config.data.data_dir=DIR"
}

command=${1:-train}
[ $# -gt 0 ] && shift
check_python
case "$command" in
  train)
    config=${1:-configs/simclr.py:fashion_mnist}
    workdir=${2:-runs/simclr_fashion_mnist}
    [ $# -ge 2 ] && shift 2 || set --
    install "" jax
    if ! printf '%s\n' "$@" | grep -q 'data.data_dir'; then
      # A config that cannot be loaded is left to ssljax, which names the problem.
      data=$(config_data "$config" 2>/dev/null) || data=""
      if [ "$(sed -n 1p <<<"$data")" = fashion_mnist_idx ]; then
        ensure_fashion_mnist "$(sed -n 2p <<<"$data")"
      fi
    fi
    exec "$PY" -m ssljax.cli train --config "$config" --workdir "$workdir" "$@"
    ;;
  eval)
    [ $# -ge 1 ] || die "usage: launch/local.sh eval WORKDIR [--config.eval.key=value ...]"
    workdir=$1; shift
    install "" jax
    exec "$PY" -m ssljax.cli eval --workdir "$workdir" "$@"
    ;;
  test)
    install test
    # One pytest worker per core (pytest-xdist), a test file per worker: the suite is bound by
    # XLA compiles, which use about one core each, so 2 workers take about half the wall time
    # on 2 cores. SSLJAX_TEST_WORKERS=0 runs it in one process.
    exec "$PY" -m pytest -q -n "${SSLJAX_TEST_WORKERS:-auto}" --dist loadfile tests "$@"
    ;;
  *)
    die "unknown command '$command' (train, eval or test)"
    ;;
esac
