#!/usr/bin/env bash
# What backups cost a deployed service (issue 31): registry bytes and gas.
#
# On a fresh chain (anvil) and registry (docker-registry), the log server is deployed
# (`br2k deploy`) backing up every BACKUP_INTERVAL seconds (default 1), and 3 users send
# requests at 2/s each for RUN_SECONDS (default 60). Measured twice in the same run:
#  - recording one backup on chain every RECORD_INTERVAL seconds (default 10), the others
#    signed by the leader (br2k's way);
#  - recording every backup on chain (record interval 1 s: every backup an anchor), the
#    baseline that shows what the record interval saves.
# For each: backups pushed and kept, registry growth (bytes per request), anchors and gas
# (per minute, and per day at this rate). At the end the registry's own garbage
# collection runs, and the bytes it leaves are printed.
# Usage: bash tools/backup-cost.sh   (environment: BACKUP_INTERVAL, RECORD_INTERVAL, RUN_SECONDS)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
# shellcheck source=tools/env.sh
source tools/env.sh
say_prefix=backup-cost
interval=${BACKUP_INTERVAL:-1}
record_interval=${RECORD_INTERVAL:-10}
run_seconds=${RUN_SECONDS:-60}
requests=$((run_seconds * 2))

echo "backup-cost: building br2k and br2k-logserver" >&2
cargo build --quiet -p br2k-cli -p br2k-logserver
br2k="$root/target/debug/br2k"

# shellcheck source=tools/local-stack.sh
source tools/local-stack.sh
services=()
cleanup() {
  for service in "${services[@]}"; do "$br2k" --quiet down --name "$service" >/dev/null 2>&1 || true; done
  stop_stack
  wait 2>/dev/null || true
}
trap cleanup EXIT
start_stack
cd "$work"
run service-registry deploy --claim-cooldown 30 >&2
run image build "$root/target/debug/br2k-logserver" --name demo/logserver --tag v1 >&2
run image-registry add lab "$oci_url" --plain-http >&2

# json URL EXPR: a JS expression on the JSON at URL.
json() { node -e 'fetch(process.argv[1]).then(r => r.json()).then(j => console.log(eval(process.argv[2])))' "$1" "$2"; }
# The registry's storage: as `du` counts it (its directories too: distribution's
# filesystem driver makes a few for every blob, tag and manifest), and its files alone
# (what an object store such as S3 would hold).
bytes() { du -sb "$work/oci" | cut -f1; }
files() { find "$work/oci" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }

rows=()
measure() { # SERVICE RECORD_INTERVAL
  local service=$1 record=$2
  services+=("$service")
  run deploy "$service" --context local --image demo/logserver:v1 --network loopback --election-timeout 500 \
    --backup-interval "$interval" --backup-record-interval "$record" >&2
  local before before_files started finished after after_files location status
  before=$(bytes)
  before_files=$(files)
  say "$service: 3 users x $requests requests at 2/s, backups every $interval s, one recorded every $record s"
  started=$(date +%s.%N)
  ETH_PRIVATE_KEY=$(key 1) "$br2k" --quiet users "$service" --users 3 --requests "$requests" --rate 2 >/dev/null
  finished=$(date +%s.%N)
  location=$(field "$service" run.location)
  # Until the newest backup reaches the last request.
  for _ in $(seq 100); do
    [[ $(json "$location/br2k/status" 'j.backup.index >= j.ssi') == true ]] && break
    sleep 0.2
  done
  after=$(bytes)
  after_files=$(files)
  status=$(json "$location/br2k/status" 'JSON.stringify(j.backup)')
  local kept
  kept=$("$br2k" --json backup ls "$service" | node -e 'let t="";process.stdin.on("data",d=>t+=d).on("end",()=>console.log(JSON.parse(t).backups.length))')
  rows+=("$(node -e '
    const [service, record, status, before, after, started, finished, requests, kept, bf, af] = process.argv.slice(1);
    const b = JSON.parse(status), minutes = (finished - started) / 60, grown = after - before, content = af - bf;
    const reqs = 3 * requests, fmt = n => Math.round(n).toLocaleString("en-US");
    console.log(`| ${service} | ${record} s | ${fmt(b.index)} | ${kept} | ${fmt(grown)} B (${fmt(grown / reqs)} B/request) | ` +
      `${fmt(content)} B (${fmt(content / reqs)} B/request) | ` +
      `${b.anchor.count} | ${fmt(b.anchor.gas_total)} (${fmt(b.anchor.gas_total / minutes)}/min) | ${fmt(b.anchor.gas_per_day)} | ${b.segments} |`);
  ' "$service" "$record" "$status" "$before" "$after" "$started" "$finished" "$requests" "$kept" "$before_files" "$after_files")")
  "$br2k" --quiet down --name "$service" >/dev/null 2>&1 || true
}

measure logserver "$record_interval"
measure logserver-every 1

echo
echo "Backups every $interval s; 3 users x $requests requests at 2/s (about $run_seconds s); anvil automining."
echo
echo "| service | record interval | last index | backups kept | registry growth (du) | of which files | anchors | anchor gas | gas/day at this rate | segments |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
before_gc=$(bytes)
before_gc_files=$(files)
docker-registry garbage-collect "$work/oci.yml" >"$work/gc.log" 2>&1
fmt() { node -e 'console.log(Number(process.argv[1]).toLocaleString("en-US"))' "$1"; }
echo
echo "registry storage (the image and both services' kept backups): $(fmt "$before_gc") bytes ($(fmt "$before_gc_files") in files) before garbage collection, $(fmt "$(bytes)") ($(fmt "$(files)") in files) after"
