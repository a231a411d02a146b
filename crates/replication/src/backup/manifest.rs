//! What a backup is in the registry: a manifest naming a base snapshot and the log
//! segments after it, each a blob pushed once and named again by every later backup that
//! still needs it, and carrying the operator's signature over the rest of it.
//!
//! A backup's manifest names the manifest of the backup before it (`io.br2k.previous`),
//! so backups form a hash chain, as blocks do: a backup whose chain reaches the backup
//! recorded on chain (the anchor) extends what the chain vouches for, and its signature
//! by an operator the registry allows vouches for the rest.

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, Signature, keccak256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use br2k_oci::artifact::{ArtifactManifest, Descriptor};
use serde::{Deserialize, Serialize};

use crate::data::{CompactedLog, EntryState, LogEntry};

/// The artifact type of a backup made of a snapshot and log segments.
pub const BACKUP_TYPE: &str = "application/vnd.br2k.backup.v2";
/// The artifact type of backups before segments (one `log` layer from the snapshot on);
/// still read, so a service upgraded in place restores from what its chain records.
pub const BACKUP_TYPE_V1: &str = "application/vnd.br2k.backup.v1";
/// The media type of the `state` layer (an app snapshot, in the snapshot file's format).
pub const STATE_MEDIA_TYPE: &str = "application/vnd.br2k.state.v1";
/// The media type of a log segment ([`SegmentEntry`] JSON lines).
pub const LOG_MEDIA_TYPE: &str = "application/vnd.br2k.log.v1+jsonl";
/// The annotation holding Table 2's counts of the entries before the log (a
/// [`CompactedLog`] as JSON), so that they survive a restore.
pub const TALLY_ANNOTATION: &str = "io.br2k.tally";
/// The annotation holding how many leadership terms the service had seen.
pub const TERMS_ANNOTATION: &str = "io.br2k.terms";
/// The largest backup (its snapshot and segments together) a restore fetches, 1 GiB: a
/// restore holds it in memory, and a manifest naming more could make a replica with no
/// data left fetch without end. A leader refuses to push a backup over it (with an alert:
/// compaction and snapshots keep backups small; a state near this size needs them more
/// often), so a backup that could never be restored is never recorded.
pub const MAX_BACKUP_BYTES: u64 = crate::data::MAX_STATE_BYTES;

/// The tag prefix of backups: `br2k-backup-<service>-<index>`. The service is in the tag
/// because services deployed from one image share its repository (a copy restored under a
/// new name does).
pub const TAG_PREFIX: &str = "br2k-backup-";

const PREVIOUS: &str = "io.br2k.previous";
const INDEX: &str = "io.br2k.index";
const LOG_FROM: &str = "io.br2k.log.from";
const SEGMENT_FROM: &str = "io.br2k.segment.from";
const SEGMENT_TO: &str = "io.br2k.segment.to";
const SEGMENT_LEVEL: &str = "io.br2k.segment.level";
const SIGNER: &str = "io.br2k.signer";
const SIGNATURE: &str = "io.br2k.signature";

/// The tag of `service`'s backup reaching `index`.
pub fn backup_tag(service: &str, index: u64) -> String {
    format!("{TAG_PREFIX}{service}-{index}")
}

/// The index a tag of `service`'s backups names (`None` for another service's backups and
/// anything else).
pub fn tag_index(service: &str, tag: &str) -> Option<u64> {
    let rest = tag.strip_prefix(TAG_PREFIX)?.strip_prefix(service)?.strip_prefix('-')?;
    rest.bytes().all(|b| b.is_ascii_digit()).then(|| rest.parse().ok()).flatten()
}

/// One log entry in a segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// Its index.
    pub index: u64,
    /// Its final state.
    pub state: EntryState,
    /// The request.
    pub request: LogEntry,
}

/// The base snapshot of a backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateBlob {
    /// The blob (a snapshot file, byte for byte).
    pub blob: Descriptor,
    /// The index it reaches.
    pub index: u64,
    /// The app's state version.
    pub version: u64,
}

/// A log segment of a backup: the entries `from..=to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentBlob {
    /// The blob.
    pub blob: Descriptor,
    /// Its first index.
    pub from: u64,
    /// Its last index.
    pub to: u64,
    /// How many merges made it (0: one backup's new entries; `F` segments of level `L`
    /// merge into one of level `L + 1`).
    pub level: u32,
}

