# Shared by tools/demo.sh and tools/bench-recovery.sh (sourced, after tools/env.sh):
# a throwaway chain (anvil) and container registry (docker-registry) on free ports, with
# br2k's files kept in $work. Defines: say, run, field, wait_http, wait_answering,
# start_stack; sets br2k, work, ETH_RPC_URL, ETH_PRIVATE_KEY (anvil key 0), oci_url.

say() { echo "${say_prefix:-demo}: $*" >&2; }
run() { echo "\$ br2k $*" >&2; "$br2k" "$@"; }
free_port() { node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })'; }
wait_http() { # URL: waits until something answers it
  for _ in $(seq 100); do node -e 'fetch(process.argv[1]).then(() => process.exit(0), () => process.exit(1))' "$1" && return 0; sleep 0.2; done
  say "nothing answered $1"; return 1
}
# field SERVICE EXPR: a JS expression on the run file `br2k up` keeps for SERVICE.
field() { node -e 'const run = JSON.parse(require("fs").readFileSync(process.argv[1])); console.log(eval(process.argv[2]))' "$TMPDIR/br2k-$(id -u)/up/$1/run.json" "$2"; }
# wait_answering SERVICE EPOCH: until a location above EPOCH answers its health check.
wait_answering() {
  for _ in $(seq 1500); do
    if [[ $(field "$1" 'run.epoch || 0' 2>/dev/null || echo 0) -gt $2 ]] &&
      node -e 'fetch(process.argv[1] + "/br2k/health").then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))' \
        "$(field "$1" run.location)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  say "$1 did not answer above epoch $2 within 150 s"; return 1
}
key() { cast wallet private-key "test test test test test test test test test test test junk" "$1"; }
stack_pids=()
stop_stack() {
  for pid in "${stack_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
start_stack() {
  work=$(mktemp -d /tmp/br2k-demo.XXXXXX)
  export TMPDIR="$work/tmp" BR2K_HOME="$work/home"
  mkdir -p "$TMPDIR" "$work/oci"
  local chain_port oci_port
  chain_port=$(free_port)
  anvil --host 127.0.0.1 --port "$chain_port" --silent >"$work/anvil.log" 2>&1 &
  stack_pids+=($!)
  oci_port=$(free_port)
  # Deletes allowed: backup retention deletes old backups through the registry's API.
  printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/oci" "$oci_port" >"$work/oci.yml"
  docker-registry serve "$work/oci.yml" >"$work/oci.log" 2>&1 &
  stack_pids+=($!)
  oci_url="http://127.0.0.1:$oci_port"
  wait_http "http://127.0.0.1:$chain_port"
  wait_http "$oci_url/v2/"
  export ETH_RPC_URL="http://127.0.0.1:$chain_port"
  ETH_PRIVATE_KEY=$(key 0)
  export ETH_PRIVATE_KEY
  say "chain at $ETH_RPC_URL (anvil), container registry at $oci_url (docker-registry); work files in $work"
}
