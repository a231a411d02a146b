#!/usr/bin/env bash
# Regenerates the committed contract artifacts (ABI and bytecode) from contracts/ with
# forge: bindings/artifacts/ServiceRegistry.json (the registry, expanded by the bindings
# crate) and examples/payments/artifacts/PaymentToken.json (the payments example's token).
# alloy's sol! expands those files, so the Rust build needs no Solidity compiler; this
# script is how they are kept true to the source.
#
#   bash tools/bindings.sh           rewrite the committed artifacts
#   bash tools/bindings.sh --check   fail (exit 1) if a committed artifact differs from
#                                    what the current contracts compile to
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mode=${1:-write}
case "$mode" in
  write | --check) ;;
  *) echo "usage: bash tools/bindings.sh [--check]" >&2; exit 2 ;;
esac
# contract name, source file (under contracts/), committed artifact (under the repository)
artifacts=(
  "ServiceRegistry ServiceRegistry.sol bindings/artifacts/ServiceRegistry.json"
  "PaymentToken PaymentToken.sol examples/payments/artifacts/PaymentToken.json"
)

[ -x "$root/tools/node_modules/@foundry-rs/forge-linux-amd64/bin/forge" ] \
  || { echo "bindings: forge is not installed: run bash tools/setup.sh" >&2; exit 1; }
# shellcheck source=tools/env.sh
source "$root/tools/env.sh"
cd "$root"
forge build --quiet

fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
stale=0
for entry in "${artifacts[@]}"; do
  read -r contract source artifact <<<"$entry"
  # Keep only what the bindings need. forge's full artifact also holds the AST and
  # metadata, whose ids change when unrelated files (tests) change; bytecode does not (no
  # metadata hash, see foundry.toml), so the file changes only when the contract does.
  node - "$root/out/$source/$contract.json" >"$fresh" <<'JS'
const fs = require('fs');
const full = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const trimmed = {
  abi: full.abi,
  bytecode: { object: full.bytecode.object },
  deployedBytecode: { object: full.deployedBytecode.object },
};
process.stdout.write(JSON.stringify(trimmed, null, 2) + '\n');
JS
  if [ "$mode" = --check ]; then
    if ! diff -q "$artifact" "$fresh" >/dev/null 2>&1; then
      echo "bindings: $artifact is stale (contracts/ changed):" >&2
      diff -u "$artifact" "$fresh" | head -40 >&2 || true
      stale=1
    else
      echo "bindings: $artifact is up to date" >&2
    fi
  else
    mkdir -p "$(dirname "$artifact")"
    cp "$fresh" "$artifact"
    echo "bindings: wrote $artifact" >&2
  fi
done
if [ "$stale" = 1 ]; then
  echo "bindings: run \`bash tools/bindings.sh\` and commit the result" >&2
  exit 1
fi
