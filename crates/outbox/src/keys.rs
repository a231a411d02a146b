//! Where the outbox's records live, under the service's key prefix (br2k's runtime:
//! `/br2k/<service>/`):
//!
//! | key | what it holds |
//! |---|---|
//! | `outbox/tx/<index>/<k>` | the `k`-th transaction the request at `index` sent: nonce, every signed version, the receipt ([`crate::TxRecord`]) |
//! | `outbox/next_nonce` | the next nonce of the service's key not reserved yet, decimal |
//! | `outbox/free/<nonce>` | a reserved nonce whose transaction the chain refused, reused by the next transaction (empty) |

/// The outbox's keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxKeys {
    prefix: String,
}

impl OutboxKeys {
    /// The keys under `prefix` (which ends with `/`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    /// `outbox/tx/<index>/<k>`: the `k`-th transaction the request at `index` sent.
    pub fn tx(&self, index: u64, seq: u32) -> String {
        format!("{}outbox/tx/{index:020}/{seq:05}", self.prefix)
    }

    /// The first key after every transaction record of the requests below `index`.
    pub fn tx_before(&self, index: u64) -> String {
        format!("{}outbox/tx/{index:020}", self.prefix)
    }

    /// Where the transaction records start.
    pub fn tx_start(&self) -> String {
        format!("{}outbox/tx/", self.prefix)
    }

    /// The first key after every transaction record.
    pub fn tx_end(&self) -> String {
        format!("{}outbox/tx0", self.prefix)
    }

    /// The request index and sequence number of a transaction record's key.
    pub fn parse_tx(&self, key: &str) -> Option<(u64, u32)> {
        let rest = key.strip_prefix(&self.tx_start())?;
        let (index, seq) = rest.split_once('/')?;
        Some((index.parse().ok()?, seq.parse().ok()?))
    }

    /// The next nonce the outbox has not reserved, decimal.
    pub fn next_nonce(&self) -> String {
        format!("{}outbox/next_nonce", self.prefix)
    }

    /// `outbox/free/<nonce>`: a reserved nonce whose transaction the chain refused.
    pub fn free(&self, nonce: u64) -> String {
        format!("{}outbox/free/{nonce:020}", self.prefix)
    }

    /// Where the free nonces start.
    pub fn free_start(&self) -> String {
        format!("{}outbox/free/", self.prefix)
    }

    /// The first key after every free nonce.
    pub fn free_end(&self) -> String {
        format!("{}outbox/free0", self.prefix)
    }

    /// The nonce of a free nonce's key.
    pub fn parse_free(&self, key: &str) -> Option<u64> {
        key.strip_prefix(&self.free_start())?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_request_then_transaction_and_parse_back() {
        let keys = OutboxKeys::new("/br2k/pay/");
        assert!(keys.tx(9, 1) < keys.tx(10, 0));
        assert!(keys.tx_start() <= keys.tx(0, 0) && keys.tx(u64::MAX, u32::MAX) < keys.tx_end());
        assert!(keys.tx(4, 99) < keys.tx_before(5) && keys.tx_before(5) <= keys.tx(5, 0));
        assert_eq!(keys.parse_tx(&keys.tx(42, 3)), Some((42, 3)));
        assert_eq!(keys.parse_tx("/br2k/other/outbox/tx/1/2"), None);
        assert_eq!(keys.parse_free(&keys.free(7)), Some(7));
        assert!(keys.free(u64::MAX) < keys.free_end());
    }
}