/// A backup as its manifest says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupManifest {
    /// The service.
    pub service: String,
    /// The last index it holds.
    pub index: u64,
    /// The first index a restore replays (the one after its snapshot, or the first the log
    /// still held).
    pub log_from: u64,
    /// The digest of the backup's manifest before it, if it continues one.
    pub previous: Option<String>,
    /// Its base snapshot (none before the first).
    pub state: Option<StateBlob>,
    /// Its segments, in order, together reaching from `log_from` (or before) to `index`.
    pub segments: Vec<SegmentBlob>,
    /// Table 2's counts of the entries before `log_from`.
    pub tally: CompactedLog,
    /// How many leadership terms the service had seen.
    pub terms: u64,
    /// When it was made, unix seconds.
    pub created: u64,
    /// The replica that made it.
    pub replica: String,
    /// Its leader's epoch.
    pub epoch: u64,
    /// The leader's signature over the rest of it (see [`SigningDomain`]).
    pub signed: Option<Signed>,
}

/// A backup's signature, carried in its manifest's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// Who says they signed it.
    pub signer: Address,
    /// The 65-byte signature, `0x`-hex.
    pub signature: String,
}

impl BackupManifest {
    /// Its OCI manifest.
    pub fn to_oci(&self) -> ArtifactManifest {
        let mut annotations = BTreeMap::from([
            ("io.br2k.service".to_owned(), self.service.clone()),
            (INDEX.to_owned(), self.index.to_string()),
            (LOG_FROM.to_owned(), self.log_from.to_string()),
            ("io.br2k.replica".to_owned(), self.replica.clone()),
            ("io.br2k.epoch".to_owned(), self.epoch.to_string()),
            ("io.br2k.created".to_owned(), self.created.to_string()),
            (TALLY_ANNOTATION.to_owned(), serde_json::to_string(&self.tally).expect("a tally serializes")),
            (TERMS_ANNOTATION.to_owned(), self.terms.to_string()),
        ]);
        if let Some(previous) = &self.previous {
            annotations.insert(PREVIOUS.to_owned(), previous.clone());
        }
        if let Some(signed) = &self.signed {
            annotations.insert(SIGNER.to_owned(), signed.signer.to_string());
            annotations.insert(SIGNATURE.to_owned(), signed.signature.clone());
        }
        let mut layers = Vec::with_capacity(self.segments.len() + 1);
        if let Some(state) = &self.state {
            annotations.insert("io.br2k.snapshot.index".into(), state.index.to_string());
            annotations.insert("io.br2k.state.version".into(), state.version.to_string());
            layers.push(state.blob.clone());
        }
        layers.extend(self.segments.iter().map(|s| s.blob.clone()));
        ArtifactManifest { artifact_type: BACKUP_TYPE.into(), layers, annotations, subject: None }
    }

