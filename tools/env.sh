# Puts the project's pinned tools first on PATH and points forge at the solc shim.
# Usage (from anywhere): source tools/env.sh   (after bash tools/setup.sh)
_br2k_tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for _br2k_bin in forge anvil cast; do
  PATH="$_br2k_tools/node_modules/@foundry-rs/$_br2k_bin-linux-amd64/bin:$PATH"
done
PATH="$_br2k_tools:$PATH"
export PATH
export FOUNDRY_SOLC="$_br2k_tools/solc"
unset _br2k_tools _br2k_bin
