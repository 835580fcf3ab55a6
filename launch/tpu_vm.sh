#!/usr/bin/env bash
# Runs a recipe on a Cloud TPU VM slice with gcloud: create it, install this checkout on every
# worker, train on all workers with a gs:// workdir, follow the logs, delete it.
#
#   export TPU_NAME=moca7b ZONE=us-east5-a ACCELERATOR=v5p-64 PROJECT=my-project
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh install
#   launch/tpu_vm.sh train --config configs/moca.py:size=7b --workdir gs://bucket/moca7b \
#       --config.init_from=gs://bucket/Qwen2.5-VL-7B-Instruct --config.input.sources.dclm.path=...
#   launch/tpu_vm.sh logs            # worker 0's log, followed (Ctrl-C stops following only)
#   launch/tpu_vm.sh delete
#
# Rerunning `train` with the same --workdir resumes from its latest checkpoint (also after a
# preemption: recreate, install, train). Check the fit first on any machine:
#   python launch/aot_compile.py --config configs/moca.py:size=7b --topology v5p-64
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR (e.g. v5p-64, v5e-64), PROJECT (default:
# gcloud's), RUNTIME (default: chosen from ACCELERATOR), REMOTE_DIR (default: mmembed_jax),
# SPOT=1 for a spot slice. DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

: "${TPU_NAME:?set TPU_NAME (the slice name)}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
REMOTE_DIR="${REMOTE_DIR:-mmembed_jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project="${PROJECT}"); fi

run() {  # runs (or with DRY_RUN=1 prints) one command
  if [[ "${DRY_RUN:-0}" == "1" ]]; then echo "$*"; else "$@"; fi
}

runtime_for() {  # the TPU VM software version of an accelerator type
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "unknown accelerator type '$1' (expected v4-N, v5e-N, v5p-N or v6e-N)" >&2; exit 2 ;;
  esac
}

ssh_all() {  # runs a shell command on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    --worker=all --command="$1"
}

command="${1:-}"
[[ -n "${command}" ]] || usage
shift
case "${command}" in
  create)
    : "${ACCELERATOR:?set ACCELERATOR, e.g. v5p-64}"
    accelerator="${ACCELERATOR/#v5e-/v5litepod-}"  # gcloud names v5e slices v5litepod-N
    runtime="${RUNTIME:-}"
    if [[ -z "${runtime}" ]]; then runtime="$(runtime_for "${ACCELERATOR}")"; fi
    spot=()
    if [[ "${SPOT:-0}" == "1" ]]; then spot=(--spot); fi
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
      --accelerator-type="${accelerator}" --version="${runtime}" "${spot[@]}"
    ;;
  install)  # this checkout (tracked files) to every worker, then the package with libtpu
    archive="$(mktemp -t mmembed_jax.XXXXXX.tar.gz)"
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "${archive}" HEAD
    run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:mmembed_jax.tar.gz" \
      --zone="${ZONE}" "${PROJECT_FLAG[@]}" --worker=all
    ssh_all "rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf mmembed_jax.tar.gz -C ${REMOTE_DIR} \
      && cd ${REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
    ;;
  train)  # the same command on every worker; logs to ~/REMOTE_DIR/train.log on each
    [[ $# -gt 0 ]] || { echo "train: give the tpu_train.py flags (--config ... --workdir gs://...)" >&2; exit 2; }
    args="$(printf '%q ' "$@")"
    ssh_all "cd ${REMOTE_DIR} && nohup .venv/bin/python launch/tpu_train.py --distributed ${args} \
      > train.log 2>&1 < /dev/null &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
      --worker="${WORKER:-0}" --command="tail -n 200 -F ${REMOTE_DIR}/train.log"
    ;;
  stop)  # SIGTERM on every worker: the trainer saves a checkpoint and exits
    ssh_all "pkill -TERM -f launch/tpu_train.py || true"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
