#!/usr/bin/env bash
# Replication benchmark: 3 etcd members and 3 logserver replicas on this
# machine; raw etcd put next to br2k's replicated POST /log at 1, 16, 64 and 256 clients,
# with the CPU and pipeline breakdown.
# BENCH_SECONDS sets the length of each measurement (default 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh >&2
cargo build --release -p br2k-logserver --bins --examples >&2
exec target/release/examples/bench "$@"
