#!/usr/bin/env bash
# Cloud TPU pod launcher: creates (or reuses) a TPU VM pod slice with gcloud, puts this
# checkout on every worker, installs ssljax with jax[tpu] (in a Python 3.11 virtualenv made
# by uv, since the TPU VM images ship Python 3.10), runs the same `ssljax train
# --distributed` on all workers (--worker=all; JAX detects the pod's coordinator and process
# ids) and streams the log of worker 0.
#
#   bash launch/tpu_pod.sh train CONFIG WORKDIR [--config.key=value ...]
#   bash launch/tpu_pod.sh logs        # stream worker 0's log again (Ctrl-C stops only that)
#   bash launch/tpu_pod.sh stop        # SIGTERM the run on every worker (it checkpoints, 143)
#   bash launch/tpu_pod.sh delete      # delete the pod
#
# Settings (environment):
#   TPU_NAME         pod name (default ssljax-pod)
#   ZONE             e.g. us-central2-b (required)
#   PROJECT          gcloud project (default: gcloud's configured one)
#   ACCELERATOR_TYPE e.g. v4-32, v5litepod-16 (default v4-32)
#   RUNTIME_VERSION  TPU VM image (default tpu-ubuntu2204-base)
#   SPOT=1           create a Spot (preemptible) pod
#   REPO_URL         clone this git URL (at COMMIT, default: this checkout's HEAD) on every
#                    worker; unset: copy this checkout's committed HEAD with `git archive`
#   SSLJAX_DRY_RUN=1 print the commands instead of running them (no gcloud needed);
#                    SSLJAX_DRY_RUN_TPU_STATE (absent, READY, PREEMPTED, ...) stands in for
#                    the pod's state that `describe` would report.
#
# WORKDIR must be one directory every worker sees (orbax writes each checkpoint from all
# workers; worker 0 writes config.json, metrics and results): usually a gs:// bucket
# (gs://bucket/run; gcsfs is installed with ssljax below), or a shared filesystem mounted at
# the same path on every worker (e.g. Filestore).
#
# Preemption: ssljax checkpoints when a worker gets SIGTERM (maintenance, Spot reclaim) and
# stops on every worker at the same step. A preempted pod is not restarted by Cloud TPU:
# rerun the same `train` command; it finds the pod PREEMPTED, deletes and recreates it,
# installs again and resumes from the workdir's latest checkpoint.
set -euo pipefail

cd "$(dirname "$0")/.."

die() { echo "launch/tpu_pod.sh: $*" >&2; exit 1; }

DRY_RUN=${SSLJAX_DRY_RUN:-0}
TPU_NAME=${TPU_NAME:-ssljax-pod}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
REMOTE_DIR=ssljax            # on each worker, under the login user's home
LOG=ssljax-train.log         # on each worker, in the home directory
PID=ssljax-train.pid
VENV='~/ssljax-venv'         # the Python environment on each worker (see install)

run() {  # prints the command (dry run) or runs it
  if [ "$DRY_RUN" = 1 ]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

WHERE=()
set_where() {  # the zone/project flags of every gcloud call, into WHERE
  [ -n "${ZONE:-}" ] || die "set ZONE (e.g. ZONE=us-central2-b) for the pod"
  WHERE=(--zone "$ZONE")
  [ -z "${PROJECT:-}" ] || WHERE+=(--project "$PROJECT")
}

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with the zone/project flags
  local sub=$1; shift
  set_where
  run gcloud compute tpus tpu-vm "$sub" "$@" "${WHERE[@]}"
}

on_workers() {  # WORKER COMMAND: run a shell command on worker(s) over ssh
  local worker=$1 command=$2
  tpu ssh "$TPU_NAME" --worker="$worker" --command="$command"
}

pod_state() {  # READY, CREATING, PREEMPTED, ... or absent
  if [ "$DRY_RUN" = 1 ]; then
    echo "${SSLJAX_DRY_RUN_TPU_STATE:-absent}"
    return
  fi
  set_where
  gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" --format='value(state)' \
    2>/dev/null || echo absent
}

