#!/usr/bin/env bash
# Quick start, command 1: installs the toolchain, then starts a local anvil, deploys the
# ServiceRegistry, registers a demo service, publishes a leader location and resolves it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash tools/setup.sh
echo "demo: building (the first build compiles the dependencies: a few minutes)" >&2
cargo run --quiet -p br2k-bindings --example demo
