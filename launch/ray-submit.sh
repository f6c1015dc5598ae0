#!/usr/bin/env bash
# Submit `tessera run CONFIG` to a Ray cluster as a job and print its logs until it ends.
#
#   launch/ray-submit.sh configs/vit-b16-jft.yaml [MORE.yaml ...] [--set KEY=VALUE ...]
#
# RAY_ADDRESS       the cluster's job API (default http://127.0.0.1:8265: infra/dev-services.sh)
# TESSERA_ROOT      where relative paths in the config start (default: this directory); on a
#                   remote cluster, use absolute paths on shared storage, or s3:// URLs
# RAY_SUBMIT_ARGS   more `ray job submit` options, e.g. "--no-wait --submission-id jft-1"
#
# S3: AWS_ENDPOINT_URL, AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE and AWS_SHARED_CREDENTIALS_FILE
# go to the job's runtime environment. Keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_SESSION_TOKEN) never do: Ray writes every runtime environment, values included, to its
# runtime_env_agent.log. On a cluster on this machine they go through a credentials file only
# this user can read (AWS_SHARED_CREDENTIALS_FILE, removed when the job ends); a remote cluster
# must get them from its nodes (an instance role, or their own credentials file).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [CONFIG ...] [--set KEY=VALUE ...]" >&2; exit 2; }
BIN=${BIN:-.venv/bin}
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
private=$(mktemp -d "${TMPDIR:-/tmp}/tessera-submit.XXXXXX")  # mode 700
case " ${RAY_SUBMIT_ARGS:-} " in
  *" --no-wait "*) ;;  # the job outlives this script; so must its credentials file
  *) trap 'rm -rf "$private"' EXIT ;;
esac
# The job's working directory travels without .git: results rows get the commit from here.
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || true)
if [ -n "$commit" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  commit="$commit+dirty"
fi
TESSERA_COMMIT=$commit TESSERA_ROOT=${TESSERA_ROOT:-$PWD} "$BIN/python" - "$private" <<'PY'
import json, os, sys, urllib.parse

private = sys.argv[1]
passed = ["TESSERA_ROOT", "TESSERA_COMMIT", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
          "AWS_SHARED_CREDENTIALS_FILE"]
env = {k: os.environ[k] for k in passed if os.environ.get(k)}
keys = {k: os.environ[k] for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                   "AWS_SESSION_TOKEN"] if os.environ.get(k)}
if keys:
    host = urllib.parse.urlparse(os.environ["RAY_ADDRESS"]).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(
            f"ray-submit: AWS keys are set here but {os.environ['RAY_ADDRESS']} is another "
            "machine. Ray logs runtime environments, so keys are not sent through one: give the "
            "cluster's nodes an instance role or a credentials file, and unset the keys here."
        )
    path = os.path.join(private, "aws-credentials")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("[tessera]\n" + "".join(f"{k.lower()} = {v}\n" for k, v in keys.items()))
    env.update(AWS_SHARED_CREDENTIALS_FILE=path, AWS_PROFILE="tessera")
with open(os.path.join(private, "runtime-env.yaml"), "w") as f:  # JSON is YAML
    json.dump({"env_vars": env}, f)
PY
# shellcheck disable=SC2086  # RAY_SUBMIT_ARGS is a list of options
"$BIN/ray" job submit --working-dir . --runtime-env "$private/runtime-env.yaml" \
  ${RAY_SUBMIT_ARGS:-} -- tessera run "$@"
