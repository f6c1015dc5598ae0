#!/usr/bin/env bash
# The whole job on a GPU cluster without Ray: the deepspeed launcher starts one pretraining
# rank per GPU on every host of the hostfile (passwordless SSH; all hosts see the run's output
# folder); the data is prepared before, and export, finetune and evaluate run after, here.
#
#   HOSTFILE=infra/hostfile launch/deepspeed.sh configs/vit-h14-jft.yaml [--set KEY=VALUE ...]
#   NUM_GPUS=8 launch/deepspeed.sh configs/vit-b16-jft.yaml     # this machine only, no SSH
#
# HOSTFILE: hosts and their GPU slots (infra/hostfile shows the format); without one, NUM_GPUS
# ranks (default: every GPU) run on this machine. MASTER_PORT (default 29500). Run it again after
# a failure: finished stages are skipped and pretraining resumes from its newest checkpoint.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [--set KEY=VALUE ...]" >&2; exit 2; }
config=$1
shift
if [ -n "${HOSTFILE:-}" ]; then
  where=(--hostfile "$HOSTFILE")
else
  where=(--num_gpus "${NUM_GPUS:--1}")
fi
tessera run "$config" --set 'job.stages=[prepare]' --set job.executor=local "$@"
deepspeed "${where[@]}" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module pipeline.cli pretrain "$config" --resume auto "$@"
tessera run "$config" --set 'job.stages=[export,finetune,evaluate]' --set job.executor=local "$@"
