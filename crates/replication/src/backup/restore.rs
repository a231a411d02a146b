//! Reading a backup's log back: what a restore (`crate::recovery`) and a restore to a point
//! (`super::point`) replay.

use super::manifest::SegmentEntry;

/// The entries a restore of `backup` replays, from its segments' bytes (`blobs`, in
/// order): every entry from `log_from` to its index, each segment holding exactly the
/// entries it names.
///
/// # Errors
/// A line that does not decode, or an entry missing, repeated or out of place.
pub(crate) fn log_of(
    backup: &super::BackupManifest,
    blobs: &[bytes::Bytes],
) -> std::result::Result<Vec<SegmentEntry>, String> {
    let mut entries = Vec::new();
    for (segment, bytes) in backup.segments.iter().zip(blobs) {
        let mut expected = segment.from;
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let entry: SegmentEntry =
                serde_json::from_slice(line).map_err(|e| format!("a log line does not decode: {e}"))?;
            if entry.index != expected || entry.index > segment.to {
                return Err(format!(
                    "the segment {}..={} holds entry {} where {expected} was due",
                    segment.from, segment.to, entry.index
                ));
            }
            expected += 1;
            // What the snapshot holds, a segment that straddles it holds again: skipped.
            if entry.index >= backup.log_from {
                entries.push(entry);
            }
        }
        if expected != segment.to + 1 {
            return Err(format!("the segment {}..={} ends at {}", segment.from, segment.to, expected - 1));
        }
    }
    let reached = entries.last().map_or(backup.log_from - 1, |e| e.index);
    if reached != backup.index.max(backup.log_from - 1) {
        return Err(format!("its log reaches {reached}, not its index {}", backup.index));
    }
    Ok(entries)
}

/// Whether `artifact` (`host/repository@digest`) is in `repository` on `host`.
pub(crate) fn in_repository(artifact: &str, host: &str, repository: &str) -> bool {
    artifact
        .split_once('@')
        .and_then(|(name, _digest)| name.strip_prefix(host)?.strip_prefix('/'))
        .is_some_and(|name| name == repository)
}