    /// Reads a backup's manifest (either format), checking that its segments reach from
    /// its snapshot to its index without a gap.
    ///
    /// # Errors
    /// What is missing or inconsistent, in words.
    pub fn from_oci(manifest: &ArtifactManifest) -> Result<Self, String> {
        let a = &manifest.annotations;
        let number = |key: &str| -> Result<Option<u64>, String> {
            a.get(key).map(|v| v.parse::<u64>().map_err(|_| format!("its {key} {v:?} is not a number"))).transpose()
        };
        let index = number(INDEX)?.ok_or("it names no index")?;
        let tally: CompactedLog = match a.get(TALLY_ANNOTATION) {
            Some(text) => serde_json::from_str(text).map_err(|e| format!("its tally does not decode: {e}"))?,
            None => CompactedLog::default(),
        };
        let mut state = None;
        let mut segments = Vec::new();
        for layer in &manifest.layers {
            match layer.media_type.as_str() {
                STATE_MEDIA_TYPE => {
                    state = Some(StateBlob {
                        blob: layer.clone(),
                        index: number("io.br2k.snapshot.index")?.ok_or("it has a snapshot but names no its index")?,
                        version: number("io.br2k.state.version")?.unwrap_or(0),
                    });
                }
                LOG_MEDIA_TYPE if manifest.artifact_type == BACKUP_TYPE_V1 => {
                    // The one log layer of the first format: from its `log.from` to the index.
                    let from = number(LOG_FROM)?.unwrap_or(1);
                    segments.push(SegmentBlob { blob: layer.clone(), from, to: index, level: 0 });
                }
                LOG_MEDIA_TYPE => {
                    let bound = |key: &str| -> Result<u64, String> {
                        let value = layer.annotations.get(key).ok_or_else(|| format!("a segment names no {key}"))?;
                        value.parse().map_err(|_| format!("a segment's {key} {value:?} is not a number"))
                    };
                    let level = layer.annotations.get(SEGMENT_LEVEL).and_then(|l| l.parse().ok()).unwrap_or(0);
                    segments.push(SegmentBlob {
                        blob: layer.clone(),
                        from: bound(SEGMENT_FROM)?,
                        to: bound(SEGMENT_TO)?,
                        level,
                    });
                }
                other => return Err(format!("it has a layer of unknown type {other:?}")),
            }
        }
        let log_from = number(LOG_FROM)?.unwrap_or_else(|| state.as_ref().map_or(1, |s| s.index + 1));
        let signed = match (a.get(SIGNER), a.get(SIGNATURE)) {
            (Some(signer), Some(signature)) => Some(Signed {
                signer: signer.parse().map_err(|_| format!("its signer {signer:?} is not an address"))?,
                signature: signature.clone(),
            }),
            _ => None,
        };
        let backup = Self {
            service: a.get("io.br2k.service").cloned().unwrap_or_default(),
            index,
            log_from,
            previous: a.get(PREVIOUS).cloned(),
            state,
            segments,
            tally,
            terms: number(TERMS_ANNOTATION)?.unwrap_or(0),
            created: number("io.br2k.created")?.unwrap_or(0),
            replica: a.get("io.br2k.replica").cloned().unwrap_or_default(),
            epoch: number("io.br2k.epoch")?.unwrap_or(0),
            signed,
        };
        backup.check()?;
        Ok(backup)
    }

    /// Whether its parts fit: at most [`MAX_BACKUP_BYTES`] together, the snapshot ends
    /// where the log starts, and the segments follow each other without a gap or an
    /// overlap up to its index.
    ///
    /// # Errors
    /// The first thing that does not fit, in words.
    pub fn check(&self) -> Result<(), String> {
        let bytes = self.bytes();
        if bytes > MAX_BACKUP_BYTES {
            return Err(format!(
                "it is {bytes} bytes (its snapshot and segments), over the {MAX_BACKUP_BYTES} a restore accepts"
            ));
        }
        if let Some(state) = &self.state
            && state.index + 1 != self.log_from
        {
            return Err(format!("its snapshot reaches {} but its log starts at {}", state.index, self.log_from));
        }
        if self.index < self.log_from {
            return if self.segments.is_empty() {
                Ok(())
            } else {
                Err(format!("it reaches {} before its log starts at {}", self.index, self.log_from))
            };
        }
        let mut next = None::<u64>;
        for segment in &self.segments {
            if segment.from > segment.to {
                return Err(format!("a segment runs from {} to {}", segment.from, segment.to));
            }
            match next {
                None if segment.from > self.log_from => {
                    return Err(format!(
                        "its log starts at {} but its first segment at {}",
                        self.log_from, segment.from
                    ));
                }
                Some(expected) if segment.from != expected => {
                    return Err(format!("a segment starts at {} where {expected} was due", segment.from));
                }
                _ => {}
            }
            next = Some(segment.to + 1);
        }
        match next {
            Some(end) if end == self.index + 1 => Ok(()),
            Some(end) => Err(format!("its segments end at {} but it reaches {}", end - 1, self.index)),
            None => Err(format!("it has no segment for its log {}..={}", self.log_from, self.index)),
        }
    }

    /// The digest of its manifest without its signature: what the signature covers
    /// (every field br2k reads from a manifest, so nothing it acts on can change unseen).
    pub fn unsigned_digest(&self) -> String {
        Self { signed: None, ..self.clone() }.to_oci().digest()
    }

