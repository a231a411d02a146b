#!/usr/bin/env bash
# Benchmark: the time from a claim to the service answering again, over ROUNDS recoveries
# (default 5) of a 3-replica log server deployed from a local container registry, each
# after every replica and its runner were killed. Baseline in the same run: the cold
# `br2k deploy` of the same image (nothing to start from), so the ratio is machine-neutral.
set -euo pipefail
rounds=${1:-5}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
# shellcheck source=tools/env.sh
source tools/env.sh
cargo build --quiet -p br2k-cli -p br2k-logserver
br2k="$root/target/debug/br2k"
say_prefix=bench
# shellcheck source=tools/local-stack.sh
source tools/local-stack.sh
cleanup() {
  "$br2k" --quiet down --name bench >/dev/null 2>&1 || true
  [[ -n ${manager:-} ]] && kill "$manager" 2>/dev/null
  stop_stack
  wait 2>/dev/null || true
}
trap cleanup EXIT
start_stack
cd "$work"
"$br2k" --quiet service-registry deploy >/dev/null
"$br2k" --quiet image build "$root/target/debug/br2k-logserver" --name bench/logserver --tag v1 >/dev/null
"$br2k" --quiet image-registry add lab "$oci_url" --plain-http >/dev/null
now() { date +%s.%N; }
since() { node -e "console.log(($(now) - $1).toFixed(2))"; }

started=$(now)
"$br2k" --quiet deploy bench --context local --image bench/logserver:v1 --network loopback --election-timeout 500 >/dev/null
cold=$(since "$started")
say "baseline: cold deploy (pull, unpack, 3 replicas up, leader published): $cold s"

"$br2k" manager run --service bench --probe-interval 0s --metrics off --network loopback --election-timeout 500 \
  --poll-interval 200ms --state-dir "$work/manager" 2>"$work/manager.log" &
manager=$!
sleep 2
times=()
for round in $(seq "$rounds"); do
  epoch=$(field bench run.epoch)
  # shellcheck disable=SC2046
  kill -9 $(field bench '[run.pid, ...run.nodes.flatMap(n => [n.app_pid, n.etcd_pid])].join(" ")')
  sleep 1
  # A different claimant each round: the registry allows one claim per claimant per cooldown.
  started=$(now)
  ETH_PRIVATE_KEY=$(key "$round") "$br2k" --quiet claim bench --reason "bench round $round" >/dev/null
  wait_answering bench "$epoch"
  took=$(since "$started")
  times+=("$took")
  say "round $round: claim to answering $took s (epoch $epoch -> $(field bench run.epoch))"
done
node -e '
const t = process.argv.slice(1, -1).map(Number).sort((a, b) => a - b), cold = Number(process.argv.at(-1));
const median = t.length % 2 ? t[(t.length - 1) / 2] : (t[t.length / 2 - 1] + t[t.length / 2]) / 2;
console.log(`recoveries: ${t.length}; claim to answering: median ${median.toFixed(2)} s, min ${t[0].toFixed(2)} s, max ${t.at(-1).toFixed(2)} s (goal: median under 10 s)`);
console.log(`baseline cold deploy: ${cold.toFixed(2)} s; median recovery / cold deploy = ${(median / cold).toFixed(2)}`);
' "${times[@]}" "$cold"
