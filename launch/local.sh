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
set -euo pipefail

cd "$(dirname "$0")/.."
# Where the Debian package dataset-fashion-mnist puts the files (the default config's
# data.data_dir). Overridden only by the launcher's tests, with a stand-in apt-get.
FMNIST_DIR=${SSLJAX_APT_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

die() { echo "launch/local.sh: $*" >&2; exit 1; }

check_python() {
  command -v "$PY" >/dev/null || die "no '$PY' on PATH; install Python >= 3.11 or set PYTHON=..."
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "ssljax needs Python >= 3.11, '$PY' is $("$PY" -V 2>&1); set PYTHON=/path/to/python3.11+"
}

install() {  # install ssljax (editable) with the given extras into $PY's environment
  # Launches started together (two runs in parallel) would otherwise race on the same
  # console-script files; the second waits for the first's install. The lock is released
  # before ssljax itself runs.
  if command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/ssljax-install-$(id -u).lock"
    flock 9
  fi
  install_unlocked "$1"
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
    install ""
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
    install ""
    exec "$PY" -m ssljax.cli eval --workdir "$workdir" "$@"
    ;;
  test)
    install test
    exec "$PY" -m pytest -q tests "$@"
    ;;
  *)
    die "unknown command '$command' (train, eval or test)"
    ;;
esac
