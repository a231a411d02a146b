#!/usr/bin/env bash
# Quick start, command 1: installs the toolchain, builds `br2k` and the paper's log server,
# and puts a replicated service up on this machine with `br2k up`: 3 replicas (each an
# etcd member plus the app, in its own network namespace when run as root), a local anvil
# holding the service registry, the leader published in it. Then it sends a few requests,
# kills the leader's processes by hand, shows the new leader and its new location in the
# registry, and stops everything with `br2k down`. Results on stdout, progress on stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
# shellcheck source=tools/env.sh
source tools/env.sh

echo "demo: building br2k and br2k-logserver (the first build compiles the dependencies: a few minutes)" >&2
cargo build --quiet -p br2k-cli -p br2k-logserver
br2k="$root/target/debug/br2k"
state=$(mktemp -d)/logserver
cleanup() { "$br2k" --quiet down --name demo --state-dir "$state" >/dev/null 2>&1 || true; }
trap cleanup EXIT

run() {
  echo "\$ br2k $*" >&2
  "$br2k" "$@"
}
# Reads a field of the run file `br2k up` keeps current (JS expression on `run`).
field() { node -e 'const run = JSON.parse(require("fs").readFileSync(process.argv[1])); console.log(eval(process.argv[2]))' "$state/run.json" "$1"; }
# POSTs to the current leader, the way a client would after resolving the service.
post() {
  node -e 'fetch(process.argv[1] + "/log", {method: "POST", headers: {"content-type": "application/json"}, body: process.argv[2]})
    .then(async r => console.log(`POST /log ${process.argv[2]} -> ${r.status} ${await r.text()}`))
    .catch(e => { console.error(e.message); process.exit(1); })' "$1" "$2"
}

run up --detach --name demo --state-dir "$state"
rpc=$(field run.rpc_url)
registry=$(field run.registry)
run resolve demo --rpc-url "$rpc" --registry "$registry"
leader=$(field run.location)
for user in 1 2 3; do post "$leader" "{\"user\": $user}"; done

victim=$(field 'run.nodes.find(n => n.app_url === run.location).name')
pids=$(field 'run.nodes.filter(n => n.app_url === run.location).flatMap(n => [n.app_pid, n.etcd_pid]).join(" ")')
epoch=$(field run.epoch)
echo "\$ kill -9 $pids    # the leader $victim's app and etcd member" >&2
# shellcheck disable=SC2086
kill -9 $pids
started=$(date +%s.%N)
for _ in $(seq 200); do
  [[ $(field 'run.epoch') -gt $epoch ]] && break
  sleep 0.1
done
[[ $(field 'run.epoch') -gt $epoch ]] || { echo "demo: no new leader within 20 s; see $state" >&2; exit 1; }
echo "demo: new leader $(field 'run.nodes.find(n => n.app_url === run.location).name') published after $(node -e "console.log(($(date +%s.%N) - $started).toFixed(1))") s" >&2
run resolve demo --rpc-url "$rpc" --registry "$registry"
post "$(field run.location)" '{"user": 4}'
run down --name demo --state-dir "$state"
trap - EXIT