    /// The bytes of its blobs, state and segments.
    pub fn bytes(&self) -> u64 {
        self.state
            .iter()
            .map(|s| s.blob.size)
            .chain(self.segments.iter().map(|s| s.blob.size))
            .fold(0, u64::saturating_add)
    }
}

/// The annotations of a segment blob.
pub(crate) fn segment_annotations(from: u64, to: u64, level: u32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (br2k_oci::artifact::TITLE_ANNOTATION.to_owned(), format!("log-{from}-{to}")),
        (SEGMENT_FROM.to_owned(), from.to_string()),
        (SEGMENT_TO.to_owned(), to.to_string()),
        (SEGMENT_LEVEL.to_owned(), level.to_string()),
    ])
}

/// Where a signature is valid: the chain, the registry contract and the service, so that
/// a signature over one service's backup is worth nothing for another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigningDomain {
    /// The chain id.
    pub chain_id: u64,
    /// The service registry's address.
    pub registry: Address,
    /// The service id (`keccak256(name)`).
    pub service: B256,
}

impl SigningDomain {
    /// The 32 bytes signed for the backup `digest` reaching `index` (signed as an
    /// EIP-191 message, so a wallet shows it as such and it can never be a transaction).
    pub fn message(&self, index: u64, digest: &str) -> B256 {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(b"br2k backup v1");
        bytes.extend_from_slice(&self.chain_id.to_be_bytes());
        bytes.extend_from_slice(self.registry.as_slice());
        bytes.extend_from_slice(self.service.as_slice());
        bytes.extend_from_slice(&index.to_be_bytes());
        bytes.extend_from_slice(digest.as_bytes());
        keccak256(bytes)
    }

    /// Signs `backup` with `signer`: its manifest then carries the signature.
    ///
    /// # Errors
    /// The signer's failure.
    pub fn sign(&self, signer: &PrivateKeySigner, backup: &mut BackupManifest) -> Result<(), alloy::signers::Error> {
        backup.signed = None;
        let signature = signer.sign_message_sync(self.message(backup.index, &backup.unsigned_digest()).as_slice())?;
        backup.signed =
            Some(Signed { signer: signer.address(), signature: alloy::hex::encode_prefixed(signature.as_bytes()) });
        Ok(())
    }

