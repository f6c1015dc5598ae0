#!/usr/bin/env bash
# The quickstart: Tessera's whole pipeline on real images, on this machine (2 CPU cores suffice).
#
#   launch/quickstart.sh [--set KEY=VALUE ...]      # or: make quickstart
#
# 1. .venv with the CPU build of PyTorch where there is no GPU, and Debian's Fashion-MNIST
#    (FASHION_MNIST=/a/folder/with/its/idx/files uses another copy); DeepSpeed's ops compiled.
# 2. A Ray head on loopback with token auth, stopped at the end and on Ctrl-C. With RAY_ADDRESS
#    set, the job goes to that cluster instead.
# 3. `tessera run configs/quickstart-vit.yaml configs/quickstart-igpt.yaml` as a Ray job: prepare
#    Fashion-MNIST and digits, pretrain a small ViT and a small ImageGPT, export, finetune,
#    evaluate. It prints each results table, the curves and pictures in each run folder, and the
#    tensorboard command.
#
# Everything goes under runs/ (QUICKSTART_ROOT: another folder). With AWS_ENDPOINT_URL set, it
# goes to s3://$QUICKSTART_BUCKET (default tessera-quickstart) on that endpoint instead.
# Run it again after an interruption: finished stages are skipped, and training resumes from its
# newest checkpoint. --set KEY=VALUE changes both configs (train.steps=200, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
command -v make >/dev/null || $SUDO apt-get install -y make \
  || { $SUDO apt-get update && $SUDO apt-get install -y make; }
export FASHION_MNIST=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
make --no-print-directory install
[ -d "$FASHION_MNIST" ] || { echo "quickstart: FASHION_MNIST=$FASHION_MNIST is not a folder" >&2; exit 2; }
BIN=.venv/bin
"$BIN/tessera" build-ops >/dev/null

if [ -n "${AWS_ENDPOINT_URL:-}" ]; then
  bucket=${QUICKSTART_BUCKET:-tessera-quickstart}
  "$BIN/python" -c "import s3fs, sys; fs = s3fs.S3FileSystem(); fs.exists(sys.argv[1]) or fs.mkdir(sys.argv[1])" "$bucket"
  export TESSERA_ROOT=s3://$bucket
else
  export TESSERA_ROOT=${QUICKSTART_ROOT:-$PWD}
fi
set -- --set "prepare.0.source=$FASHION_MNIST" "$@"

if [ -z "${RAY_ADDRESS:-}" ]; then
  export DEV_S3=0 TESSERA_DEV_STATE=${TESSERA_DEV_STATE:-.dev-services}
  cores=$(nproc); export RAY_CPUS=${RAY_CPUS:-$((cores < 2 ? 2 : cores))}  # 2 ranks + evaluation
  export DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
  BIN=$BIN infra/dev-services.sh start >/dev/null
  trap 'BIN=$BIN infra/dev-services.sh stop >/dev/null' EXIT
  export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=token
fi
echo "quickstart: Ray job on $RAY_ADDRESS; runs and data under $TESSERA_ROOT/runs"
# Ctrl-C must end this script whatever `ray job submit` does with it (it sometimes keeps
# tailing the log): the submission runs in the background, and the trap ends it; on the local
# head the EXIT trap then stops Ray, and with it the job (training resumes next time).
BIN=$BIN launch/ray-submit.sh configs/quickstart-vit.yaml configs/quickstart-igpt.yaml "$@" &
submit=$!
trap 'pkill -TERM -P "$submit" 2>/dev/null; kill -TERM "$submit" 2>/dev/null; exit 130' INT TERM
wait "$submit"
