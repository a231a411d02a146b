#!/usr/bin/env bash
# Soak benchmark (issue 15): REQUESTS (default 1,000,000) requests through 3 log server
# replicas at 16 clients with br2k's default snapshot policy, printing each etcd member's
# database size and memory over time and the throughput of every 100,000 requests; the
# baseline in the same run is the first 100,000 with snapshots and compaction off. Takes
# about 20 minutes here: run it in the background with its output in a file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh >&2
cargo build --release -p br2k-logserver --bins --examples >&2
exec target/release/examples/soak "$@"
