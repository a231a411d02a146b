#!/usr/bin/env bash
# Quick start, command 2 (and what CI runs): installs the toolchain, then every check and
# every test of the project, stopping at the first failure.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash tools/setup.sh
# shellcheck source=tools/env.sh
source tools/env.sh

step() {
  local started=$SECONDS
  printf '\n==> %s\n' "$*" >&2
  "$@"
  printf '<== %s: ok (%d s)\n' "$*" $((SECONDS - started)) >&2
}

step forge fmt --check
step forge build
step forge test
step forge snapshot --check
step bash tools/bindings.sh --check
step cargo fmt --all --check
step cargo clippy --workspace --all-targets -- -D warnings
# The runtime's layers (docs/architecture.md): no upward import, no cycle, no file over 700 lines.
step cargo run --quiet -p layer-check -- crates/replication --max-lines 700
# The etcd init step on etcd 3.5 too, the series the Kubernetes backend deploys (seconds;
# the runtime's and the membership changes' suites on 3.5 are a README command, for their
# minutes). `--workspace`, so that what it builds is what `cargo test --workspace` reuses.
step env BR2K_ETCD_BIN=tools/.venv/bin/etcd-3.5 cargo test --workspace --test etcd_init
# Last, and not wrapped, so the run ends with cargo's own summary.
printf '\n==> cargo test --workspace\n' >&2
cargo test --workspace
