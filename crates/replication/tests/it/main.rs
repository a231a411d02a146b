//! Integration tests of the replication runtime on a real 3-member etcd cluster (and a
//! real anvil where the registry is involved).

mod backup;
mod compaction;
mod faults;
mod harness;
mod hostile;
mod idempotency;
mod inputs;
mod members;
mod metrics;
mod outbox;
mod pending;
mod prepare;
mod roles;
mod space;