ensure_pod() {
  local state
  set_where  # here, not in pod_state's subshell, so that a missing ZONE stops the script
  state=$(pod_state)
  case "$state" in
    READY)
      echo "launch/tpu_pod.sh: reusing pod $TPU_NAME (READY)" >&2 ;;
    absent)
      create_pod ;;
    PREEMPTED|TERMINATED|FAILED)
      echo "launch/tpu_pod.sh: pod $TPU_NAME is $state; deleting and recreating it" >&2
      tpu delete "$TPU_NAME" --quiet
      create_pod ;;
    *)
      die "pod $TPU_NAME is $state; wait until it is READY (or delete it) and rerun" ;;
  esac
}

create_pod() {
  local spot=()
  [ "${SPOT:-0}" = 1 ] && spot=(--spot)
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" "${spot[@]}"
}

copy_code() {
  if [ -n "${REPO_URL:-}" ]; then
    local commit=${COMMIT:-$(git rev-parse HEAD)}
    on_workers all "set -e; [ -d $REMOTE_DIR/.git ] || git clone -q $(printf %q "$REPO_URL") $REMOTE_DIR; cd $REMOTE_DIR && git fetch -q origin && git checkout -q $(printf %q "$commit")"
  else
    [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] ||
      echo "launch/tpu_pod.sh: uncommitted changes are not copied (git archive HEAD)" >&2
    local archive
    archive=${TMPDIR:-/tmp}/ssljax-$(git rev-parse --short HEAD).tar.gz
    run git archive --format=tar.gz -o "$archive" HEAD
    tpu scp "$archive" "$TPU_NAME:ssljax.tar.gz" --worker=all
    on_workers all "set -e; mkdir -p $REMOTE_DIR && tar -xzf ssljax.tar.gz -C $REMOTE_DIR"
  fi
}

install() {
  # ssljax needs Python >= 3.11 and the TPU VM images ship 3.10: uv (installed if missing)
  # provides a 3.11 virtualenv, ~/ssljax-venv, reused on later runs.
  on_workers all "set -e; export PATH=\$HOME/.local/bin:\$PATH; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; [ -x $VENV/bin/python ] || uv venv -q -p 3.11 $VENV; cd $REMOTE_DIR && uv pip install -q -p $VENV/bin/python -e . 'jax[tpu]' gcsfs"
}

start_training() {  # CONFIG WORKDIR ARGS...: starts detached on every worker
  local args
  args=$(printf ' %q' -m ssljax.cli train --config "$1" --workdir "$2" --distributed "${@:3}")
  # setsid + nohup: the run outlives the ssh session; its pid is kept for `stop`.
  on_workers all "cd $REMOTE_DIR && PYTHONUNBUFFERED=1 setsid nohup $VENV/bin/python$args > ~/$LOG 2>&1 < /dev/null & echo \$! > ~/$PID"
}

stream_logs() {
  echo "launch/tpu_pod.sh: streaming worker 0's log (Ctrl-C stops the stream, not the run; bash launch/tpu_pod.sh logs resumes it)" >&2
  on_workers 0 "tail -n +1 -F ~/$LOG"
}

config_exists() {  # CONFIG: a file, or a config shipped in ssljax/configs (NAME[:ARG], NAME_ARG)
  local path=${1%%:*} file
  if [ -f "$path" ] || [ -f "ssljax/configs/$path.py" ]; then return 0; fi
  if [[ "$1" != *:* ]]; then
    for file in ssljax/configs/[a-z]*.py; do
      if [[ "$1" == "$(basename "$file" .py)_"* ]]; then return 0; fi
    done
  fi
  return 1
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  train)
    [ $# -ge 2 ] || die "usage: bash launch/tpu_pod.sh train CONFIG WORKDIR [--config.key=value ...]"
    config_exists "$1" || die "config file ${1%%:*} not found, nor a config that ships in" \
      "ssljax/configs ($(ls ssljax/configs | sed -n 's/^\([a-z].*\)\.py$/\1/p' | paste -sd ' '))"
    ensure_pod
    copy_code
    install
    start_training "$@"
    stream_logs
    ;;
  logs) stream_logs ;;
  stop) on_workers all "kill -TERM \$(cat ~/$PID)" ;;
  delete) tpu delete "$TPU_NAME" --quiet ;;
  *) die "usage: bash launch/tpu_pod.sh train CONFIG WORKDIR [--config.key=value ...] | logs | stop | delete" ;;
esac
