//! `EngineError`: the one error type of the engine crate.
//!
//! `kind()` says whose fault an error is (the user's spec or data, an external system, or
//! Weir itself); the job manager's restart logic reads it, operators never retry by
//! themselves.

use crate::spec::SpecError;

/// Whose fault an error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad job spec or bad input data: retrying gives the same result.
    User,
    /// A system outside Weir (disk, network peer, Kafka) failed: retrying may help.
    External,
    /// A bug or broken invariant inside Weir.
    Internal,
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The job spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// An operator failed while processing.
    #[error("operator '{operator}' subtask {subtask}: {message}")]
    Operator {
        /// Operator id from the spec.
        operator: String,
        /// Subtask index.
        subtask: usize,
        /// What went wrong.
        message: String,
        /// Whose fault.
        kind: ErrorKind,
    },
    /// Encoding or decoding a frame or snapshot failed.
    #[error("codec: {0}")]
    Codec(#[from] crate::codec::CodecError),
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The job was canceled.
    #[error("job canceled")]
    Canceled,
    /// Killed on request (`POST /jobs/{id}/tasks/{task}/{subtask}/kill`, the dashboard).
    #[error("killed on request")]
    Killed,
    /// A broken internal invariant (a channel closed unexpectedly, an actor died).
    #[error("internal: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whose fault this error is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Spec(_) => ErrorKind::User,
            EngineError::Operator { kind, .. } => *kind,
            EngineError::Codec(_) | EngineError::Io { .. } => ErrorKind::External,
            EngineError::Canceled => ErrorKind::User,
            EngineError::Internal(_) | EngineError::Killed => ErrorKind::Internal,
        }
    }

    /// Whether restarting the failed work may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind(), ErrorKind::External | ErrorKind::Internal)
    }
}
