#!/usr/bin/env bash
# Local development services, bound to loopback only: a Ray head (its dashboard and job API on
# 127.0.0.1:8265) and an S3-compatible endpoint (moto) on 127.0.0.1:$S3_PORT.
#
#   infra/dev-services.sh start    # then: eval "$(infra/dev-services.sh env)"
#   infra/dev-services.sh env      # the exports that point tessera and ray at them
#   infra/dev-services.sh stop
#
# DEV_S3=0 starts the Ray head only. Ports: S3_PORT, RAY_PORT, DASHBOARD_PORT; RAY_CPUS.
#
# The S3 credentials are moto's fixed test values, good for this endpoint only. Ray's token
# authentication is on (RAY_AUTH_MODE=token): the dashboard and job API answer 401 without the
# token in ~/.ray/auth_token, which the `ray` CLI sends by itself.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

BIN=${BIN:-.venv/bin}
STATE=${TESSERA_DEV_STATE:-.dev-services}
S3_PORT=${S3_PORT:-9000}
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
RAY_CPUS=${RAY_CPUS:-2}
DEV_S3=${DEV_S3:-1}  # 0: start the Ray head only

wait_http() {  # url, seconds: any HTTP answer counts (401 included)
  for _ in $(seq 1 $((2 * $2))); do
    "$BIN/python" -c "
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError:
    pass" "$1" 2>/dev/null && return 0
    sleep 0.5
  done
  echo "dev-services: $1 did not answer within $2 s" >&2
  return 1
}

env_lines() {
  if [ "$DEV_S3" != 0 ]; then
    echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$S3_PORT"
    echo "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
  fi
  echo "export RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=$RAY_AUTH_MODE"
}

case "${1:-}" in
  start)
    mkdir -p "$STATE"
    if [ "$DEV_S3" = 0 ]; then
      :  # Ray only (the quickstart keeps its data in a local folder)
    elif [ -f "$STATE/moto.pid" ] && kill -0 "$(cat "$STATE/moto.pid")" 2>/dev/null; then
      echo "dev-services: moto already running (pid $(cat "$STATE/moto.pid"))"
    else
      nohup "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 &
      echo $! >"$STATE/moto.pid"
    fi
    [ "$RAY_AUTH_MODE" != token ] || "$BIN/ray" get-auth-token --generate >/dev/null
    # Jobs' entrypoints (`tessera run`) and workers find this environment's commands first.
    PATH="$(cd "$BIN" && pwd):$PATH" "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
      --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --num-cpus "$RAY_CPUS" \
      --disable-usage-stats >"$STATE/ray.log" 2>&1 \
      || { echo "dev-services: ray start failed, see $STATE/ray.log" >&2; exit 1; }
    [ "$DEV_S3" = 0 ] || wait_http "http://127.0.0.1:$S3_PORT" 30
    wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" 60
    echo "dev-services: Ray on 127.0.0.1:$DASHBOARD_PORT, S3 on 127.0.0.1:$S3_PORT"
    env_lines
    ;;
  env)
    env_lines
    ;;
  stop)
    "$BIN/ray" stop >/dev/null 2>&1 || true
    if [ -f "$STATE/moto.pid" ]; then
      kill "$(cat "$STATE/moto.pid")" 2>/dev/null || true
      rm -f "$STATE/moto.pid"
    fi
    echo "dev-services: stopped"
    ;;
  *)
    echo "usage: $0 start|env|stop" >&2
    exit 2
    ;;
esac
