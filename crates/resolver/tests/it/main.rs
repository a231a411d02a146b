//! The resolver against a real anvil: the registry client, the cache and its events, the
//! watch stream, claims, and the failover client moving between real HTTP servers.

mod failover;
mod fixture;
mod registry;
mod resolver;
