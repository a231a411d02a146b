#!/usr/bin/env bash
# Regenerates bindings/artifacts/ServiceRegistry.json (ABI and bytecode) from contracts/
# with forge. The bindings crate expands that file with alloy's sol!, so the Rust build
# needs no Solidity compiler; this script is how the file is kept true to the source.
#
#   bash tools/bindings.sh           rewrite the committed artifact
#   bash tools/bindings.sh --check   fail (exit 1) if the committed artifact differs from
#                                    what the current contracts compile to
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
artifact="$root/bindings/artifacts/ServiceRegistry.json"
mode=${1:-write}
case "$mode" in
  write | --check) ;;
  *) echo "usage: bash tools/bindings.sh [--check]" >&2; exit 2 ;;
esac

[ -x "$root/tools/node_modules/@foundry-rs/forge-linux-amd64/bin/forge" ] \
  || { echo "bindings: forge is not installed: run bash tools/setup.sh" >&2; exit 1; }
# shellcheck source=tools/env.sh
source "$root/tools/env.sh"
cd "$root"
forge build --quiet

fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
# Keep only what the bindings need. forge's full artifact also holds the AST and metadata,
# whose ids change when unrelated files (tests) change; bytecode does not (no metadata
# hash, see foundry.toml), so this file changes only when the contract does.
node - "$root/out/ServiceRegistry.sol/ServiceRegistry.json" >"$fresh" <<'JS'
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
    echo "bindings: bindings/artifacts/ServiceRegistry.json is stale (contracts/ changed):" >&2
    diff -u "$artifact" "$fresh" | head -40 >&2 || true
    echo "bindings: run \`bash tools/bindings.sh\` and commit the result" >&2
    exit 1
  fi
  echo "bindings: bindings/artifacts/ServiceRegistry.json is up to date" >&2
else
  mkdir -p "$(dirname "$artifact")"
  cp "$fresh" "$artifact"
  echo "bindings: wrote bindings/artifacts/ServiceRegistry.json" >&2
fi
