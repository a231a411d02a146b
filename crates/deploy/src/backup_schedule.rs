//! How often a deployed service backs up, records a backup on chain, and which backups it
//! keeps: handed to each replica in its environment (the replica's own flags of the same
//! names read it).

/// A deployed service's backup schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupSchedule {
    /// Seconds between two backups (what a total disaster can lose).
    pub interval: u64,
    /// Seconds between two backups recorded on chain (what backups cost in gas).
    pub record_interval: u64,
    /// The newest backups kept.
    pub keep_last: u64,
    /// Days whose newest backup is kept.
    pub keep_daily: u64,
}

impl Default for BackupSchedule {
    fn default() -> Self {
        Self { interval: 30, record_interval: 600, keep_last: 48, keep_daily: 7 }
    }
}

impl BackupSchedule {
    /// The environment a replica reads it from.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("BR2K_BACKUP_INTERVAL".into(), self.interval.to_string()),
            ("BR2K_BACKUP_RECORD_INTERVAL".into(), self.record_interval.to_string()),
            ("BR2K_BACKUP_KEEP_LAST".into(), self.keep_last.to_string()),
            ("BR2K_BACKUP_KEEP_DAILY".into(), self.keep_daily.to_string()),
        ]
    }
}
