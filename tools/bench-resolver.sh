#!/usr/bin/env bash
# The resolver's benchmark: cached and uncached resolve and NewLocation propagation on a
# fresh local anvil, each next to its baseline. Prints a Markdown table on stdout.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh >&2
echo "bench: building in release mode (the first build takes a few minutes)" >&2
cargo run --quiet --release -p br2k-resolver --example bench
