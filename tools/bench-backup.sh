#!/usr/bin/env bash
# Backup benchmark (issue 17): REQUESTS (default 100,000) requests through 3 log server
# replicas backing up every 5 s to a real registry, recorded on a real chain; then every
# disk is lost and the replicas restore. Prints the backup's size and time next to a
# baseline (the same bytes pushed as plain blobs) and the restore time. A few minutes
# here: run it in the background with its output in a file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup.sh >&2
source tools/env.sh
cargo build --release -p br2k-logserver --bins --examples >&2
exec target/release/examples/backup "$@"
