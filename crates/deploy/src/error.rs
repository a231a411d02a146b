use std::path::PathBuf;
use std::time::Duration;

/// Why a deployment action failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A program the backend runs is not installed.
    #[error("{program} not found (looked at {searched}); run `bash tools/setup.sh` from the repository root")]
    ToolNotFound {
        /// The program.
        program: String,
        /// Where it was looked for.
        searched: String,
    },
    /// The request itself is wrong (bad counts, names, paths); nothing was started.
    #[error("{0}")]
    Invalid(String),
    /// A network-namespace action needs root, or namespaces are not in use.
    #[error(
        "{action} needs each node in its own network namespace, which needs root (this runner has uid {uid}); run as root, or use a fault that does not cut the network (pause, kill)"
    )]
    NeedsNamespaces {
        /// What was asked.
        action: String,
        /// The effective uid.
        uid: u32,
    },
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Net {
        /// Its arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// A file or process operation failed.
    #[error("could not {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A process did not become ready in time.
    #[error("{what} was not ready within {timeout:?}{}", log_hint(.log.as_ref()))]
    NotReady {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// Its log file, for the user to read.
        log: Option<PathBuf>,
    },
    /// A process exited while it was expected to run.
    #[error("{what} exited ({status}){}", log_hint(.log.as_ref()))]
    Exited {
        /// Which process.
        what: String,
        /// How it ended.
        status: String,
        /// Its log file.
        log: Option<PathBuf>,
    },
    /// A node index out of range, or a node in the wrong state for the action.
    #[error("node {node}: {reason}")]
    Node {
        /// The node (1-based, as printed).
        node: usize,
        /// What was wrong.
        reason: String,
    },
    /// The chain or the registry refused or failed.
    #[error(transparent)]
    Registry(#[from] br2k_resolver::Error),
    /// An image or a container registry refused or failed.
    #[error(transparent)]
    Oci(#[from] br2k_oci::OciError),
}

fn log_hint(log: Option<&PathBuf>) -> String {
    log.map(|p| format!("; see its log: {}", p.display())).unwrap_or_default()
}

impl DeployError {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { action: action.into(), source }
    }
}

/// Results of this crate.
pub type Result<T, E = DeployError> = std::result::Result<T, E>;
