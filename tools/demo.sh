#!/usr/bin/env bash
# Quick start, command 1: installs the toolchain, builds `br2k`, starts a local anvil, and
# drives the service registry through `br2k` as an operator would: deploy the registry,
# register a service, allow a replica key, publish the leader's location with that key,
# resolve it as a client, file a claim. Results on stdout, progress on stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
# shellcheck source=tools/env.sh
source tools/env.sh

echo "demo: building br2k (the first build compiles the dependencies: a few minutes)" >&2
cargo build --quiet -p br2k-cli
br2k="$root/target/debug/br2k"

work=$(mktemp -d)
anvil_pid=
cleanup() {
  if [[ -n $anvil_pid ]]; then kill "$anvil_pid" 2>/dev/null || true; wait "$anvil_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# A throwaway chain on a free port; its dev keys come from the file anvil writes, not from
# this project.
anvil --port 0 --config-out "$work/anvil.json" >"$work/anvil.log" 2>&1 &
anvil_pid=$!
for _ in $(seq 100); do
  port=$(sed -n 's/^Listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$work/anvil.log")
  [[ -n $port ]] && break
  kill -0 "$anvil_pid" 2>/dev/null || { cat "$work/anvil.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n ${port:-} ]] || { echo "demo: anvil did not start; its output:" >&2; cat "$work/anvil.log" >&2; exit 1; }
account() { node -e 'const c = require(process.argv[1]); console.log(c[process.argv[2]][process.argv[3]])' "$work/anvil.json" "$1" "$2"; }
manager_key=$(account private_keys 0)
operator_key=$(account private_keys 1)
operator=$(account available_accounts 1)
client_key=$(account private_keys 2)

export ETH_RPC_URL="http://127.0.0.1:$port"
cd "$work" # deployments/<chain-id>.json is written here
run() {
  echo "\$ br2k $*" >&2
  "$br2k" "$@"
}

echo "demo: anvil listens on $ETH_RPC_URL" >&2
ETH_PRIVATE_KEY=$manager_key run service-registry deploy
ETH_PRIVATE_KEY=$manager_key run service register demo-logserver --replicas 3 --context local
ETH_PRIVATE_KEY=$manager_key run service operator add demo-logserver "$operator"
# What a replica does when it becomes the leader:
ETH_PRIVATE_KEY=$operator_key run service location demo-logserver http://127.0.0.1:8080 --epoch 1
# What a client does:
run resolve demo-logserver
run resolve demo-logserver --json
run service info demo-logserver
# What a client does when the service stops answering:
ETH_PRIVATE_KEY=$client_key run claim demo-logserver --reason "demo: no answer from http://127.0.0.1:8080"
