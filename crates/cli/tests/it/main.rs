//! `br2k` run as a real process against a real anvil, with snapshots of what it prints.
//! `SNAPSHOTS=overwrite cargo test -p br2k-cli` rewrites the inline snapshots after a
//! deliberate change of output; review the diff before committing it.

mod commands;
mod env;
mod errors;
mod watch;
