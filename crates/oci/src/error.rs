/// Why an image or registry action failed.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A program the action runs is not installed.
    #[error("{program} not found (looked at {searched}); run `bash tools/setup.sh` from the repository root")]
    ToolNotFound {
        /// The program.
        program: String,
        /// Where it was looked for.
        searched: String,
    },
    /// The request is wrong, or the registry refused or failed it; the message says which
    /// and what to do.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("could not {action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { action: action.into(), source }
    }
}

/// Results of this crate.
pub type Result<T, E = OciError> = std::result::Result<T, E>;
