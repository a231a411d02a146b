#!/usr/bin/env bash
# Quick start, command 1: the whole BR2K story on this machine.
#
#  1. installs the toolchain and builds `br2k` and the paper's log server;
#  2. starts a local chain (anvil) with the service registry, and a container registry;
#  3. builds an OCI image of the log server and pushes it (`br2k image`, `br2k deploy`);
#  4. deploys 3 replicas from the image pulled back by digest, recorded on chain;
#  5. starts the manager daemon (`br2k manager run`), the dashboard (`br2k dashboard`, its URL
#     printed: open it in a browser to watch the rest) and 3 users (`br2k users`);
#  6. kills the leader: a new leader and location appear, the users carry on;
#  7. kills every replica and their runner: the users fail, one of them files a claim,
#     the manager redeploys the service from the registry's image, the users carry on;
#  8. prints the checker's table (the paper's Table 2) and the manager's metrics.
# Progress on stderr as it happens (each br2k command echoed as `$ br2k ...`); the table on stdout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
# shellcheck source=tools/env.sh
source tools/env.sh

echo "demo: building br2k and br2k-logserver (the first build compiles the dependencies: a few minutes)"
cargo build --quiet -p br2k-cli -p br2k-logserver
br2k="$root/target/debug/br2k"

# shellcheck source=tools/local-stack.sh
source tools/local-stack.sh
cleanup() {
  "$br2k" --quiet down --name logserver >/dev/null 2>&1 || true
  [[ -n ${manager:-} ]] && kill "$manager" 2>/dev/null
  [[ -n ${dashboard:-} ]] && kill "$dashboard" 2>/dev/null
  stop_stack
  wait 2>/dev/null || true
}
trap cleanup EXIT
start_stack
user_key=$(key 1)
cd "$work"
run service-registry deploy --claim-cooldown 30

# 3-4. The image, pushed and deployed by digest.
run image build "$root/target/debug/br2k-logserver" --name demo/logserver --tag v1
run image-registry add lab "$oci_url" --plain-http
run deploy logserver --context local --image demo/logserver:v1 --network loopback --election-timeout 500

# 5. The manager and the users.
metrics="127.0.0.1:$(free_port)"
say "starting the manager (its log: manager | ...); probes every 60 s, so the claim is what wakes it"
"$br2k" manager run --service logserver --probe-interval 60s --metrics "$metrics" \
  --network loopback --election-timeout 500 --state-dir "$work/manager" 2> >(sed -u 's/^/manager | /' >&2) &
manager=$!
wait_http "http://$metrics/metrics"
dashboard_address="127.0.0.1:$(free_port)"
"$br2k" dashboard logserver --listen "$dashboard_address" 2> >(sed -u 's/^/dashboard | /' >&2) &
dashboard=$!
wait_http "http://$dashboard_address/api/services"
say "the dashboard: http://$dashboard_address/ (open it in a browser: it follows the story by itself)"
# A leader change costs a few failed attempts; a dead service, many: 20 tells them apart.
say "starting 3 users (60 requests each at 2/s; a user claims after 20 failed attempts in a minute)"
ETH_PRIVATE_KEY=$user_key "$br2k" users logserver --users 3 --requests 60 --rate 2 --claim-after 20 --check-local \
  >"$work/table.md" 2> >(sed -u 's/^/users   | /' >&2) &
users=$!
sleep 8

# 6. The leader dies; the runner starts its processes again and another node takes over.
epoch=$(field logserver run.epoch)
victim=$(field logserver 'run.nodes.find(n => n.app_url === run.location).name')
say "killing the leader $victim (kill -9 its app and etcd member)"
# shellcheck disable=SC2046
kill -9 $(field logserver 'run.nodes.filter(n => n.app_url === run.location).flatMap(n => [n.app_pid, n.etcd_pid]).join(" ")')
for _ in $(seq 200); do [[ $(field logserver run.epoch) -gt $epoch ]] && break; sleep 0.1; done
say "new leader $(field logserver 'run.nodes.find(n => n.app_url === run.location).name') at $(field logserver run.location) (epoch $(field logserver run.epoch))"
sleep 8

# 7. Everything dies: the runner and every replica. Only their disks remain.
say "killing every replica and their runner (kill -9 of 7 processes): the service is gone"
epoch=$(field logserver run.epoch)
# shellcheck disable=SC2046
kill -9 $(field logserver '[run.pid, ...run.nodes.flatMap(n => [n.app_pid, n.etcd_pid])].join(" ")')
killed=$(date +%s.%N)
say "the users now fail; one of them will claim, and the manager will redeploy from the image"
wait_answering logserver "$epoch"
say "the service answers again at $(field logserver run.location) (epoch $(field logserver run.epoch)), $(node -e "console.log(($(date +%s.%N) - $killed).toFixed(1))") s after it died"
say "waiting for the users to finish"
status=0
wait "$users" || status=$?
echo
cat "$work/table.md"
echo
run status logserver
say "manager metrics (http://$metrics/metrics):"
node -e 'fetch(process.argv[1]).then(r => r.text()).then(t => console.log(t.split("\n").filter(l => l.startsWith("br2k_manager_") && !l.includes("_bucket")).join("\n")))' \
  "http://$metrics/metrics"
exit "$status"