    /// Who signed `backup`.
    ///
    /// # Errors
    /// A backup that is not signed, or whose signature does not decode or does not
    /// recover to the signer it names (signed by someone else, for another index, service
    /// or chain, or altered since).
    pub fn signer_of(&self, backup: &BackupManifest) -> Result<Address, String> {
        let signed = backup.signed.as_ref().ok_or("it is not signed")?;
        let bytes = alloy::hex::decode(&signed.signature).map_err(|_| "its signature is not hex")?;
        let signature = Signature::from_raw(&bytes).map_err(|e| format!("its signature does not decode: {e}"))?;
        let recovered = signature
            .recover_address_from_msg(self.message(backup.index, &backup.unsigned_digest()).as_slice())
            .map_err(|e| format!("its signature recovers to no address: {e}"))?;
        if recovered != signed.signer {
            return Err(format!("its signature is not by {} as it says (it recovers to {recovered})", signed.signer));
        }
        Ok(recovered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(from: u64, to: u64) -> SegmentBlob {
        SegmentBlob {
            blob: Descriptor {
                media_type: LOG_MEDIA_TYPE.into(),
                digest: format!("sha256:{from:064x}"),
                size: to - from + 1,
                annotations: segment_annotations(from, to, 0),
            },
            from,
            to,
            level: 0,
        }
    }

    #[test]
    fn a_backup_a_restore_would_refuse_for_its_size_does_not_fit() {
        let mut big = backup(vec![segment(11, 20), segment(21, 30)]);
        assert_eq!(big.check(), Ok(()));
        big.segments[1].blob.size = MAX_BACKUP_BYTES;
        let refused = big.check().unwrap_err();
        assert!(refused.contains("over the 1073741824 a restore accepts"), "{refused}");
        // Sizes a hostile manifest declares cannot wrap the sum around.
        big.segments[0].blob.size = u64::MAX;
        assert!(big.check().is_err());
    }

    fn backup(segments: Vec<SegmentBlob>) -> BackupManifest {
        BackupManifest {
            service: "s".into(),
            index: 30,
            log_from: 11,
            previous: Some(format!("sha256:{:064x}", 7)),
            state: Some(StateBlob {
                blob: Descriptor {
                    media_type: STATE_MEDIA_TYPE.into(),
                    digest: format!("sha256:{:064x}", 1),
                    size: 5,
                    annotations: BTreeMap::new(),
                },
                index: 10,
                version: 2,
            }),
            segments,
            tally: CompactedLog { first_index: 3, success: 9, ..CompactedLog::default() },
            terms: 4,
            created: 1_700_000_000,
            replica: "r0".into(),
            epoch: 3,
            signed: None,
        }
    }

    #[test]
    fn tags_name_their_service_and_never_another_sharing_the_repository() {
        assert_eq!(backup_tag("ledger", 42), "br2k-backup-ledger-42");
        assert_eq!(tag_index("ledger", &backup_tag("ledger", 42)), Some(42));
        assert_eq!(tag_index("ledger", "br2k-backup-ledger-42.sig"), None);
        assert_eq!(tag_index("ledger", &backup_tag("ledger-copy", 42)), None, "a copy under another name");
        assert_eq!(tag_index("ledger-copy", &backup_tag("ledger", 42)), None);
        assert_eq!(tag_index("ledger", "br2k-backup-ledger-+42"), None);
        let longest = backup_tag(&"s".repeat(64), u64::MAX);
        assert!(longest.len() <= 128, "an OCI tag is at most 128 characters: {}", longest.len());
    }

    #[test]
    fn a_manifest_reads_back_as_it_was_written() {
        let written = backup(vec![segment(5, 20), segment(21, 25), segment(26, 30)]);
        assert_eq!(BackupManifest::from_oci(&written.to_oci()), Ok(written.clone()));
        assert_eq!(written.to_oci().digest(), written.to_oci().digest(), "deterministic");
    }

    #[test]
    fn segments_with_a_gap_an_overlap_or_a_short_end_are_refused() {
        let gap = backup(vec![segment(11, 20), segment(22, 30)]);
        assert!(BackupManifest::from_oci(&gap.to_oci()).unwrap_err().contains("starts at 22 where 21"));
        let overlap = backup(vec![segment(11, 20), segment(20, 30)]);
        assert!(overlap.check().is_err());
        let short = backup(vec![segment(11, 29)]);
        assert!(short.check().unwrap_err().contains("end at 29"));
        let late = backup(vec![segment(12, 30)]);
        assert!(late.check().unwrap_err().contains("first segment at 12"));
        let mut torn = backup(vec![segment(11, 30)]);
        torn.log_from = 12;
        assert!(torn.check().unwrap_err().contains("snapshot reaches 10"));
    }

    #[test]
    fn a_signature_recovers_to_its_signer_and_to_no_one_for_another_backup_or_service() {
        let signer = PrivateKeySigner::random();
        let domain = SigningDomain { chain_id: 31337, registry: Address::repeat_byte(9), service: keccak256("s") };
        let mut signed = backup(vec![segment(11, 30)]);
        domain.sign(&signer, &mut signed).unwrap();
        let read = BackupManifest::from_oci(&signed.to_oci()).unwrap();
        assert_eq!(domain.signer_of(&read), Ok(signer.address()), "the signature survives the registry round trip");

        let other = SigningDomain { service: keccak256("t"), ..domain };
        assert!(other.signer_of(&signed).unwrap_err().contains("not by"), "another service's signature");
        let mut moved = signed.clone();
        moved.index = 31;
        moved.segments[0].to = 31;
        assert!(domain.signer_of(&moved).unwrap_err().contains("not by"), "the same signature for another index");
        let mut altered = signed.clone();
        altered.previous = None;
        assert!(domain.signer_of(&altered).unwrap_err().contains("not by"), "a manifest altered after signing");
        let mut forged = signed.clone();
        forged.signed.as_mut().unwrap().signer = Address::repeat_byte(1);
        assert!(domain.signer_of(&forged).unwrap_err().contains("not by"), "a signer it names but is not");
        assert!(domain.signer_of(&backup(vec![segment(11, 30)])).unwrap_err().contains("not signed"));
    }
}
