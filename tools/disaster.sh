#!/usr/bin/env bash
# A total disaster drill (issue 17): every replica killed and every disk lost while users
# send requests; only the backups (the newest signed one linked to the one recorded on
# chain) bring the service back.
#
#  1. a local chain (anvil) with the service registry, and a container registry;
#  2. the log server's image pushed, 3 replicas deployed from it, backing up every
#     BACKUP_INTERVAL seconds (default 1) into the same registry, one backup recorded on
#     chain every RECORD_INTERVAL seconds (default 10), the others signed by the leader;
#  3. the manager daemon, and 3 users (`br2k users --disaster-at DISASTER_AT`, default 20);
#  4. at DISASTER_AT s the users kill every replica, etcd member and their runner and delete
#     the runner's state directory; they fail, one claims, the manager redeploys, the
#     replicas restore the newest signed backup linked to the one the chain records, the
#     users carry on;
#  5. the checker's table: how many acknowledged requests the disaster took (those after
#     the newest backup), failing if any was acknowledged more than an interval before it.
# Usage: bash tools/disaster.sh   (environment: BACKUP_INTERVAL, RECORD_INTERVAL, DISASTER_AT, REQUESTS)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
# shellcheck source=tools/env.sh
source tools/env.sh
say_prefix=disaster
interval=${BACKUP_INTERVAL:-1}
record_interval=${RECORD_INTERVAL:-10}
disaster_at=${DISASTER_AT:-20}
requests=${REQUESTS:-90}

echo "disaster: building br2k and br2k-logserver" >&2
cargo build --quiet -p br2k-cli -p br2k-logserver
br2k="$root/target/debug/br2k"

# shellcheck source=tools/local-stack.sh
source tools/local-stack.sh
cleanup() {
  "$br2k" --quiet down --name logserver >/dev/null 2>&1 || true
  [[ -n ${manager:-} ]] && kill "$manager" 2>/dev/null
  stop_stack
  wait 2>/dev/null || true
}
trap cleanup EXIT
start_stack
user_key=$(key 1)
cd "$work"
run service-registry deploy --claim-cooldown 30
run image build "$root/target/debug/br2k-logserver" --name demo/logserver --tag v1
run image-registry add lab "$oci_url" --plain-http
run deploy logserver --context local --image demo/logserver:v1 --network loopback --election-timeout 500 \
  --backup-interval "$interval" --backup-record-interval "$record_interval"

metrics="127.0.0.1:$(free_port)"
say "starting the manager (its log: manager | ...)"
"$br2k" manager run --service logserver --probe-interval 60s --metrics "$metrics" --backup-interval "$interval" \
  --backup-record-interval "$record_interval" --network loopback --election-timeout 500 --state-dir "$work/manager" 2> >(sed -u 's/^/manager | /' >&2) &
manager=$!
wait_http "http://$metrics/metrics"
say "3 users, $requests requests each at 2/s; at $disaster_at s every replica dies and every disk is deleted"
status=0
ETH_PRIVATE_KEY=$user_key "$br2k" users logserver --users 3 --requests "$requests" --rate 2 --claim-after 20 \
  --disaster-at "$disaster_at" --check-local >"$work/table.md" 2> >(sed -u 's/^/users   | /' >&2) || status=$?
echo
cat "$work/table.md"
echo
run status logserver
run backup ls logserver
exit "$status"
