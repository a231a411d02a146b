//! Records in etcd as bytes and back: JSON for structured records, decimal for counters.
//! A value that does not decode is named by its key in the error, never guessed at.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::data::{NAME_RULE, is_valid_name};
use crate::error::{Error, Result};

/// Checks a service or replica name: it becomes part of etcd keys and file names.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    if is_valid_name(name) { Ok(()) } else { Err(Error::Config(format!("{what} {name:?} must be {NAME_RULE}"))) }
}

/// Decodes a JSON record, naming the key when it is malformed.
pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value)
        .map_err(|e| Error::CorruptRecord { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

/// Encodes a record as JSON.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// Decodes a decimal counter (`ls`, `ssi`, `lpi/*`, `epoch_base`).
pub(crate) fn decode_index(key: &[u8], value: &[u8]) -> Result<u64> {
    std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).ok_or_else(|| Error::CorruptRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("expected a decimal index, found {:?}", String::from_utf8_lossy(value)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::EntryState;

    #[test]
    fn names_are_checked() {
        assert!(check_name("service", "log-server_1.a").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name("service", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn undecodable_values_name_their_key() {
        let err = decode::<EntryState>(b"/br2k/s/rs/1", b"{nope").unwrap_err();
        assert!(err.to_string().contains("/br2k/s/rs/1"), "{err}");
        let err = decode_index(b"/br2k/s/ls", b"-3").unwrap_err();
        assert!(err.to_string().contains("expected a decimal index"), "{err}");
    }
}
