#!/usr/bin/env bash
# The two figures of issue #15, measured on this machine:
#   1. seconds from `git clone` to the first instance `running` (make run's preflight installs the missing OS
#      tools, make creates .venv, then a launch race on the local marketplace);
#   2. lines `make run` prints in its first minute with nothing happening (goal: under 25).
#
#   scripts/measure_fresh.sh [REPO]     # clone REPO (default: this checkout's repository) into a temp dir
#   scripts/measure_fresh.sh --idle-only  # figure 2 only, in this checkout (its .venv must exist)
#
# PORT, DATABASE_URL, REDIS_URL (and any other setting) are passed through to `make run`; unset, make run
# embeds PostgreSQL and Redis. Run it on a machine without sshd/restic/rsync/... to measure the preflight's
# installs (as root, or with passwordless sudo). Leaves the clone in place (its path is printed).
set -euo pipefail
PORT=${PORT:-8000}
export PORT
IDLE_SECONDS=${IDLE_SECONDS:-60}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# start `make run` in its own process group, output to $1
start_make_run() { setsid make run >"$1" 2>&1 < /dev/null & echo $!; }
stop_make_run() {
  # TERM to make's child (devrun's honcho, which stops every process in order), then to what is left;
  # not INT: a background job of a script ignores SIGINT
  kill -TERM $(ps -o pid= --ppid "$1") 2>/dev/null || true
  for _ in $(seq 1 40); do [ -z "$(ps -o pid= --ppid "$1")" ] && break; sleep 0.5; done
  kill -TERM -- "-$1" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$1" 2>/dev/null || true
}

API_TOKEN_FILE=$(mktemp -u /tmp/dumont-token.XXXXXX)
export API_TOKEN_FILE
api() {  # api METHOD PATH [JSON] : prints the JSON answer (python3 only: curl may not be installed yet)
  python3 - "$@" <<'PY'
import json, os, sys, urllib.request
method, path = sys.argv[1], sys.argv[2]
body = sys.argv[3].encode() if len(sys.argv) > 3 else None
base = f"http://127.0.0.1:{os.environ['PORT']}/api/v1"
headers = {"Content-Type": "application/json"}
token_file = os.environ["API_TOKEN_FILE"]  # one login for the whole run: logins are rate-limited
if path != "/auth/login":
    if not os.path.exists(token_file):
        login = urllib.request.Request(base + "/auth/login", json.dumps({"username": os.environ.get("DUMONT_ADMIN_USER", "admin"),
            "password": os.environ.get("DUMONT_ADMIN_PASSWORD", "admin")}).encode(), headers)
        access = json.load(urllib.request.urlopen(login, timeout=30))["access"]
        with open(token_file, "w") as out:
            out.write(access)
    headers["Authorization"] = "Bearer " + open(token_file).read()
request = urllib.request.Request(base + path, body, headers, method=method)
print(urllib.request.urlopen(request, timeout=60).read().decode())
PY
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $what" >&2; return 1; }
    sleep 1
  done
}

idle_minute() {  # in the current directory
  local log pid
  log=$(mktemp /tmp/make-run-idle.XXXXXX)
  pid=$(start_make_run "$log")
  sleep "$IDLE_SECONDS"  # the measurement itself: a minute with nothing happening
  local lines
  lines=$(wc -l < "$log")
  stop_make_run "$pid"
  echo "--- make run, first ${IDLE_SECONDS}s with nothing happening ($log) ---"
  head -n "$lines" "$log"
  echo "--- lines printed by make run in its first ${IDLE_SECONDS}s idle: $lines (goal: under 25)"
}

if [ "${1:-}" = "--idle-only" ]; then
  cd "$(dirname "$0")/.."
  idle_minute
  exit 0
fi

REPO=${1:-$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)}
WORK=$(mktemp -d /tmp/dumont-fresh.XXXXXX)
echo "clone of $REPO in $WORK/dumont"
t0=$(now)
git clone --quiet "$REPO" "$WORK/dumont"
cd "$WORK/dumont"
log="$WORK/make-run.log"
pid=$(start_make_run "$log")
trap 'stop_make_run $pid' EXIT
wait_for 1800 "make run to answer on port $PORT (see $log)" api GET /health
t_up=$(now)
id=$(api POST /instances '{"name": "first", "gpu_name": "RTX 4090"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
running() { api GET "/instances/$id" | python3 -c 'import json,sys; s=json.load(sys.stdin)["status"]; sys.exit(0 if s == "running" else 2 if s == "failed" else 1)'; }
wait_for 900 "instance $id to be running" running
t_running=$(now)
api GET "/instances/$id" | python3 -c 'import json,sys; i=json.load(sys.stdin); print("instance", i["id"], i["status"], "-", i["status_reason"])'
api DELETE "/instances/$id" >/dev/null
destroyed() { api GET "/instances/$id" | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["status"] != "destroyed")'; }
wait_for 300 "instance $id to be destroyed (so that the idle minute is idle)" destroyed
stop_make_run "$pid"; trap - EXIT
echo "git clone -> make run answering: $(elapsed "$t0" "$t_up") s"
echo "git clone -> first instance running: $(elapsed "$t0" "$t_running") s"
idle_minute
