#!/usr/bin/env bash
# Local development services, every port on loopback only: a Ray head (its dashboard and job API
# on 127.0.0.1:8265, its GCS, raylet and agents on 127.0.0.1) and an S3-compatible endpoint
# (moto) on 127.0.0.1:$S3_PORT. A single-machine head: no other node can join it.
#
#   infra/dev-services.sh start    # then: eval "$(infra/dev-services.sh env)"
#   infra/dev-services.sh env      # the exports that point tessera and ray at them
#   infra/dev-services.sh stop
#
# DEV_S3=0 starts the Ray head only. Ports: S3_PORT, RAY_PORT, DASHBOARD_PORT, RAY_AGENT_PORT
# (the job agent's, Ray's fixed 52365 unless set: an agent left behind by a crashed head holds
# it, and every later head on the machine then answers "No available agent to submit job");
# RAY_CPUS.
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
RAY_AGENT_PORT=${RAY_AGENT_PORT:-52365}
RAY_CPUS=${RAY_CPUS:-2}
DEV_S3=${DEV_S3:-1}  # 0: start the Ray head only
mkdir -p "$STATE"
MARK="$(cd "$STATE" && pwd)"

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

stop_ray() {
  # Not `ray stop`, which ends every Ray process of the user, other clusters included: the
  # processes whose environment holds this state folder's mark (the ones `start` launched, as
  # Ray passes its environment on) and their descendants. In `ray stop`'s order (the raylet,
  # the rest, the GCS last, so none waits on a gone peer): TERM, then KILL after 5 s.
  "$BIN/python" - "$MARK" "$RAY_PORT" <<'PY'
import os, signal, sys, time

mark = f"TESSERA_DEV_SERVICES={sys.argv[1]}".encode()


def ours():
    """pid: process name, for the marked processes and their descendants."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
            with open(f"/proc/{pid}/environ", "rb") as f:
                marked = mark in f.read().split(b"\0")
        except OSError:
            continue
        if tail.split()[0] != "Z":
            procs[int(pid)] = (head.split("(", 1)[1], int(tail.split()[1]), marked)
    found = {pid for pid, (_, _, marked) in procs.items() if marked}
    while more := {p for p, (_, ppid, _) in procs.items() if ppid in found} - found:
        found |= more
    found.discard(os.getpid())
    return {pid: procs[pid][0] for pid in found}


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(pids):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):  # gone (its number reused)
                pass
        deadline = time.monotonic() + wait
        while any(map(alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.1)


procs = ours()
stop([p for p, name in procs.items() if name == "raylet"])
stop([p for p, name in procs.items() if name not in ("raylet", "gcs_server")])
stop(list(set(procs) | set(ours())))  # those whose parent went first are in `procs`

# As `ray stop` does: forget this head's address (`ray start` wrote it to ray_current_cluster),
# or the next plain `ray.init()` or `ray status` on this machine waits for a GCS that is gone.
from ray._common.utils import get_ray_address_file  # Ray's own path (RAY_TMPDIR, TMPDIR)

address_file = get_ray_address_file(None)
try:
    with open(address_file) as f:
        if f.read().strip() == f"127.0.0.1:{sys.argv[2]}":
            os.remove(address_file)
except FileNotFoundError:
    pass
PY
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
    # TESSERA_DEV_SERVICES marks the processes Ray starts (and `stop` stops only those).
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: `ray start` turns --node-ip-address 127.0.0.1 into
    # the machine's external address (resolve_ip_for_localhost), and Ray binds its GCS, raylet,
    # agents and client server to the node address; with clusters off it keeps 127.0.0.1, and
    # every Ray port listens on loopback. The price: no other node can join this head.
    TESSERA_DEV_SERVICES="$MARK" RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
      PATH="$(cd "$BIN" && pwd):$PATH" "$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
      --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --num-cpus "$RAY_CPUS" \
      --dashboard-agent-listen-port "$RAY_AGENT_PORT" \
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
    stop_ray
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
