//! Membership changes on the local backend: nodes added to and retired from a running
//! service ([`LocalReplicaHost`], the backend's part of a `br2k-membership` change).
//!
//! A node keeps its index, and with it its address, for the life of the service: a
//! retired node stays in the list (running nothing, its data deleted) and an added one
//! takes the next index (`n4`, `n5`, ...), so no address ever names two members. A local
//! service has room for [`super::MAX_NODES`] nodes in all.

use std::time::Duration;

use br2k_membership::{Cluster, HostError, ReplicaHost};
use tokio::sync::Mutex;

use super::{ETCD_PEER_PORT, LocalService, MAX_NODES, Part, empty_dir, kill_and_reap, socket};
use crate::error::{DeployError, Result};

impl LocalService {
    /// The index of node `name`, if there is one.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Whether node `i` was retired by a membership change.
    pub fn is_retired(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.retired)
    }

    /// The nodes that are members (every node but the retired ones).
    pub fn live_nodes(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| !self.is_retired(i)).collect()
    }

    /// The name the next node added gets.
    pub fn next_node_name(&self) -> String {
        format!("n{}", self.nodes.len() + 1)
    }

    /// Node `i`'s etcd peer URL.
    pub(super) fn peer_url(&self, i: usize) -> String {
        format!("{}://{}", self.etcd_scheme(), socket(self.network.node_address(i), ETCD_PEER_PORT))
    }

    /// The etcd cluster as a membership change reaches it: the live nodes' members (with
    /// etcd TLS, presenting a live node's certificate).
    ///
    /// # Errors
    /// Never yet; kept fallible for backends that must look the cluster up.
    pub fn membership_cluster(&self) -> Result<Cluster> {
        let live = self.live_nodes();
        Ok(Cluster {
            endpoints: live.iter().map(|&i| self.etcd_url(i)).collect(),
            tls: live.first().and_then(|&i| self.etcd_tls(i)),
            timeout: Duration::from_secs(3),
        })
    }

    /// Starts node `name`, whose etcd member was added to the cluster, joining with
    /// `initial_cluster`: a new node at the next index, or the processes a node added
    /// before is missing (a change resumed after a crash).
    async fn start_joining(&mut self, name: &str, initial_cluster: &str) -> Result<usize> {
        let i = match self.node_index(name) {
            Some(i) if self.nodes[i].retired => {
                return Err(DeployError::Node { node: i + 1, reason: "was retired; its name is not reused".into() });
            }
            Some(i) => i,
            None if *name == self.next_node_name() => {
                let i = self.network.add_node()?;
                let mut node = super::Node::create(&self.spec, name.to_owned())?;
                node.join = Some(initial_cluster.to_owned());
                if let Some(certificates) = &self.certificates {
                    node.tls = Some(certificates.write_member(i, &node.dir.join("tls"))?);
                }
                self.nodes.push(node);
                i
            }
            None => {
                return Err(DeployError::Invalid(format!(
                    "the next node added here is {}, not {name}",
                    self.next_node_name()
                )));
            }
        };
        for part in [Part::Etcd, Part::App] {
            let running = match part {
                Part::Etcd => self.nodes[i].etcd.is_some(),
                Part::App => self.nodes[i].app.is_some(),
            };
            if !running {
                self.spawn(i, part)?;
                self.wait_ready(i, part).await?;
            }
        }
        Ok(i)
    }

    /// Stops node `i` (app first, then its etcd member).
    async fn stop_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if node.paused {
            let _ = self.resume(i);
        }
        let node = &mut self.nodes[i];
        for child in [node.app.take(), node.etcd.take()].into_iter().flatten() {
            kill_and_reap(child).await;
        }
    }

    /// Deletes node `i`'s data and retires it for good.
    fn retire(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        for sub in [node.dir.join("etcd"), node.dir.join("app")] {
            empty_dir(&sub).map_err(|e| DeployError::io(format!("delete what {} holds", sub.display()), e))?;
        }
        node.retired = true;
        Ok(())
    }
}

/// The local backend's part of a membership change, on a service this process runs
/// (the testbed's, or a test's). Replicas are named as the nodes are (`n1`, `n2`, ...).
pub struct LocalReplicaHost<'a> {
    service: Mutex<&'a mut LocalService>,
    /// Every index's peer URL, known without the lock.
    peer_urls: Vec<String>,
    record: Box<dyn Fn(u32) + Send + Sync + 'a>,
}

impl<'a> LocalReplicaHost<'a> {
    /// Changes `service`; `record` is told the replica count at the end of a change.
    pub fn new(service: &'a mut LocalService, record: impl Fn(u32) + Send + Sync + 'a) -> Self {
        let peer_urls = (0..MAX_NODES).map(|i| service.peer_url(i)).collect();
        Self { service: Mutex::new(service), peer_urls, record: Box::new(record) }
    }
}

impl ReplicaHost for LocalReplicaHost<'_> {
    fn peer_url(&self, replica: &str) -> String {
        let index = replica.strip_prefix('n').and_then(|n| n.parse::<usize>().ok()).and_then(|n| n.checked_sub(1));
        // A name that is no node's gives a URL no member has (and etcd refuses to add).
        index.and_then(|i| self.peer_urls.get(i)).cloned().unwrap_or_else(|| format!("not-a-local-node://{replica}"))
    }

    async fn start(&self, replica: &str, initial_cluster: &str) -> std::result::Result<(), HostError> {
        self.service.lock().await.start_joining(replica, initial_cluster).await?;
        Ok(())
    }

    async fn stop(&self, replica: &str) -> std::result::Result<(), HostError> {
        let mut service = self.service.lock().await;
        if let Some(i) = service.node_index(replica) {
            service.stop_node(i).await;
        }
        Ok(())
    }

    async fn delete_data(&self, replica: &str) -> std::result::Result<(), HostError> {
        let mut service = self.service.lock().await;
        if let Some(i) = service.node_index(replica) {
            service.retire(i)?;
        }
        Ok(())
    }

    async fn record_replicas(&self, replicas: u32) -> std::result::Result<(), HostError> {
        (self.record)(replicas);
        Ok(())
    }
}
