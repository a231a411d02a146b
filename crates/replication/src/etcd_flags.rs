//! How a service's etcd members should run, for whatever starts them (the local and
//! Kubernetes backends, the benchmarks).
//!
//! The runtime keeps etcd's *database* small itself (log compaction and history
//! compaction); these flags keep the rest of a member bounded too:
//! - an explicit space quota, so that `status` can show it and nobody is surprised by the
//!   default's `NOSPACE`;
//! - periodic auto-compaction of history older than an hour, a safety net should the
//!   runtime's own compaction stop (snapshots turned off, say);
//! - a Raft snapshot every 10,000 entries: etcd keeps its Raft log in memory until its own
//!   snapshot, and with 3.4's default of 100,000 entries a busy member holds several
//!   hundred megabytes of already-applied requests.

/// Each member's space quota: past it etcd raises `NOSPACE` and refuses writes (etcd's
/// default, made explicit).
pub const QUOTA_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Raft entries between two of etcd's own snapshots.
pub const SNAPSHOT_COUNT: u64 = 10_000;

/// The flags, as `--name=value` arguments.
pub fn recommended() -> Vec<String> {
    with_quota(QUOTA_BYTES)
}

/// The flags with a space quota of `quota_bytes` (a deployment that sizes etcd's volume
/// derives the quota from it).
pub fn with_quota(quota_bytes: u64) -> Vec<String> {
    vec![
        format!("--quota-backend-bytes={quota_bytes}"),
        "--auto-compaction-mode=periodic".into(),
        "--auto-compaction-retention=1h".into(),
        format!("--snapshot-count={SNAPSHOT_COUNT}"),
    ]
}
